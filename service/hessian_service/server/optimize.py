"""The Optimize stream: the caller evaluates, a normal run (records, watchers, cancel) optimises.

The run's worker thread blocks in an asktell.Exchange; this async handler forwards each
ask to the caller and each reply back, holding no thread while it waits. Bad replies (a
wrong request id, a missing quantity, a wrong shape, a non-finite gradient, Hessian or
HVP) fail the run: FAILED, its message naming the field. A broken stream or a caller past
the per-evaluation deadline leaves the run INTERRUPTED at its checkpoint; a new stream
naming the run id resumes it (the evaluation is asked again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from hessian_client.proto import service_pb2

from ..engine import StopCriteria
from ..engine.cancel import CancelToken
from ..engine.errors import ValidationError
from ..engine.linalg import all_finite
from ..engine.options import (
    DENSE_METHODS,
    HESSIAN_FREE_METHODS,
    check_dtype_range,
    check_method_budget,
)
from ..engine.solvers.asktell import (
    Answer,
    Ask,
    Capabilities,
    Exchange,
    RemoteObjective,
    dense_source,
    resolve_remote_method,
)
from ..engine.solvers.methods import check_supported
from ..store import ACTIVE_STATUSES, RunConflictError, RunNotFoundError, RunRow
from . import codec
from .auth import Tenant
from .errors import ConflictError, DeadlineError, LimitError, NotFoundError, require_id
from .runs import LiveRun, check_iteration_limit, require_interrupted

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MESSAGE_SLACK = 4096  # a message's bytes beside its tensors (headers, a RunInfo's fields)
CANCEL_SETTLE_SECONDS = 0.05  # how long an empty request stream waits for its cancel
RESUME_POLL_SECONDS = 0.01  # how often a resume looks whether the run's old stream let go


def _check_capabilities(row: RunRow, caller: Any) -> None:
    """Refuse a resuming caller that cannot evaluate what the run was started with: its
    first reply would fail the run for good (FAILED); refused, the run stays INTERRUPTED
    for a caller with the run's functions."""
    needed = [name for name, on in row.remote["capabilities"].items() if on]
    missing = [name for name in needed if not getattr(caller, name)]
    if missing:
        raise ConflictError(
            "resume_capabilities",
            f"run {row.run_id} was started by a caller that evaluates {', '.join(needed)}; "
            f"this one lacks {', '.join(missing)}: resume it with the functions it was "
            "started with (it stays INTERRUPTED)",
        )


class Optimizer:
    """Serves Optimize streams for one servicer (its config, store, runs and run info)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._streams: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _slot(self, tenant: Tenant) -> Iterator[None]:
        """Count this stream against its token's limit (max_optimize_streams_per_token)."""
        limit = self.service.config.max_optimize_streams_per_token
        with self._lock:
            open_now = self._streams.get(tenant.name, 0)
            if limit and open_now >= limit:
                raise LimitError(
                    "max_optimize_streams_per_token",
                    f"this token already has {open_now} Optimize streams open, the server's "
                    "per-token limit; close one first",
                )
            self._streams[tenant.name] = open_now + 1
        try:
            yield
        finally:
            with self._lock:
                self._streams[tenant.name] -= 1

    def _exchange(self) -> Exchange:
        return Exchange(CancelToken(), self.service.config.optimize_evaluation_seconds)

    def _start(self, start: Any, tenant: Tenant, exchange: Exchange) -> RunRow:
        """Validate the declaration and start the run (a pool thread: store writes)."""
        service = self.service
        codec.check_run_name(start.name, "start.name")
        if not start.HasField("initial_params"):
            raise ValidationError("start.initial_params", "the starting point (n values)", "none")
        params = service._decode_params(start.initial_params, "start.initial_params").reshape(-1)
        if not params.numel():
            raise ValidationError("start.initial_params", "at least one parameter", "0 values")
        wire = start.capabilities
        caps = Capabilities(wire.gradient, wire.hessian, wire.hvp, wire.gauss_newton)
        speculative = start.speculative if start.HasField("speculative") else True
        objective = RemoteObjective(params.numel(), params.dtype, caps, exchange, speculative)
        # the run's own checks (dtype float32/64, finite values), before any run exists
        params = objective.check_params(params, "start.initial_params")
        values = codec.options_to_dict(start.options, "start.options")
        values.setdefault("method", "auto")
        options = service._method_options(values, "start.options")
        n = params.numel()
        options, note = resolve_remote_method(options, caps, n)
        check_method_budget(options, n, params.dtype, "start.options")
        check_dtype_range(options, params.dtype, "start.options")
        try:  # what the run would refuse, under the request's own field names
            check_supported(objective, options)
        except ValidationError as exc:
            raise exc.renamed(f"start.{exc.field}") from None
        # a dense Hessian the caller sends must fit a message
        if options.method in DENSE_METHODS and dense_source(caps, n) == "hessian":
            service._check_fits(
                "start.capabilities.hessian", 8 * n * n + MESSAGE_SLACK, "a Hessian"
            )
        # and so must the run's own: an ask (the point, its product vectors, records) and
        # its end (the final parameters with the run's state, smaller)
        itemsize = params.element_size()  # asks go in the run's dtype
        ask = codec.tensor_wire_bytes([_vectors_per_ask(options, caps, n) + 1, n], itemsize)
        service._check_fits(
            "start.initial_params",
            ask + 2 * codec.MAX_RECORD_BYTES + MESSAGE_SLACK,
            f"the run's requests for {n} parameters",
        )
        values = codec.stopping_to_dict(start.stopping)
        stopping = StopCriteria.from_dict(values, "start.stopping")
        check_iteration_limit(
            service.config.max_iterations,
            stopping,
            "max_iterations" in values,
            "start.stopping.max_iterations",
        )
        dtype = str(params.dtype).removeprefix("torch.")
        remote = {
            "num_params": params.numel(),
            "dtype": dtype,
            "capabilities": vars(caps),
            "speculative": speculative,
        }
        return service.runs.launch(
            problem_id="",
            objective=objective,
            params=params,
            options=options,
            stopping=stopping,
            name=start.name,
            owner=tenant.name,
            method_note=note,
            remote=remote,
            check_row=functools.partial(service._check_info_fits, field="start.name"),
        )

    async def _resume(
        self, run_id: str, tenant: Tenant, exchange: Exchange, caller: Any = None
    ) -> RunRow:
        """Resume an INTERRUPTED Optimize run under this stream (`caller`: the request's
        resume_capabilities, when it sent them).

        A caller whose stream just broke may reconnect before the server has seen the
        break: wait (up to the evaluation deadline, on the event loop: no thread is held) for
        that run's worker to stop. What can never be resumed here is refused first.
        """
        row = await asyncio.to_thread(self._resumable, run_id, tenant)
        if caller is not None:
            _check_capabilities(row, caller)
        deadline = time.monotonic() + self.service.config.optimize_evaluation_seconds
        while self.service.runs.live(run_id) is not None and time.monotonic() < deadline:
            await asyncio.sleep(RESUME_POLL_SECONDS)  # past the deadline resume refuses it
        return await asyncio.to_thread(self._resume_now, run_id, tenant, exchange)

    def _resumable(self, run_id: str, tenant: Tenant) -> RunRow:
        """The caller's run, refused unless it is an Optimize run that is INTERRUPTED or may
        become so (still active: its stream may have just broken)."""
        require_id("resume_run_id", run_id, "Optimize's started response")
        try:
            row = self.service._row(run_id, tenant)
        except NotFoundError:
            raise NotFoundError("resume_run_id", f"run with id {run_id!r}") from None
        if row.remote is None:
            raise ValidationError(
                "resume_run_id", "the id of an Optimize run (use ResumeRun for others)", run_id
            )
        if row.status not in ACTIVE_STATUSES:
            require_interrupted(row, "resume_run_id")
        return row

    def _resume_now(self, run_id: str, tenant: Tenant, exchange: Exchange) -> RunRow:
        """Resume the run, INTERRUPTED by now, with this stream's caller evaluating."""
        row = self._resumable(run_id, tenant)
        require_interrupted(row, "resume_run_id")
        remote = row.remote
        caps = Capabilities(**remote["capabilities"])
        objective = RemoteObjective(
            remote["num_params"], DTYPES[remote["dtype"]], caps, exchange, remote["speculative"]
        )
        try:
            return self.service.runs.resume(row, objective)
        except (ConflictError, RunConflictError) as exc:  # it changed meanwhile (a CancelRun)
            message = str(exc).removeprefix("run_id: ")
            raise ConflictError("resume_run_id", message) from None
        except RunNotFoundError:  # deleted meanwhile
            raise NotFoundError("resume_run_id", f"run with id {run_id!r}") from None

    async def serve(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[service_pb2.OptimizeResponse]:
        """The handler: first request starts or resumes, then ask / reply until the run ends.

        The stream counts against its token's limit from its opening, and its first request
        must come within --optimize-evaluation-seconds: streams that never sent one were
        neither counted nor ended, so a caller could hold any number of handlers."""
        tenant = self.service.tenancy.of(context)
        with self._slot(tenant):
            incoming = requests.__aiter__()  # (only once admitted: grpc warns of one unread)
            wait = self.service.config.optimize_evaluation_seconds
            try:
                # asyncio.timeout, not wait_for: a first read in a task of its own (wait_for's)
                # left this handler uncancelled when its client cancelled (grpc.aio 1.85)
                async with asyncio.timeout(wait):
                    first = await anext(incoming, None)
            except DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _not_a_request(exc))
            except TimeoutError:
                raise DeadlineError(
                    f"start: no first request within --optimize-evaluation-seconds ({wait:g} s)"
                ) from None
            if first is None:
                # a client that cancels before its first request ends the requests too, and
                # its cancel reaches this handler a few loop turns later (~0.1 ms): waiting
                # for it (the sleep raises) ends such a call CANCELLED, as its caller made it
                await asyncio.sleep(CANCEL_SETTLE_SECONDS)
                raise ValidationError(
                    "start", "start or resume_run_id in the first request", "an empty stream"
                )
            async for response in self._drive(first, incoming, tenant):
                yield response

    async def _drive(
        self, first: Any, incoming: AsyncIterator[Any], tenant: Tenant
    ) -> AsyncIterator[service_pb2.OptimizeResponse]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, value: Any = None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server stopped
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def on_ask(ask: Ask) -> None:
            post("ask", ask)

        exchange = self._exchange()
        exchange.attach(on_ask)
        try:
            row = await self._begin(first, tenant, exchange)
        except BaseException:
            # the caller left (or the request was refused) while its run was being admitted,
            # which goes on in its thread: the run's first ask then ends it INTERRUPTED at
            # once, instead of holding its slot for the evaluation deadline
            exchange.detach(on_ask, "the caller's Optimize stream broke")
            raise
        run_id = row.run_id
        live = self.service.runs.live(run_id)
        unlisten = None
        if live is not None:
            exchange.cancel = live.cancel
            unlisten = live.listen(lambda: post("poke"))

        async def read() -> None:
            try:
                async for request in incoming:
                    post("request", request)
            except DecodeError as exc:  # garbage mid-run: a bad reply
                post("garbage", ValidationError("request", "an OptimizeRequest message", exc))
            finally:
                post("eof")

        reader = asyncio.ensure_future(read())
        sent = 0
        try:
            yield service_pb2.OptimizeResponse(started=self.service._info(row))
            while live is not None and not live.done:
                event, value = await events.get()
                if event == "ask":
                    response = service_pb2.OptimizeResponse()
                    sent = self._add_records(response, live, sent)
                    _ask_to_wire(value, response.evaluate)
                    yield response
                elif event == "request":
                    self._on_request(value, exchange, run_id)
                elif event == "garbage":
                    exchange.fail(value)
                elif event == "eof":
                    exchange.detach(on_ask, "the caller closed its Optimize stream")
            row = await asyncio.to_thread(self.service._row, run_id, tenant)
            response = service_pb2.OptimizeResponse()
            if live is not None:
                self._add_records(response, live, sent)
            info = await asyncio.to_thread(
                functools.partial(self.service._info, row, True, own=live)
            )
            response.finished.CopyFrom(info)
            yield response
        finally:
            exchange.detach(on_ask, "the caller's Optimize stream broke")
            reader.cancel()
            if unlisten is not None:
                unlisten()

    async def _begin(self, first: Any, tenant: Tenant, exchange: Exchange) -> Any:
        """The stored row of the run the first request starts or resumes on `exchange`."""
        kind = first.WhichOneof("kind")
        if kind == "start":
            return await asyncio.to_thread(self._start, first.start, tenant, exchange)
        if kind == "resume_run_id":
            caller = first.resume_capabilities if first.HasField("resume_capabilities") else None
            return await self._resume(first.resume_run_id, tenant, exchange, caller)
        raise ValidationError(
            "start",
            "start or resume_run_id in the first request",
            f"a first request with {kind or 'neither'}",
        )

    @staticmethod
    def _add_records(response: Any, live: LiveRun, sent: int) -> int:
        """The records since `sent`, durable or not yet: the caller driving the run sees
        each step before its next evaluation (its callback may stop the run there)."""
        records = live.records_since(sent)
        codec.add_records(response.records, records)
        return sent + len(records)

    def _on_request(self, request: Any, exchange: Exchange, run_id: str) -> None:
        """A caller message mid-run: values for the pending ask, or stop (true ends the run,
        CANCELLED; false asks for nothing and is ignored). Any flaw fails the run, its message
        naming the field."""
        kind = request.WhichOneof("kind")
        if kind == "stop":
            if request.stop:
                self.service.runs.cancel(run_id, "its caller's stop request")
            return
        try:
            if kind != "evaluation":
                raise ValidationError(
                    "evaluation", "evaluation or stop after the first request", kind
                )
            wire = request.evaluation
            exchange.answer(wire.request_id, lambda ask: _answer_from_wire(wire, ask))
        except ValidationError as exc:
            exchange.fail(exc)


def _not_a_request(error: Exception) -> str:
    name = service_pb2.OptimizeRequest.DESCRIPTOR.full_name
    return f"request: not a valid {name} message ({error})"


def _vectors_per_ask(options: Any, caps: Capabilities, n: int) -> int:
    """The most product vectors one ask carries: n for a dense matrix built from products,
    one for a CG product, none for the caller's Hessian or a gradient method."""
    if options.method in HESSIAN_FREE_METHODS:
        return 1
    if options.method in DENSE_METHODS:
        return n if dense_source(caps, n, options.curvature) in ("hvp", "gauss_newton") else 0
    return 0


def _ask_to_wire(ask: Ask, out: Any) -> None:
    out.request_id = ask.request_id
    out.point.CopyFrom(codec.encode_tensor(ask.point))
    out.loss, out.gradient, out.hessian = ask.loss, ask.gradient, ask.hessian
    if ask.hvp_vectors is not None:
        out.hvp_vectors.CopyFrom(codec.encode_tensor(ask.hvp_vectors))
    if ask.gn_vectors is not None:
        out.gn_vectors.CopyFrom(codec.encode_tensor(ask.gn_vectors))


def _quantity(wire: Any, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A required tensor of the reply: present, finite, floating point and of exactly `shape`
    (no reshaping: a transposed or flattened reply is refused), in the run's `dtype`."""
    field = f"evaluation.{name}"
    if not wire.HasField(name):
        raise ValidationError(field, f"a tensor of shape {list(shape)} (it was asked)", "none")
    t = codec.decode_tensor(getattr(wire, name), field, floating=True)
    if tuple(t.shape) != shape:
        raise ValidationError(
            field, f"a tensor of shape {list(shape)} (as asked)", f"shape {list(t.shape)}"
        )
    out = t.to(dtype)
    if out.dtype != t.dtype and not all_finite(out):
        name = str(dtype).removeprefix("torch.")
        raise ValidationError(
            field,
            f"finite values in {name}, the run's dtype",
            f"values up to {float(t.abs().max()):.3g}, which overflow {name}",
        )
    return out


def _answer_from_wire(wire: Any, ask: Ask) -> Answer:
    """The Answer to `ask` from the caller's Evaluation; ValidationError naming the field."""
    if ask.loss and not wire.HasField("loss"):
        raise ValidationError("evaluation.loss", "the loss (it was asked)", "none")
    n, dtype = ask.point.numel(), ask.point.dtype
    answer = Answer(wire.loss if ask.loss else math.nan)
    if ask.loss and not math.isfinite(answer.loss):
        # a diverged point: the engine rejects the trial or stops NON_FINITE; the other
        # quantities there are not read (they may well be NaN too)
        nan = torch.full((n,), math.nan, dtype=dtype)
        answer.gradient = nan if ask.gradient else None
        answer.hessian = torch.full((n, n), math.nan, dtype=dtype) if ask.hessian else None
        if ask.hvp_vectors is not None:
            answer.hvps = torch.full(tuple(ask.hvp_vectors.shape), math.nan, dtype=dtype)
        if ask.gn_vectors is not None:
            answer.gn_products = torch.full(tuple(ask.gn_vectors.shape), math.nan, dtype=dtype)
        return answer
    if ask.gradient:
        answer.gradient = _quantity(wire, "gradient", (n,), dtype)
    if ask.hessian:
        answer.hessian = _quantity(wire, "hessian", (n, n), dtype)
    if ask.hvp_vectors is not None:
        answer.hvps = _quantity(wire, "hvps", tuple(ask.hvp_vectors.shape), dtype)
    if ask.gn_vectors is not None:
        answer.gn_products = _quantity(wire, "gn_products", tuple(ask.gn_vectors.shape), dtype)
    return answer
