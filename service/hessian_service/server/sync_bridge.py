"""Serve a servicer's synchronous handlers from grpc.aio: each call runs on a thread pool.

grpc.aio's own fallback for sync handlers (`migration_thread_pool`) gives them a context
without `is_active()` whose `add_callback` callbacks run only after a normal return (not when
the client goes away or the deadline passes). `asyncify` wraps each sync unary method in a
coroutine that runs it on the event loop's default executor with a `SyncContext`, which has
the synchronous `grpc.ServicerContext` API with its usual meaning.

A method marked `inline_when(cheap)` runs on the event loop itself when `cheap(servicer,
request)` says so: the two thread hand-offs (loop -> pool -> loop) cost more than a tiny
step, and under load each waits for a core. Only work that is short and needs no waiting
on anything but a local lock may be marked cheap; everything else keeps the pool.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import grpc


class SyncContext:
    """The sync ServicerContext API over a grpc.aio context, for a handler on a pool thread.

    `is_active()` turns False and `add_callback` callbacks run once the call has ended in
    any way: answered, aborted, cancelled by the client, or past its deadline.
    """

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        context.add_done_callback(self._on_done)

    def _on_done(self, _context: object) -> None:
        """Run the callbacks (and any they register), then turn is_active() False: a handler
        that sees the call ended can rely on its callbacks having run."""
        try:
            while True:
                with self._lock:
                    callbacks, self._callbacks = self._callbacks, []
                    if not callbacks:  # ended with none left: add_callback refuses from now
                        self._ended = True
                        return
                for callback in callbacks:
                    callback()
        finally:  # also after a failing callback: the call has ended all the same
            with self._lock:
                self._ended = True

    def is_active(self) -> bool:
        """False once the call has ended (answered, aborted, cancelled or expired)."""
        with self._lock:
            return not self._ended

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends; False (not registered) if it already has."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def time_remaining(self) -> float | None:
        """Seconds until the call's deadline, or None without one."""
        return self._context.time_remaining()

    def cancel(self) -> None:
        """Not supported on the server side of grpc.aio."""
        raise NotImplementedError("a server handler cannot cancel its own call")

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        """End the call with `code` and `details`; raises, like the sync API."""
        future = asyncio.run_coroutine_threadsafe(
            self._context.abort(code, details, tuple(trailing_metadata)), self._loop
        )
        future.result()

    def abort_with_status(self, status: grpc.Status) -> None:
        """End the call with a grpc.Status; raises."""
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        """Send the initial metadata now."""
        asyncio.run_coroutine_threadsafe(
            self._context.send_initial_metadata(metadata), self._loop
        ).result()

    def __getattr__(self, name: str) -> Any:
        """Everything else (metadata, codes, peer, auth) reads or sets plain call state."""
        return getattr(self._context, name)


class _Aborted(grpc.aio.AbortError):
    """An inline handler's abort, carried out of the handler to be awaited on the loop."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)


class InlineContext(SyncContext):
    """SyncContext for a handler running on the event loop: it must not wait for the loop,
    so `abort` raises the status for the coroutine around the handler to send."""

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        """End the call with `code` and `details` (sent once the handler has returned)."""
        raise _Aborted(code, details, trailing_metadata)

    def send_initial_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        """Not available to a handler run on the loop (it would wait for the loop)."""
        raise NotImplementedError("send_initial_metadata: not available to an inline handler")


def inline_when(
    cheap: Callable[[Any, Any, Any], bool],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a sync unary servicer method to run on the event loop when `cheap(servicer,
    request, context)` is true (it runs on the loop too, so it must itself be quick and not
    block: no store read, no lock a committing thread may hold)."""

    def mark(method: Callable[..., Any]) -> Callable[..., Any]:
        method.inline_when = cheap  # type: ignore[attr-defined]
        return method

    return mark


def _run_on_pool(
    method: Callable[[Any, Any], Any], cheap: Callable[[Any, Any], bool] | None = None
) -> Callable[..., Any]:
    """A coroutine handler running the sync unary `method` on the loop's default executor,
    or on the loop itself for a request `cheap` accepts."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        if cheap is not None and cheap(request, context):
            try:
                return method(request, InlineContext(context, loop))
            except _Aborted as stop:
                await context.abort(stop.code, stop.details, stop.trailing_metadata)
        return await loop.run_in_executor(None, method, request, SyncContext(context, loop))

    handler.__name__ = getattr(method, "__name__", "handler")
    return handler


def asyncify(servicer: object, service: Any) -> types.SimpleNamespace:
    """`servicer` with each sync method of `service` (a ServiceDescriptor) made a coroutine.

    Async methods (coroutines, async generators) are kept as they are; a sync streaming
    method is refused, since it would hold a pool thread for the whole stream.
    """
    methods: dict[str, Any] = {}
    for rpc in service.methods:
        method = getattr(servicer, rpc.name)
        if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
            methods[rpc.name] = method
        elif rpc.server_streaming or rpc.client_streaming:
            raise TypeError(f"{rpc.full_name}: a streaming handler must be async")
        else:
            cheap = getattr(method, "inline_when", None)
            cheap = functools.partial(cheap, servicer) if cheap is not None else None
            methods[rpc.name] = _run_on_pool(method, cheap)
    return types.SimpleNamespace(**methods)
