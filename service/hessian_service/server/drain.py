"""Graceful drain: once stopping, new calls get UNAVAILABLE at once; in-flight ones finish.

grpc.aio's own `server.stop(grace)` stops dispatching new calls but leaves them waiting
unanswered until the grace ends (measured: a GetServerInfo during a 120 s drain waited out
its deadline). `DrainInterceptor` is the outermost interceptor: it counts the calls in its
handlers and, once `begin()` is called, refuses every new call but the health check, so a
client (or a load balancer) can retry elsewhere while the in-flight calls finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .errors import refusal

OPEN_DURING_DRAIN = ("/grpc.health.v1.Health/",)
DRAINING = "the server is draining (shutting down); retry on another replica"


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts in-flight calls; after `begin()` refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def begin(self) -> None:
        """Refuse new calls from now on (thread-safe: a flag the loop reads)."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no counted call is in flight (on the server's loop); False on timeout."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_DURING_DRAIN):
            return handler
        if self.draining:
            return refusal(handler, DRAINING, grpc.StatusCode.UNAVAILABLE)
        if handler.response_streaming:
            name = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{name: self._counted_stream(getattr(handler, name))})
        name = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{name: self._counted_call(getattr(handler, name))})

    def _counted_call(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return call

    def _counted_stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._enter()
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._leave()

        return stream
