"""Graceful drain: once stopping, new calls get UNAVAILABLE at once; in-flight ones finish.

grpc.aio's own `server.stop(grace)` stops dispatching new calls but leaves them waiting
unanswered until the grace ends (measured: a GetServerInfo during a 120 s drain waited out
its deadline). `Drain` counts the calls in flight and, once `begin()` is called, refuses
every new call but the health check, so a client (or a load balancer) can retry elsewhere
while the in-flight calls finish. The server's one interceptor
(observability.CallInterceptor) applies it before anything else.
"""

from __future__ import annotations

import asyncio

import grpc

from .errors import refusal

OPEN_DURING_DRAIN = ("/grpc.health.v1.Health/",)
DRAINING = "the server is draining (shutting down); retry on another replica"


class Drain:
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

    def enter(self) -> None:
        """A counted call began."""
        self.in_flight += 1

    def leave(self) -> None:
        """A counted call ended (wakes `wait_idle` at zero)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def refuses(self, method: str) -> bool:
        """Whether a new call of `method` is refused now (health stays open)."""
        return self.draining and not method.startswith(OPEN_DURING_DRAIN)

    def counts(self, method: str) -> bool:
        """Whether a call of `method` is counted in flight (every one but health)."""
        return not method.startswith(OPEN_DURING_DRAIN)

    def refusal(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` answering UNAVAILABLE: the server is draining."""
        return refusal(handler, DRAINING, grpc.StatusCode.UNAVAILABLE)
