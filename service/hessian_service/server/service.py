"""The HessianService servicer: decode the request, make one engine call, encode the answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Iterator

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
from ..engine.analysis.curvature_summary import dense_curvature
from ..engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from ..engine.cancel import CANCELLED, DEADLINE, Cancelled, CancelToken
from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.objectives import OBJECTIVES
from ..engine.options import METHODS, requested_backend
from ..engine.solvers.sampling import generator, initial_params, sample
from ..store import ACTIVE_STATUSES, FINAL_STATUSES, RunRow, RunStore
from . import codec
from .auth import Tenancy, Tenant
from .config import ServerConfig
from .errors import (
    ConflictError,
    DataLossError,
    DeadlineError,
    NotFoundError,
    streaming,
    unary,
)
from .observability import Metrics
from .optimize import Optimizer
from .problems import ProblemRegistry
from .runs import LiveRun, RunManager, from_stored
from .threads import thread_policy

WATCH_PAGE = 512
WATCH_POLL_SECONDS = 0.5
RUN_STATUS = service_pb2.RunStatus
NEWTON_METHODS = tuple(m for m in METHODS if m != "gradient_descent")
DENSE_METHODS = ("newton", "saddle_free")
MAX_SPECTRUM_PRODUCTS = 100_000  # per AnalyzeCurvature call
MAX_LIST_PAGE = 1000
# Room a response needs beside its tensors and records: scalars and strings the server
# writes (a summary, a method note; an analysis' verdict reason takes two of these).
RESPONSE_SLACK = 512
# SampleTensors' advertised limit leaves this much of a message for the tensors' headers: any
# request of at most max_sample_elements values in up to 16 tensors of any rank fits.
SAMPLE_HEADER_BYTES = 4096
DEADLINE_SLACK_SECONDS = 1.0  # a call ending this close to its deadline ended by the deadline
API_VERSION = "1.1"  # hessian.v1; minor 1: Predict, ServerInfo.api_version/client_version
CLIENT_VERSION_KEY = "x-hessian-client-version"


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


def call_token(context: grpc.ServicerContext) -> CancelToken:
    """A cancel token for this call: its deadline, and cancelled when the call ends early.

    Uses time_remaining and add_callback: the sync handlers' context (sync_bridge.SyncContext)
    runs the callback as soon as the call ends, whether by the deadline, the client going
    away or an answer; grpc.aio's own context of an async handler offers add_done_callback
    instead. The callback runs when the call terminates: within DEADLINE_SLACK_SECONDS of
    the deadline that is DEADLINE (the client's deadline fires a few ms before the server's
    copy of it, measured 8-18 ms on loopback), else the client went away (CANCELLED); after
    a normal answer nobody checks the token any more.
    """
    token = CancelToken.after(context.time_remaining())

    def ended(*_: object) -> None:
        remaining = context.time_remaining()
        near = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        token.cancel(DEADLINE if near else CANCELLED)

    add_callback = getattr(context, "add_callback", None)
    if add_callback is None:  # grpc.aio ServicerContext (an async handler)
        context.add_done_callback(ended)
    elif add_callback(ended) is False:  # the call has already terminated
        ended()
    return token


class HessianService(service_pb2_grpc.HessianServiceServicer):
    """gRPC adapter over the engine, the problem registry, the run manager and the store."""

    def __init__(
        self,
        config: ServerConfig,
        store: RunStore,
        registry: ProblemRegistry,
        runs: RunManager,
        tenancy: Tenancy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.runs = runs
        self.tenancy = tenancy or Tenancy(bool(config.auth_token_file))
        self.metrics = metrics
        self.threads = thread_policy(config)
        self.optimizer = Optimizer(self)

    @contextlib.contextmanager
    def _cancellable(self, context: grpc.ServicerContext, method: str) -> Iterator[CancelToken]:
        """The call's cancel token; engine work it stopped is counted by method and reason."""
        token = call_token(context)
        try:
            token.check("before it started")
            yield token
        except Cancelled as exc:
            if self.metrics is not None:
                self.metrics.cancelled.labels(method, exc.reason).inc()
            raise

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
        """SampleTensors' cap on values per call: float64 values that fit one message with
        their tensors' headers (SAMPLE_HEADER_BYTES)."""
        return max(0, self.config.max_message_bytes - SAMPLE_HEADER_BYTES) // 8

    def _check_fits(self, field: str, nbytes: int, what: str) -> None:
        """Refuse, before any work, a response of `nbytes` over the message limit."""
        limit = self.config.max_message_bytes
        if nbytes > limit:
            raise ResourceLimitError(
                field,
                f"{what} would take {nbytes} bytes, over the message limit of {limit} "
                "(--max-message-bytes)",
            )

    @property
    def _watch_page(self) -> int:
        """Records per WatchRun event: WATCH_PAGE, fewer when a message cannot hold them."""
        room = self.config.max_message_bytes - RESPONSE_SLACK
        return max(1, min(WATCH_PAGE, room // codec.MAX_RECORD_BYTES))

    def _decode_params(self, tensor: tensor_pb2.Tensor, field: str) -> torch.Tensor:
        return codec.decode_tensor(tensor, field, max_elements=self.config.max_params)

    def _row(self, run_id: str, tenant: Tenant) -> RunRow:
        """The run, if the tenant may see it (another tenant's is NOT_FOUND, like a missing one)."""
        row = self.store.get_run(run_id) if run_id else None
        if row is None or tenant.scope not in (None, row.owner):
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
                params = from_stored(stored).params
                size = info.ByteSize() + codec.tensor_wire_bytes(params.shape, 8)
                self._check_fits("include_params", size + RESPONSE_SLACK, "the run's parameters")
                info.final_params.CopyFrom(codec.encode_tensor(params))
        return info

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one servicer per server; bounded)
    def _step_options(self, wire: bytes, default: str, allowed: tuple[str, ...]) -> MethodOptions:
        """Validated options for a serialised MethodOptions (cached: clients repeat them)."""
        values = codec.options_to_dict(optimize_pb2.MethodOptions.FromString(wire))
        method = values.setdefault("method", default)
        if method not in allowed:
            raise ValidationError("options.method", f"one of {list(allowed)}", repr(method))
        return self._method_options(values)

    def _step(
        self,
        request: service_pb2.StepRequest,
        tenant: Tenant,
        default: str,
        allowed: tuple[str, ...],
        cancel: CancelToken,
    ) -> service_pb2.StepResponse:
        _, objective = self.registry.resolve(request, tenant)
        params = self._decode_params(request.params, "params")
        response_bytes = codec.tensor_wire_bytes(params.shape, 8) + codec.MAX_RECORD_BYTES
        self._check_fits("params", response_bytes + RESPONSE_SLACK, "the new parameters")
        options = self._step_options(
            request.options.SerializeToString(deterministic=True), default, allowed
        )
        with self.threads.limited(objective):
            result = take_step(objective, params, options, cancel)
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
        ritz = min(n, o.max_lanczos_iterations * o.block_size)  # eigenvalues Lanczos can report
        sizes = {  # the response's parts that grow with the request (each value 8 bytes)
            "options.grid_points": (
                2 * codec.tensor_wire_bytes([o.grid_points], 8) if o.density_probes else 0
            ),
            "options.top_k": 16 * min(o.top_k, ritz) + 8,  # the eigenvalue and its bound
            "options.bottom_k": 16 * min(o.bottom_k, ritz) + 8,
        }
        field = max(sizes.items(), key=lambda kv: kv[1])[0]
        self._check_fits(field, sum(sizes.values()) + 2 * RESPONSE_SLACK, "the report")

    # unary RPCs
    @unary
    def CreateProblem(self, request, context):
        _check_deadline(context)
        pid, objective = self.registry.create(request.problem, self.tenancy.of(context).name)
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
        limit = self._max_sample_elements
        values = response_bytes = 0
        for i, spec in enumerate(request.tensors):
            dtype = codec.DTYPE_NAMES.get(spec.dtype)
            if dtype is None:
                raise ValidationError(f"tensors[{i}].dtype", "FLOAT32 or FLOAT64", spec.dtype)
            dist = codec.enum_name(
                optimize_pb2.Distribution, spec.distribution, f"tensors[{i}].distribution"
            )
            shape = codec.check_shape(spec.shape, f"tensors[{i}].shape")
            values += math.prod(shape)
            if values > limit:
                raise ResourceLimitError(
                    f"tensors[{i}].shape", f"{values} values requested, over the limit of {limit}"
                )
            response_bytes += codec.tensor_wire_bytes(shape, 4 if dtype == "float32" else 8)
            specs.append((shape, dtype, dist or "uniform"))
        # Sized before anything is drawn: many small tensors' headers can outgrow a message.
        what = f"{len(specs)} tensors of {values} values"
        self._check_fits("tensors", response_bytes, what)
        tensors = sample(request.seed, specs, max_elements=limit)
        return service_pb2.SampleTensorsResponse(tensors=[codec.encode_tensor(t) for t in tensors])

    @unary
    def GradientStep(self, request, context):
        with self._cancellable(context, "GradientStep") as cancel:
            tenant = self.tenancy.of(context)
            return self._step(request, tenant, "gradient_descent", ("gradient_descent",), cancel)

    @unary
    def NewtonStep(self, request, context):
        with self._cancellable(context, "NewtonStep") as cancel:
            return self._step(request, self.tenancy.of(context), "newton", NEWTON_METHODS, cancel)

    @unary
    def ComputeHessian(self, request, context):
        with self._cancellable(context, "ComputeHessian") as cancel:
            return self._compute_hessian(request, self.tenancy.of(context), cancel)

    def _compute_hessian(
        self, request: service_pb2.ComputeHessianRequest, tenant: Tenant, cancel: CancelToken
    ) -> service_pb2.ComputeHessianResponse:
        """ComputeHessian's work under the call's cancel token."""
        _, objective = self.registry.resolve(request, tenant)
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
            if request.dense_budget_bytes < 1:  # named here: the options' checks say "request."
                raise ValidationError(
                    "dense_budget_bytes", "a positive integer", request.dense_budget_bytes
                )
            values["dense_budget_bytes"] = request.dense_budget_bytes
        options = self._method_options(values, "request")
        n = objective.num_params
        summary_bytes = codec.tensor_wire_bytes([n], 8) + RESPONSE_SLACK  # with the gradient
        self._check_fits("params", summary_bytes, f"the gradient of {n} parameters")
        if not request.omit_matrix:
            matrix_bytes = codec.tensor_wire_bytes([n, n], 8) + summary_bytes
            self._check_fits(
                "omit_matrix", matrix_bytes, f"a {n}x{n} matrix (set omit_matrix for the summary)"
            )
        with self.threads.limited(objective):
            result = dense_curvature(objective, params, options, cancel, "curvature")
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
        with self._cancellable(context, "AnalyzeCurvature") as cancel:
            return self._analyze_curvature(request, self.tenancy.of(context), cancel)

    def _analyze_curvature(
        self, request: service_pb2.AnalyzeCurvatureRequest, tenant: Tenant, cancel: CancelToken
    ) -> service_pb2.AnalyzeCurvatureResponse:
        """AnalyzeCurvature's work under the call's cancel token."""
        _, objective = self.registry.resolve(request, tenant)
        params = self._decode_params(request.params, "params")
        values = codec.spectrum_to_dict(request.options)
        if "backend" not in values and self.config.default_backend:
            values["backend"] = self.config.default_backend
        options = SpectrumOptions.from_dict(values)
        itemsize = torch.empty((), dtype=params.dtype).element_size()
        self._check_spectrum_memory(objective.num_params, itemsize, options)
        with self.threads.limited(objective):
            report = analyze_curvature(objective, params, options, cancel)
        return codec.report_to_wire(report)

    @unary
    def Predict(self, request, context):
        _check_deadline(context)
        _, objective = self.registry.resolve(request, self.tenancy.of(context))
        params = self._decode_params(request.params, "params")
        inputs = None
        if request.HasField("inputs"):
            inputs = codec.decode_tensor(request.inputs, "inputs")
        with self.threads.limited(objective):
            outputs = objective.predict(params, inputs)
        size = codec.tensor_wire_bytes(list(outputs.shape), 8) + RESPONSE_SLACK
        self._check_fits("inputs", size, "the outputs")
        return service_pb2.PredictResponse(outputs=codec.encode_tensor(outputs))

    @unary
    def StartRun(self, request, context):
        _check_deadline(context)
        if len(request.name) > codec.MAX_NAME_CHARS:
            raise ValidationError(
                "name", f"at most {codec.MAX_NAME_CHARS} characters", len(request.name)
            )
        tenant = self.tenancy.of(context)
        pid, objective = self.registry.resolve(request, tenant, persist=True)
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
            owner=tenant.name,
            method_note=method_note,
        )
        if self.config.max_stored_runs:
            self.store.enforce_retention(self.config.max_stored_runs)
        return self._info(row)

    @unary
    def GetRun(self, request, context):
        row = self._row(request.run_id, self.tenancy.of(context))
        return self._info(row, request.include_params)

    @unary
    def ListRuns(self, request, context):
        size = request.page_size or 50
        if not 1 <= size <= MAX_LIST_PAGE:
            raise ValidationError("page_size", f"an integer in [1, {MAX_LIST_PAGE}] (0: 50)", size)
        after = codec.decode_page_token(request.page_token) if request.page_token else None
        statuses = []
        for i, value in enumerate(request.status):
            name = codec.enum_name(RUN_STATUS, value, f"status[{i}]")
            if name is None:
                raise ValidationError(f"status[{i}]", "a RunStatus other than UNSPECIFIED", 0)
            statuses.append(name.upper())
        rows = self.store.list_runs(statuses, size + 1, after, self.tenancy.of(context).scope)
        response = service_pb2.ListRunsResponse()
        room = self.config.max_message_bytes - RESPONSE_SLACK  # the token's share
        for row in rows[:size]:
            info = self._info(self.runs.settle(row))
            room -= codec.field_bytes(info.ByteSize())
            if room < 0 and response.runs:
                break  # a shorter page: the token continues after its last run
            response.runs.append(info)
        if len(rows) > len(response.runs):
            last = rows[len(response.runs) - 1]
            response.next_page_token = codec.encode_page_token(last.created_at, last.run_id)
        return response

    @unary
    def CancelRun(self, request, context):
        row = self._row(request.run_id, self.tenancy.of(context))
        self.runs.cancel(row.run_id)
        return self._info(row)

    @unary
    def ResumeRun(self, request, context):
        tenant = self.tenancy.of(context)
        row = self._row(request.run_id, tenant)
        if "remote" in row.spec:  # its objective lives in a caller's process
            raise ConflictError(
                "run_id",
                f"run {row.run_id} is an Optimize run: resume it by opening Optimize with "
                "resume_run_id (hessian_client.minimize(..., resume=run_id))",
            )
        objective = self.registry.by_id(row.problem_id, tenant.scope, "run.problem_id")
        return self._info(self.runs.resume(row, objective, row.owner))

    @unary
    def DeleteRun(self, request, context):
        row = self._row(request.run_id, self.tenancy.of(context))
        if self.runs.live(row.run_id) is not None:
            raise ConflictError("run_id", f"run {row.run_id} is executing; cancel it first")
        # only a run in a final status: ResumeRun may have queued it since the check above
        deleted = self.store.delete_run(row.run_id, statuses=FINAL_STATUSES)
        return service_pb2.DeleteRunResponse(deleted=deleted)

    @unary
    def DeleteProblem(self, request, context):
        self.registry.delete(request.problem_id, self.tenancy.of(context).scope)
        return service_pb2.DeleteProblemResponse(deleted=True)

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
                max_problem_bytes=c.max_problem_bytes,
                problem_cache_bytes=c.problem_cache_bytes,
                usable_cpus=self.threads.cpus,
                intra_op_threads=self.threads.threads,
                single_thread_below=self.threads.single_thread_below,
            ),
            objectives=sorted(OBJECTIVES),
            methods=[m for m in METHODS if codec.enum_value(optimize_pb2.Method, m)],
            torch_version=torch.__version__,
            api_version=API_VERSION,
            client_version=dict(context.invocation_metadata()).get(CLIENT_VERSION_KEY, ""),
        )

    # streaming
    @streaming
    async def WatchRun(self, request, context) -> AsyncIterator[service_pb2.WatchRunEvent]:
        """Stream a run's records, then its final state. Async: a waiting watcher holds no
        thread; store reads run on the default executor (the RPC pool)."""
        if request.from_iteration < 0:
            raise ValidationError("from_iteration", "an integer >= 0", request.from_iteration)
        run_id = request.run_id
        tenant = self.tenancy.of(context)
        nxt = request.from_iteration
        # A run may be resumed at any moment, so this loops until the row read after the
        # records is final and holds no record past them.
        while True:
            live, row = await asyncio.to_thread(self._live_then_row, run_id, tenant)
            if live is not None:
                # records before the live buffer (a resumed run's history) are in the store
                while nxt < live.base:
                    page = await asyncio.to_thread(
                        self._stored_page, live.run_id, nxt, live.base - 1
                    )
                    if not page:
                        break
                    yield _event(page)
                    nxt = page[-1].iteration + 1
                nxt = max(nxt, live.base)
                async for batch in _follow(live, nxt, self._watch_page):
                    yield _event(batch)
                    nxt = batch[-1].iteration + 1
                if live.error is not None:
                    raise live.error
            else:
                while page := await asyncio.to_thread(self._stored_page, row.run_id, nxt):
                    yield _event(page)
                    nxt = page[-1].iteration + 1
            row = await asyncio.to_thread(self._row, run_id, tenant)
            unseen = row.last_record is not None and row.last_record.iteration >= nxt
            if row.status not in ACTIVE_STATUSES and not unseen:
                yield service_pb2.WatchRunEvent(final=self._info(row))
                return
            if not unseen and self.runs.live(run_id) is None:
                # active with no live run here: settling, or executing on another replica
                # (woken by its commits through the shared store's push)
                await self.runs.committed(run_id, WATCH_POLL_SECONDS)

    @streaming
    async def Optimize(self, request_iterator, context) -> AsyncIterator:
        """The caller evaluates, the server optimises (server/optimize.py)."""
        async for response in self.optimizer.serve(request_iterator, context):
            yield response

    def _live_then_row(self, run_id: str, tenant: Tenant) -> tuple[LiveRun | None, RunRow]:
        """The live run (first: one admitted later shows as active in the row) and the row."""
        live = self.runs.live(run_id)
        row = self._row(run_id, tenant)
        if live is None and row.status in ACTIVE_STATUSES:
            live = self.runs.live(run_id)  # admitted between the lookup and the read
        return live, row

    def _stored_page(self, run_id: str, nxt: int, last: int | None = None) -> list:
        """Stored records from iteration `nxt` on without a gap (up to `last`, at most
        self._watch_page of them); empty when there are none to send.

        The row is read first: every record up to its last_record was committed before, so
        when iteration `nxt` is not there it was deleted behind the server's back: raise
        DataLossError naming the missing range, rather than re-read forever.
        """
        row = self.store.get_run(run_id)
        stored = row.last_record.iteration if row is not None and row.last_record else -1
        last = stored if last is None else min(last, stored)
        if last < nxt:
            return []
        page = self.store.records(run_id, nxt, min(self._watch_page, last - nxt + 1))
        present = 0
        while present < len(page) and page[present].iteration == nxt + present:
            present += 1
        if not present:
            self._missing(run_id, nxt, page[0].iteration - 1 if page else last, stored)
        return page[:present]

    def _missing(self, run_id: str, first: int, last: int, stored: int) -> None:
        """Raise DataLossError for records `first`..`last` (NotFound if the run was deleted)."""
        if self.store.get_run(run_id) is None:
            raise NotFoundError("run_id", f"run with id {run_id!r}")  # deleted meanwhile
        raise DataLossError(
            "run_id",
            f"run {run_id}: the records of iterations {first} to {last} are missing from the "
            f"store, which says the run reached iteration {stored}; the store was damaged",
        )


async def _follow(live: LiveRun, nxt: int, page: int) -> AsyncIterator[list]:
    """Batches (at most `page` records) of a live run's committed records from iteration `nxt`
    until it ends; waits on an asyncio.Event its committing thread sets, not on a thread."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def poke() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server has stopped
            loop.call_soon_threadsafe(changed.set)

    unlisten = live.listen(poke)
    try:
        while True:
            changed.clear()
            batch, finished = live.committed_from(nxt - live.base)
            for start in range(0, len(batch), page):
                yield batch[start : start + page]
            nxt += len(batch)
            if finished:
                return
            if not batch:
                await changed.wait()
    finally:
        unlisten()
