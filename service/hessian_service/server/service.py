"""The HessianService servicer: decode the request, make one engine call, encode the answer."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import threading
from collections.abc import Generator, Iterator

import grpc
import torch
from hessian_client.proto import optimize_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from .. import __version__
from ..engine import (
    MethodOptions,
    StopCriteria,
    check_dense_budget,
    native_status,
    resolve_method,
    take_step,
)
from ..engine.curvature_summary import dense_curvature
from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.objectives import OBJECTIVES
from ..engine.options import METHODS, requested_backend
from ..engine.sampling import generator, initial_params, sample
from ..engine.spectrum import SpectrumOptions, analyze_curvature
from ..store import ACTIVE_STATUSES, FINAL_STATUSES, RunRow, RunStore
from . import codec
from .auth import caller
from .config import ServerConfig
from .errors import ConflictError, DeadlineError, NotFoundError, streaming, unary
from .problems import ProblemRegistry
from .runs import LiveRun, RunManager, from_stored

WATCH_PAGE = 512
WATCH_POLL_SECONDS = 0.5
RUN_STATUS = service_pb2.RunStatus
NEWTON_METHODS = tuple(m for m in METHODS if m != "gradient_descent")
DENSE_METHODS = ("newton", "saddle_free")
MAX_SPECTRUM_PRODUCTS = 100_000  # per AnalyzeCurvature call: it cannot stop once started
MAX_LIST_PAGE = 1000


def _event(records: list) -> service_pb2.WatchRunEvent:
    """One stream event carrying `records` (already in iteration order)."""
    event = service_pb2.WatchRunEvent()
    for record in records:
        codec.record_to_wire(record, event.records.add())
    return event


def _check_deadline(context: grpc.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineError("deadline passed before the computation started")


class HessianService(service_pb2_grpc.HessianServiceServicer):
    """gRPC adapter over the engine, the problem registry, the run manager and the store."""

    def __init__(
        self,
        config: ServerConfig,
        store: RunStore,
        registry: ProblemRegistry,
        runs: RunManager,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.runs = runs

    # helpers
    def _method_options(self, values: dict, field: str = "options") -> MethodOptions:
        values = dict(values)
        if "backend" not in values and self.config.default_backend:
            values["backend"] = self.config.default_backend
        budget = values.get("dense_budget_bytes")
        if budget is None:
            values["dense_budget_bytes"] = self.config.dense_budget_bytes
        elif budget > 0:
            values["dense_budget_bytes"] = min(budget, self.config.dense_budget_bytes)
        return MethodOptions.from_dict(values, field)

    @property
    def _max_sample_elements(self) -> int:
        """SampleTensors' cap on values per call: float64 values that fit one message."""
        return self.config.max_message_bytes // 8

    def _decode_params(self, tensor: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        return codec.decode_tensor(tensor, field, max_elements=self.config.max_params)

    def _row(self, run_id: str) -> RunRow:
        row = self.store.get_run(run_id) if run_id else None
        if row is None:
            raise NotFoundError("run_id", f"run with id {run_id!r}")
        return self.runs.settle(row)

    def _info(self, row: RunRow, include_params: bool = False) -> service_pb2.RunInfo:
        info = service_pb2.RunInfo(
            run_id=row.run_id,
            name=row.name,
            status=RUN_STATUS.Value("RUN_STATUS_" + row.status),
            stop_reason=codec.stop_reason_value(row.stop_reason),
            converged=row.converged,
            message=row.message,
            problem_id=row.problem_id,
            options=codec.options_to_wire(row.spec["options"]),
            method=codec.enum_value(optimize_pb2.Method, row.spec["options"]["method"]),
            method_note=row.spec.get("method_note", ""),
            stopping=codec.stopping_to_wire(row.spec["stopping"]),
            backend=row.backend,
            num_records=row.num_records,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
        last = row.last_record
        live = self.runs.live(row.run_id)
        if live is not None and live.last_record is not None:
            last = live.last_record
            info.num_records = max(row.num_records, last.iteration + 1)
        if last is not None:
            codec.record_to_wire(last, info.last_record)
        if include_params:
            stored = self.store.latest_checkpoint(row.run_id)
            if stored is not None:
                info.final_params.CopyFrom(codec.encode_tensor(from_stored(stored).params))
        return info

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one servicer per server; bounded)
    def _step_options(self, wire: bytes, default: str, allowed: tuple[str, ...]) -> MethodOptions:
        """Validated options for a serialised MethodOptions (cached: clients repeat them)."""
        values = codec.options_to_dict(optimize_pb2.MethodOptions.FromString(wire))
        method = values.setdefault("method", default)
        if method not in allowed:
            raise ValidationError("options.method", f"one of {list(allowed)}", repr(method))
        return self._method_options(values)

    def _step(self, request: service_pb2.StepRequest, default: str, allowed: tuple[str, ...]):
        _, objective = self.registry.resolve(request)
        params = self._decode_params(request.params, "params")
        options = self._step_options(
            request.options.SerializeToString(deterministic=True), default, allowed
        )
        result = take_step(objective, params, options)
        response = service_pb2.StepResponse()
        codec.encode_tensor(result.params, request.params.shape, response.params)
        codec.record_to_wire(result.record, response.record)
        response.method = codec.enum_value(optimize_pb2.Method, result.method)
        response.method_note = result.method_note
        return response

    def _check_spectrum_memory(self, n: int, itemsize: int, options: SpectrumOptions) -> None:
        """Refuse an analysis over the memory budget, the product cap or the message limit."""
        o = options
        products = {
            "options.max_lanczos_iterations": min(o.max_lanczos_iterations, n),
            "options.trace_samples": 2 * o.trace_samples,
            "options.density_probes": o.density_probes * o.density_steps,
        }
        if sum(products.values()) > MAX_SPECTRUM_PRODUCTS:
            field = max(products.items(), key=lambda kv: kv[1])[0]
            raise ResourceLimitError(
                field,
                f"about {sum(products.values())} curvature-vector products requested, over the "
                f"server's cap of {MAX_SPECTRUM_PRODUCTS} per call",
            )
        density = o.batch_size * (o.density_steps + 1) if o.density_probes else 0
        vectors = {
            "options.max_lanczos_iterations": min(o.max_lanczos_iterations, n) + 2 * o.block_size,
            "options.trace_samples": o.trace_samples // 3 + 1,
            "options.density_steps": density,
        }
        field, count = max(vectors.items(), key=lambda kv: kv[1])
        need = count * n * itemsize
        if need > self.config.dense_budget_bytes:
            raise ResourceLimitError(
                field,
                f"{count} working vectors of {n} parameters need {need} bytes, over the "
                f"server's memory budget of {self.config.dense_budget_bytes} "
                "(dense_budget_bytes); ask for fewer",
            )
        if 16 * o.grid_points + 4096 > self.config.max_message_bytes:
            raise ResourceLimitError(
                "options.grid_points",
                f"{o.grid_points} points do not fit the message limit of "
                f"{self.config.max_message_bytes} bytes",
            )

    # unary RPCs
    @unary
    def CreateProblem(self, request, context):
        _check_deadline(context)
        pid, objective = self.registry.create(request.problem)
        dtype = codec.WIRE_DTYPES.get(objective.dtype, tensor_pb2.DTYPE_UNSPECIFIED)
        return service_pb2.CreateProblemResponse(
            problem_id=pid,
            num_params=objective.num_params,
            param_shape=list(objective.param_shape),
            dtype=dtype,
        )

    @unary
    def SampleTensors(self, request, context):
        specs = []
        for i, spec in enumerate(request.tensors):
            dtype = codec.DTYPE_NAMES.get(spec.dtype)
            if dtype is None:
                raise ValidationError(f"tensors[{i}].dtype", "FLOAT32 or FLOAT64", spec.dtype)
            dist = codec.enum_name(
                optimize_pb2.Distribution, spec.distribution, f"tensors[{i}].distribution"
            )
            shape = list(spec.shape)
            if math.prod(s for s in shape if s) > codec.MAX_SHAPE_ELEMENTS:
                # zero values, but sizes no array can describe (numpy refuses it on encoding)
                raise ValidationError(
                    f"tensors[{i}].shape",
                    f"sizes whose nonzero product is at most {codec.MAX_SHAPE_ELEMENTS}",
                    shape,
                )
            specs.append((shape, dtype, dist or "uniform"))
        tensors = sample(request.seed, specs, max_elements=self._max_sample_elements)
        return service_pb2.SampleTensorsResponse(tensors=[codec.encode_tensor(t) for t in tensors])

    @unary
    def GradientStep(self, request, context):
        _check_deadline(context)
        return self._step(request, "gradient_descent", ("gradient_descent",))

    @unary
    def NewtonStep(self, request, context):
        _check_deadline(context)
        return self._step(request, "newton", NEWTON_METHODS)

    @unary
    def ComputeHessian(self, request, context):
        _check_deadline(context)
        _, objective = self.registry.resolve(request)
        params = self._decode_params(request.params, "params")
        values: dict = {"method": "newton"}
        for name, enum_type in (
            ("curvature", optimize_pb2.Curvature),
            ("backend", optimize_pb2.Backend),
        ):
            value = codec.enum_name(enum_type, getattr(request, name), name)
            if value is not None:
                values[name] = value
        if request.HasField("dense_budget_bytes"):
            values["dense_budget_bytes"] = request.dense_budget_bytes
        options = self._method_options(values, "request")
        n = objective.num_params
        matrix_bytes = n * n * 8 + 64
        if not request.omit_matrix and matrix_bytes > self.config.max_message_bytes:
            raise ResourceLimitError(
                "omit_matrix",
                f"a {n}x{n} matrix needs about {matrix_bytes} bytes, over the message limit of "
                f"{self.config.max_message_bytes}; set omit_matrix for the summary alone",
            )
        result = dense_curvature(objective, params, options, "curvature")
        s = result.summary
        response = service_pb2.ComputeHessianResponse(
            summary=optimize_pb2.CurvatureSummary(
                min_eigenvalue=s.min_eigenvalue,
                max_eigenvalue=s.max_eigenvalue,
                negative_eigenvalues=s.negative_eigenvalues,
                condition_number=s.condition_number,
                positive_definite=s.positive_definite,
                trace=s.trace,
                negative_tolerance=s.negative_tolerance,
            ),
            loss=result.loss,
            gradient=codec.encode_tensor(result.gradient),
            backend=result.backend,
        )
        if not request.omit_matrix:
            response.matrix.CopyFrom(codec.encode_tensor(result.matrix))
        return response

    @unary
    def AnalyzeCurvature(self, request, context):
        _check_deadline(context)
        _, objective = self.registry.resolve(request)
        params = self._decode_params(request.params, "params")
        values = codec.spectrum_to_dict(request.options)
        if "backend" not in values and self.config.default_backend:
            values["backend"] = self.config.default_backend
        options = SpectrumOptions.from_dict(values)
        itemsize = torch.empty((), dtype=params.dtype).element_size()
        self._check_spectrum_memory(objective.num_params, itemsize, options)
        return codec.report_to_wire(analyze_curvature(objective, params, options))

    @unary
    def StartRun(self, request, context):
        _check_deadline(context)
        pid, objective = self.registry.resolve(request, persist=True)
        values = codec.options_to_dict(request.options)
        values.setdefault("method", "newton")
        options = self._method_options(values)
        stopping = StopCriteria.from_dict(codec.stopping_to_dict(request.stopping))
        if stopping.max_iterations > self.config.max_iterations:
            raise ResourceLimitError(
                "stopping.max_iterations",
                f"{stopping.max_iterations} is over the server limit of "
                f"{self.config.max_iterations}",
            )
        if request.HasField("initial_params"):
            params = self._decode_params(request.initial_params, "initial_params")
        elif request.HasField("init"):
            dist = codec.enum_name(
                optimize_pb2.Distribution, request.init.distribution, "init.distribution"
            )
            params = initial_params(objective, request.init.seed, dist or "objective_default")
        else:
            params = objective.init_params(generator(0))
        params = objective.check_params(params, "initial_params")
        options, method_note = resolve_method(options, objective.num_params, params.dtype)
        if options.method in DENSE_METHODS:
            check_dense_budget(
                objective.num_params,
                options.dense_budget_bytes,
                params.dtype,
                "options.dense_budget_bytes",
            )
        row = self.runs.start(
            problem_id=pid,
            objective=objective,
            params=params,
            options=options,
            stopping=stopping,
            name=request.name,
            owner=caller(context),
            method_note=method_note,
        )
        if self.config.max_stored_runs:
            self.store.enforce_retention(self.config.max_stored_runs)
        return self._info(row)

    @unary
    def GetRun(self, request, context):
        return self._info(self._row(request.run_id), request.include_params)

    @unary
    def ListRuns(self, request, context):
        size = request.page_size or 50
        if not 1 <= size <= MAX_LIST_PAGE:
            raise ValidationError("page_size", f"an integer in [1, {MAX_LIST_PAGE}] (0: 50)", size)
        after = None
        if request.page_token:
            try:
                created, run_id = json.loads(base64.urlsafe_b64decode(request.page_token))
                after = (float(created), str(run_id))
            except (ValueError, TypeError, OverflowError, binascii.Error):
                raise ValidationError(
                    "page_token", "a token from a previous ListRuns", request.page_token
                ) from None
        statuses = []
        for i, value in enumerate(request.status):
            name = codec.enum_name(RUN_STATUS, value, f"status[{i}]")
            if name is None:
                raise ValidationError(f"status[{i}]", "a RunStatus other than UNSPECIFIED", 0)
            statuses.append(name.upper())
        rows = self.store.list_runs(statuses, size + 1, after)
        response = service_pb2.ListRunsResponse(
            runs=[self._info(self.runs.settle(r)) for r in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            token = json.dumps([last.created_at, last.run_id]).encode()
            response.next_page_token = base64.urlsafe_b64encode(token).decode()
        return response

    @unary
    def CancelRun(self, request, context):
        row = self._row(request.run_id)
        self.runs.cancel(row.run_id)
        return self._info(row)

    @unary
    def ResumeRun(self, request, context):
        row = self._row(request.run_id)
        objective = self.registry.by_id(row.problem_id, "run.problem_id")
        return self._info(self.runs.resume(row, objective, caller(context)))

    @unary
    def DeleteRun(self, request, context):
        row = self._row(request.run_id)
        if self.runs.live(row.run_id) is not None:
            raise ConflictError("run_id", f"run {row.run_id} is executing; cancel it first")
        # only a run in a final status: ResumeRun may have queued it since the check above
        deleted = self.store.delete_run(row.run_id, statuses=FINAL_STATUSES)
        return service_pb2.DeleteRunResponse(deleted=deleted)

    @unary
    def GetServerInfo(self, request, context):
        available, reason = native_status()
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        c = self.config
        return service_pb2.ServerInfo(
            version=__version__,
            default_backend=requested_backend(c.default_backend),
            native_available=available,
            native_reason=reason,
            devices=devices,
            limits=service_pb2.Limits(
                max_message_bytes=c.max_message_bytes,
                max_params=c.max_params,
                dense_budget_bytes=c.dense_budget_bytes,
                max_iterations=c.max_iterations,
                max_concurrent_runs=c.max_concurrent_runs,
                workers=c.workers,
                max_data_bytes=c.max_data_bytes,
                max_runs_per_token=c.max_runs_per_token,
                max_stored_runs=c.max_stored_runs,
                max_store_bytes=c.max_store_bytes,
                max_spectrum_products=MAX_SPECTRUM_PRODUCTS,
                max_list_page_size=MAX_LIST_PAGE,
                max_sample_elements=self._max_sample_elements,
            ),
            objectives=sorted(OBJECTIVES),
            methods=[m for m in METHODS if codec.enum_value(optimize_pb2.Method, m)],
            torch_version=torch.__version__,
        )

    # streaming
    @streaming
    def WatchRun(self, request, context) -> Iterator[service_pb2.WatchRunEvent]:
        if request.from_iteration < 0:
            raise ValidationError("from_iteration", "an integer >= 0", request.from_iteration)
        run_id = request.run_id
        nxt = request.from_iteration
        gone = threading.Event()
        watched: list[LiveRun] = []
        context.add_callback(lambda: (gone.set(), *(live.wake() for live in watched)))
        # A run may be resumed at any moment, so this loops until the row read after the
        # records is final and holds no record past them.
        while not gone.is_set():
            live, row = self._live_then_row(run_id)
            if live is not None:
                watched[:] = [live]
                nxt = yield from self._watch_live(live, nxt, gone)
                if gone.is_set():
                    return
                if live.error is not None:
                    raise live.error
            else:
                nxt = yield from self._watch_stored(row.run_id, nxt)
            row = self._row(run_id)
            unseen = row.last_record is not None and row.last_record.iteration >= nxt
            if row.status not in ACTIVE_STATUSES and not unseen:
                yield service_pb2.WatchRunEvent(final=self._info(row))
                return
            if not unseen and self.runs.live(run_id) is None:
                gone.wait(WATCH_POLL_SECONDS)  # active with no live run: settling; look again

    def _live_then_row(self, run_id: str) -> tuple[LiveRun | None, RunRow]:
        """The live run (first: one admitted later shows as active in the row) and the row."""
        live = self.runs.live(run_id)
        row = self._row(run_id)
        if live is None and row.status in ACTIVE_STATUSES:
            live = self.runs.live(run_id)  # admitted between the lookup and the read
        return live, row

    def _watch_live(
        self, live: LiveRun, nxt: int, gone: threading.Event
    ) -> Generator[service_pb2.WatchRunEvent, None, int]:
        """Stream a live run's records from iteration `nxt` until it ends; the next iteration."""
        # Records before the live buffer (a resumed run's history) come from the store.
        while nxt < live.base:
            page = self.store.records(live.run_id, nxt, min(WATCH_PAGE, live.base - nxt))
            if not page:
                break
            yield _event(page)
            nxt = page[-1].iteration + 1
        nxt = max(nxt, live.base)
        while not gone.is_set():
            batch, finished = live.wait_from(nxt - live.base, WATCH_POLL_SECONDS)
            for start in range(0, len(batch), WATCH_PAGE):
                yield _event(batch[start : start + WATCH_PAGE])
            nxt += len(batch)
            if finished:
                break
        return nxt

    def _watch_stored(
        self, run_id: str, nxt: int
    ) -> Generator[service_pb2.WatchRunEvent, None, int]:
        """Stream a stored run's records from iteration `nxt`; the next iteration."""
        while True:
            page = self.store.records(run_id, nxt, WATCH_PAGE)
            if page:
                yield _event(page)
                nxt = page[-1].iteration + 1
            if len(page) < WATCH_PAGE:
                return nxt
