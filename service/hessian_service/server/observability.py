"""Prometheus metrics, one JSON access-log line per RPC, request ids, and safe decoding.

`CallInterceptor` is the server's one interceptor (one coroutine and one wrapper per call,
not one per concern): it refuses a call while draining (drain.py), then one without a valid
token (auth.py), then wraps the handler: it takes the request id from the `x-request-id`
metadata (or makes one) and echoes it in the trailing metadata, counts the call in flight
for the drain, counts it by method and final status code, observes its latency once (a
server or bidi stream at its end, however it ends), and logs one line. It also turns a
request that is not a valid protobuf of the method's type into INVALID_ARGUMENT (gRPC itself
would not).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..store import RunStatus
from .auth import TokenCheck, caller
from .drain import Drain
from .metrics_http import serve_metrics

access_log = logging.getLogger("hessian_service.access")
REQUEST_ID = "x-request-id"
DEADLINE_SLACK_S = 0.02  # a call cancelled this close to its deadline was cancelled by it
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class Metrics:
    """The server's metrics in their own registry (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "hessian_rpcs", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "hessian_rpc_latency_seconds",
            "RPC latency by method (server streams: until the stream ended)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.records = Counter(
            "hessian_records_appended",
            "Step records appended to runs (rate() is iterations per second), by backend",
            ["backend"],
            registry=r,
        )
        self.cancelled = Counter(
            "hessian_cancelled_work",
            "Unary computations stopped by their call's deadline or cancellation (before or "
            "part-way), by method and reason (deadline | cancelled)",
            ["method", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "hessian_run_queue_depth", "Runs admitted but waiting for a worker", registry=r
        )
        self.active_runs = Gauge("hessian_runs_active", "Runs queued or executing", registry=r)
        self.backend = Gauge(
            "hessian_backend_info",
            "1 for the backend requests get by default and whether native is available",
            ["default_backend", "native_available"],
            registry=r,
        )
        self._http: Any = None
        # a record is counted per iteration: its backend's child once, not labels() each time
        self.count_record: Callable[[str], None] = lambda backend: self._record_child(backend).inc()
        self._record_child = functools.cache(self.records.labels)

    def watch_runs(self, queue_depth: Callable[[], int], active: Callable[[], int]) -> None:
        """Read the queue depth and active runs at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.active_runs.set_function(active)

    def watch_store(self, counts: Callable[[], dict[str, int]]) -> None:
        """Expose stored runs by status (hessian_runs{status}) read at scrape time."""
        self.registry.register(_RunsByStatus(counts))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on host:port; returns the port bound."""
        server = serve_metrics(host, port, self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP endpoint."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _RunsByStatus:
    """A collector: stored runs per status, counted by the store when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("hessian_runs", "Stored runs by status", labels=["status"])
        counts = self.counts()
        for status in RunStatus:
            family.add_metric([status], counts.get(status, 0))
        yield family


def _request_id(metadata: Any) -> str:
    """The caller's x-request-id, or a new one where it gave none that can be echoed: a
    value with a byte outside printable ASCII (a tab, UTF-8, sent over raw HTTP/2) failed
    the trailing metadata after the call had run, which the caller saw as INTERNAL."""
    for key, value in metadata or ():
        if key == REQUEST_ID and value:
            text = value if isinstance(value, str) else value.decode("latin-1")
            if text.isascii() and text.isprintable():
                return text[:128]
            break
    return uuid.uuid4().hex


def _code_name(context: grpc.aio.ServicerContext, failed: bool, cancelled: bool) -> str:
    """The final status code of a call, by name, for the metrics and the access log. A call
    cancelled, or answered, at its deadline is what its caller got: DEADLINE_EXCEEDED
    (these said CANCELLED, or OK for an answer ready too late to go out). The caller's
    deadline passes DEADLINE_SLACK_S or so before the server's (which starts when the call
    arrives), and its cancel then comes first."""
    code = context.code()
    if code is None or cancelled:
        remaining = context.time_remaining()
        if (cancelled or not failed) and remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
    if cancelled:
        return grpc.StatusCode.CANCELLED.name
    if code is None:
        code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _BadRequest:
    """Stands in for a request that did not decode; the handler refuses it."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request: not a valid {type_name} message ({error})"


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Any:
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(type_name, "full_name", "request")

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:
            return _BadRequest(name, exc)

    return decode


def _log_rpc(
    method: str, who: tuple[str, str], rid: str, code: str, seconds: float, _context: object
) -> None:
    """The call's one access-log line (a done callback: it runs after the call has ended)."""
    access_log.info(
        "%s %s %.1f ms",
        method,
        code,
        seconds * 1e3,
        extra={
            "fields": {
                "event": "rpc",
                "method": method,
                "code": code,
                "duration_ms": round(seconds * 1e3, 3),
                "request_id": rid,
                "peer": who[0],
                "caller": who[1],
            }
        },
    )


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Drain, then authentication, then metrics, access log and request id for every call.

    Every handler under it is async (app.py serves sync ones through sync_bridge).
    """

    def __init__(
        self, metrics: Metrics | None, drain: Drain | None = None, auth: TokenCheck | None = None
    ) -> None:
        self.metrics = metrics
        self.drain = drain
        self.auth = auth

    def _finish(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        who: tuple[str, str],
        started: float,
        rid: str,
        code: str,
        closed_late: bool = False,
    ) -> None:
        """Count the call now and write its access-log line once the answer has gone out:
        formatting and writing the line is the costliest part of a small call's overhead,
        and the client need not wait for it. `who` is (peer, caller), read when the call
        began: at shutdown grpc may free a cancelled call's core object before its
        handler's cleanup runs, and context.peer() on it then crashes the process.
        `closed_late`: the call ended before this cleanup ran; the line is written now."""
        seconds = time.perf_counter() - started
        short = method.rsplit("/", 1)[-1]
        if self.metrics is not None:
            self.metrics.rpcs.labels(short, code).inc()
            self.metrics.latency.labels(short).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            line = functools.partial(_log_rpc, method, who, rid, code, seconds)
            if closed_late:  # grpc runs no done callback added now: the line was lost
                line(context)
            else:
                context.add_done_callback(line)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        drain = self.drain
        if drain is not None and drain.refuses(method):
            return drain.refusal(handler)  # neither counted nor logged
        if self.auth is not None:
            handler = self.auth.admit(handler, handler_call_details)
        counted = drain if drain is not None and drain.counts(method) else None
        rid = _request_id(handler_call_details.invocation_metadata)

        @contextlib.asynccontextmanager
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            """Request id, refusal of an undecodable request, and one count/log at the end."""
            started = time.perf_counter()
            who = (context.peer(), caller(context))
            failed, cancelled, closed_late = True, False, False
            if counted is not None:
                counted.enter()
            try:
                context.set_trailing_metadata(((REQUEST_ID, rid),))
                if isinstance(request, _BadRequest):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield
                failed = False
            except (asyncio.CancelledError, GeneratorExit) as exc:
                cancelled = True  # the client went away, its deadline passed, or shutdown
                # a stream's generator closed (by asyncio's finaliser) once its call had
                # ended: cancelled while grpc was sending, outside the handler
                closed_late = isinstance(exc, GeneratorExit)
                raise
            except grpc.aio.AbortError:
                failed = False  # context.code() holds the status it ended with
                raise
            finally:
                code = _code_name(context, failed, cancelled)
                self._finish(context, method, who, started, rid, code, closed_late)
                if counted is not None:
                    counted.leave()

        if handler.request_streaming and not handler.response_streaming:
            # no client-streaming RPC here: a refusal (auth.TokenCheck), which never reads
            inner_refusal = handler.stream_unary

            async def refused(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with observed(None, context):
                    return await inner_refusal(requests, context)

            return handler._replace(stream_unary=refused)
        if handler.request_streaming:  # bidi (Optimize): its handler decodes its own requests
            inner_bidi = handler.stream_stream

            async def bidi(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with observed(None, context):
                    async for item in inner_bidi(requests, context):
                        yield item

            return handler._replace(stream_stream=bidi)

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with observed(request, context):
                    items = inner_stream(request, context)
                    if inspect.isawaitable(items):  # it writes with context.write (health Watch)
                        await items
                        return
                    async for item in items:
                        yield item

            return handler._replace(
                unary_stream=stream,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
            )

        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with observed(request, context):
                return await inner(request, context)

        return handler._replace(
            unary_unary=unary,
            request_deserializer=_safe_deserializer(handler.request_deserializer),
        )
