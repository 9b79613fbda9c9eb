"""The HessianService servicer: decode the request, make one engine call, encode the answer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch
from hessian_client._version import API_VERSION  # the one declaration, client and server
from hessian_client.proto import optimize_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from .. import __version__
from ..engine import (
    MethodOptions,
    StopCriteria,
    native_status,
    take_step,
)
from ..engine.analysis.curvature_summary import dense_curvature
from ..engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from ..engine.cancel import CANCELLED, DEADLINE, Cancelled, CancelToken
from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.objectives import OBJECTIVES
from ..engine.objectives.exported import Exported
from ..engine.options import METHODS, requested_backend
from ..engine.solvers.sampling import sample
from ..store import ACTIVE_STATUSES, FINAL_STATUSES, RunRow, RunStatus, RunStore, SQLiteRunStore
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
from .problems import ProblemRegistry, problem_id
from .runs import InitSpec, LiveRun, RunManager, require_interrupted
from .sync_bridge import SyncContext, inline_when
from .threads import problem_size, thread_policy

WATCH_PAGE = 512
NEWTON_METHODS = tuple(m for m in METHODS if m != "gradient_descent")
MAX_SPECTRUM_PRODUCTS = 100_000  # per AnalyzeCurvature call
MAX_LIST_PAGE = 1000
# Room a response needs beside its tensors and records: scalars and strings the server
# writes (a summary, a method note; an analysis' verdict reason takes two of these).
RESPONSE_SLACK = 512
INFO_SLACK = 128  # beside a run's info: a page token (~80 bytes) or a WatchRunEvent's tag
# SampleTensors' advertised limit leaves this much of a message for the tensors' headers: any
# request of at most max_sample_elements values in up to 16 tensors of any rank fits.
SAMPLE_HEADER_BYTES = 4096
MAX_SAMPLE_TENSORS = 1024  # tensors in one SampleTensors request (each costs a draw's setup)
DEADLINE_SLACK_SECONDS = 1.0  # a call ending this close to its deadline ended by the deadline
CLIENT_VERSION_KEY = "x-hessian-client-version"
INLINE_MAX_REQUEST_BYTES = 64 * 1024  # a step request decoded on the event loop is this small


def _event(records: list) -> service_pb2.WatchRunEvent:
    """One stream event carrying `records` (already in iteration order)."""
    event = service_pb2.WatchRunEvent()
    codec.add_records(event.records, records)
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
        return codec.decode_tensor(
            tensor, field, max_elements=self.config.max_params, floating=True
        )

    def _row(self, run_id: str, tenant: Tenant) -> RunRow:
        """The run, if the tenant may see it (another tenant's is NOT_FOUND, like a missing one)."""
        return self.runs.get(run_id, tenant.scope)

    def _params_missing(self, run_id: str) -> None:
        """A run without a checkpoint: NOT_FOUND if it was deleted meanwhile, else
        DATA_LOSS (the store lost it: a run is created with its starting checkpoint), not
        an empty final_params."""
        if self.store.get_run(run_id) is None:
            raise NotFoundError("run_id", f"run with id {run_id!r}")
        raise DataLossError(
            "include_params",
            f"run {run_id}: its parameters are missing from the store, which was damaged "
            "(its records, if any, remain)",
        )

    def _check_info_fits(self, row: RunRow, field: str = "name") -> None:
        """Refuse a new run whose info (with its widest record) would not fit a message: its
        StartRun answer, and every listing of it, failed after it was created (a long UTF-8
        name under a low limit). Its closing message, later, is cut to fit (_info)."""
        info = codec.field_bytes(codec.run_to_wire(row).ByteSize() + codec.MAX_RECORD_BYTES)
        room = self.config.max_message_bytes - INFO_SLACK
        if info > room:
            raise ResourceLimitError(
                field,
                f"a run's info with this {len(row.name.encode())}-byte name takes up to {info} "
                f"bytes, over the {room} a message holds beside its other fields "
                f"(--max-message-bytes {self.config.max_message_bytes})",
            )

    def _info(
        self,
        row: RunRow,
        include_params: bool = False,
        message: type[codec.RunState] = service_pb2.RunInfo,
        own: LiveRun | None = None,
    ) -> codec.RunState:
        """The run as `message` (RunInfo or an RPC's copy of it), with its live record if it
        executes here (newer than the row's) and, with `include_params`, its latest
        checkpoint's parameters if they fit a message. `own`: the ended execution the answer
        describes (an Optimize stream's), whose end and record it keeps where the run was
        admitted again since (LiveRun.ended_as)."""
        stored = self.store.latest_checkpoint(row.run_id) if include_params else None
        if include_params and stored is None:  # every run is created with its starting one
            self._params_missing(row.run_id)
        if stored is not None and stored.iteration >= row.num_records:
            # committed after the row was read: the row again, so the answer holds the record
            # its parameters belong to (params_iteration past last_record said otherwise)
            with contextlib.suppress(NotFoundError):  # deleted meanwhile: the row read
                row = self.runs.get(row.run_id, None)
        live = self.runs.live(row.run_id) if own is None else own
        if own is not None:
            row = own.ended_as(row)
        info = codec.run_to_wire(row, live.last_record if live is not None else None, message)
        over = codec.field_bytes(info.ByteSize()) + INFO_SLACK - self.config.max_message_bytes
        if over > 0 and info.message:  # a long closing message under a low limit: cut
            info.message = codec.cut_utf8(info.message, len(info.message.encode()) - over - 16)
        if stored is not None:
            params = stored.checkpoint().params.reshape(row.spec.get("param_shape", -1))
            size = info.ByteSize() + codec.tensor_wire_bytes(params.shape, 8)
            self._check_fits("include_params", size + RESPONSE_SLACK, "the run's parameters")
            info.final_params.CopyFrom(codec.encode_tensor(params))
            info.params_iteration = stored.iteration
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

    def _inline_step(self, request: service_pb2.StepRequest, context: Any) -> bool:
        """Whether a step may run on the event loop, saving the pool's two thread hand-offs:
        a small request (no more line-search trials or CG iterations than the default) on a
        built catalogue problem below --inline-step-below whose access check needs no store
        read (an inline problem, or a by-id hold already remembered; only with the embedded
        SQLite store).
        Anything that may wait (a store read behind a commit, an exported program's
        evaluation) keeps the pool so the loop stays free."""
        below = self.config.inline_step_below
        if not below or not isinstance(self.store, SQLiteRunStore):
            return False
        if request.ByteSize() > INLINE_MAX_REQUEST_BYTES:
            return False
        options = request.options
        if options.max_backtracks > MethodOptions.max_backtracks:
            return False  # more loss evaluations than a default step's: not short
        if options.cg_max_iterations > MethodOptions.cg_max_iterations:
            return False  # more curvature products than a default step's: not short
        if request.WhichOneof("problem_source") == "problem_id":
            scope = self.tenancy.of(context).scope
            objective = self.registry.peek(request.problem_id, scope)
        else:
            objective = self.registry.peek(problem_id(request.problem))
        return (
            objective is not None
            and objective.name != Exported.name
            and problem_size(objective) < below
        )

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
        if len(request.tensors) > MAX_SAMPLE_TENSORS:
            raise ResourceLimitError(
                "tensors",
                f"{len(request.tensors)} tensors requested, over the limit of "
                f"{MAX_SAMPLE_TENSORS} a request",
            )
        specs = []
        limit = self._max_sample_elements
        values = response_bytes = 0
        for i, spec in enumerate(request.tensors):
            codec.check_dtype(spec.dtype, codec.DTYPE_NAMES, f"tensors[{i}].dtype")
            dtype = codec.DTYPE_NAMES[spec.dtype]
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

    @inline_when(_inline_step)
    @unary
    def GradientStep(self, request, context):
        with self._cancellable(context, "GradientStep") as cancel:
            tenant = self.tenancy.of(context)
            return self._step(request, tenant, "gradient_descent", ("gradient_descent",), cancel)

    @inline_when(_inline_step)
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
        # a curvature the objective has no form of is refused before any size limit
        objective.require_curvature(options.curvature, "curvature")
        n = objective.num_params
        summary_bytes = codec.tensor_wire_bytes([n], 8) + RESPONSE_SLACK  # with the gradient
        self._check_fits("params", summary_bytes, f"the gradient of {n} parameters")
        if not request.omit_matrix:
            matrix_bytes = codec.tensor_wire_bytes([n, n], 8) + summary_bytes
            self._check_fits(
                "omit_matrix", matrix_bytes, f"a {n}x{n} matrix (set omit_matrix for the summary)"
            )
        with self.threads.limited(objective):
            result = dense_curvature(objective, params, options, cancel, prefix="")
        response = codec.curvature_to_wire(result, with_matrix=not request.omit_matrix)
        response.gradient.shape[:] = params.shape  # as the parameters came (NewtonStep's too)
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
        n = objective.num_params
        itemsize = torch.empty((), dtype=params.dtype).element_size()
        options.check_cost(n, itemsize, self.config.dense_budget_bytes, MAX_SPECTRUM_PRODUCTS)
        field, size = codec.report_wire_bytes(options, n)
        self._check_fits(field, size + 2 * RESPONSE_SLACK, "the report")
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
        most = (self.config.max_message_bytes - RESPONSE_SLACK) // 8  # values a response holds
        with self.threads.limited(objective):
            outputs = objective.predict(params, inputs, most)
        size = codec.tensor_wire_bytes(list(outputs.shape), 8) + RESPONSE_SLACK
        self._check_fits("inputs" if inputs is not None else "problem", size, "the outputs")
        return service_pb2.PredictResponse(outputs=codec.encode_tensor(outputs))

    @unary
    def StartRun(self, request, context):
        return self._start_run(request, context)

    def _start_run(
        self, request: service_pb2.StartRunRequest, context: grpc.ServicerContext
    ) -> service_pb2.StartRunResponse:
        """StartRun's work (StartAndWatchRun's first step too), on a pool thread."""
        _check_deadline(context)
        codec.check_run_name(request.name, "name")
        tenant = self.tenancy.of(context)
        pid, objective, hold_problem = self.registry.claim(request, tenant)
        values = codec.options_to_dict(request.options)
        values.setdefault("method", "newton")
        stopping = codec.stopping_to_dict(request.stopping)
        row = self.runs.start(
            problem_id=pid,
            objective=objective,
            options=self._method_options(values),
            stopping=StopCriteria.from_dict(stopping),
            initial=self._initial(request),
            name=request.name,
            owner=tenant.name,
            hold_problem=hold_problem,
            iterations_given="max_iterations" in stopping,
            check_row=self._check_info_fits,
        )
        return self._info(row, message=service_pb2.StartRunResponse)

    def _initial(self, request: service_pb2.StartRunRequest) -> torch.Tensor | InitSpec | None:
        """StartRun's starting point as sent: a tensor, a distribution to draw, or none."""
        if request.HasField("initial_params") and request.HasField("init"):
            raise ValidationError(
                "init", "no init when initial_params are given (they are the start)", "both"
            )
        if request.HasField("initial_params"):
            return self._decode_params(request.initial_params, "initial_params")
        if request.HasField("init"):
            dist = codec.enum_name(
                optimize_pb2.Distribution, request.init.distribution, "init.distribution"
            )
            return InitSpec(request.init.seed, dist or "objective_default")
        return None

    @unary
    def GetRun(self, request, context):
        row = self._row(request.run_id, self.tenancy.of(context))
        return self._info(row, request.include_params, service_pb2.GetRunResponse)

    @unary
    def ListRuns(self, request, context):
        size = request.page_size or 50
        if not 1 <= size <= MAX_LIST_PAGE:
            raise ValidationError("page_size", f"an integer in [1, {MAX_LIST_PAGE}] (0: 50)", size)
        after = codec.decode_page_token(request.page_token) if request.page_token else None
        statuses = [codec.status_from_wire(v, f"status[{i}]") for i, v in enumerate(request.status)]
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
        tenant = self.tenancy.of(context)
        row = self._row(request.run_id, tenant)
        if row.status == RunStatus.INTERRUPTED and not self.runs.cancel_interrupted(row):
            row = self._row(request.run_id, tenant)  # resumed meanwhile: cancel it as it is
        # live here: it stops before its next iteration (one still queued: CANCELLED now)
        if not self.runs.cancel(row.run_id, "CancelRun") and row.status in ACTIVE_STATUSES:
            self.store.request_cancel(row.run_id)  # another replica executes it: its keeper will
        row = self._row(request.run_id, tenant)
        return self._info(row, message=service_pb2.CancelRunResponse)

    @unary
    def ResumeRun(self, request, context):
        tenant = self.tenancy.of(context)
        row = self._row(request.run_id, tenant)
        require_interrupted(row)  # before its problem is looked up: a finished run's may be gone
        if row.remote is not None:  # its objective lives in a caller's process
            raise ConflictError(
                "run_id",
                f"run {row.run_id} is an Optimize run: resume it by opening Optimize with "
                "resume_run_id (hessian_client.minimize(..., resume=run_id))",
            )
        objective = self.registry.by_id(row.problem_id, tenant.scope, "run.problem_id")
        resumed = self.runs.resume(row, objective)
        return self._info(resumed, message=service_pb2.ResumeRunResponse)

    @unary
    def DeleteRun(self, request, context):
        tenant = self.tenancy.of(context)
        row = self._row(request.run_id, tenant)
        if (live := self.runs.live(row.run_id)) is not None:
            state = RunStatus.RUNNING if live.started else RunStatus.QUEUED
        # only a run in a final status: ResumeRun may have queued it since the check above
        elif self.store.delete_run(row.run_id, statuses=FINAL_STATUSES):
            return service_pb2.DeleteRunResponse(deleted=True)
        else:  # deleted by a call that raced this one (NOT_FOUND, as any later delete's), or
            state = self._row(request.run_id, tenant).status  # resumed meanwhile
        raise ConflictError("run_id", f"run {row.run_id} is {state}; cancel it first")

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
        """Stream a run's records, then its final state (RunManager.watch: a waiting watcher
        holds no thread)."""
        if request.from_iteration < 0:
            raise ValidationError("from_iteration", "an integer >= 0", request.from_iteration)
        events = self._watch(request.run_id, context, request.from_iteration)
        async for event in events:
            yield event

    @streaming
    async def StartAndWatchRun(self, request, context) -> AsyncIterator[service_pb2.WatchRunEvent]:
        """StartRun (on a pool thread, as the unary call), then the new run's events as
        WatchRun streams them: a whole job on one call, one round trip fewer."""
        loop = asyncio.get_running_loop()
        started = await loop.run_in_executor(
            None, self._start_run, request, SyncContext(context, loop)
        )
        yield service_pb2.WatchRunEvent(started=started)
        async for event in self._watch(started.run_id, context, 0):
            yield event

    async def _watch(
        self, run_id: str, context: grpc.aio.ServicerContext, from_iteration: int
    ) -> AsyncIterator[service_pb2.WatchRunEvent]:
        """A run's WatchRun events (RunManager.watch: a waiting watcher holds no thread)."""
        scope = self.tenancy.of(context).scope
        async for records, row in self.runs.watch(run_id, scope, from_iteration, self._watch_page):
            event = _event(records)
            if row is not None:
                event.final.CopyFrom(self._info(row))
                if records and event.ByteSize() > self.config.max_message_bytes:
                    yield _event(records)  # a full page and a long RunInfo: two events
                    event = service_pb2.WatchRunEvent(final=event.final)
            yield event

    @streaming
    async def Optimize(self, request_iterator, context) -> AsyncIterator:
        """The caller evaluates, the server optimises (server/optimize.py)."""
        async for response in self.optimizer.serve(request_iterator, context):
            yield response
