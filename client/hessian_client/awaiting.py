"""The caller's `async def` functions for minimize_async / least_squares_async.

The session answering the server is synchronous code that calls the caller's functions. With
async ones it runs on a daemon thread of its own (not the loop's default executor, which the
caller's coroutines may need themselves: `asyncio.to_thread` inside `fun` would wait for a
worker held by the session), and each coroutine runs on the caller's loop while that thread
waits for it. Cancelling the call cancels the coroutine in flight and calls no function
after it; a loop closed under the call releases the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import queue
import threading
from collections.abc import Callable
from typing import Any

WAKE_SECONDS = 0.25  # how often a waiting thread looks whether its call was abandoned


def is_async(function: Any) -> bool:
    """Whether calling `function` makes a coroutine: an async def function, a partial of
    one, or an object whose __call__ is one."""
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        type(function).__call__
    )


def _settle(done: asyncio.Future, outcome: BaseException | None, value: Any) -> None:
    if done.done():  # the awaiting task was cancelled meanwhile
        return
    if outcome is None:
        done.set_result(value)
    else:
        done.set_exception(outcome)


class LoopBridge:
    """One session's worker thread, and its way back to the caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = False
        self._pending: concurrent.futures.Future | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="hessian-minimize", daemon=True).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, args, done = job
            outcome, value = None, None
            try:
                value = function(*args)
            except StopIteration as exc:  # a future cannot hold one (asyncio refuses it)
                outcome = RuntimeError("the caller's function raised StopIteration")
                outcome.__cause__ = exc
            except BaseException as exc:
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop was closed meanwhile
                self.loop.call_soon_threadsafe(_settle, done, outcome, value)

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the session's thread, awaited on the loop."""
        done = self.loop.create_future()
        self._jobs.put((function, args, done))
        return await done

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """From the session's thread: the coroutine `function(*args)` run on the loop,
        waited for; CancelledError once the call was cancelled or the loop closed."""
        if self.closed:
            raise asyncio.CancelledError("minimize_async was cancelled")
        future = asyncio.run_coroutine_threadsafe(function(*args), self.loop)
        self._pending = future
        try:
            while True:
                try:
                    return future.result(timeout=WAKE_SECONDS)
                except concurrent.futures.TimeoutError:
                    if self.closed or self.loop.is_closed():
                        future.cancel()
                        raise asyncio.CancelledError("minimize_async was cancelled") from None
                except concurrent.futures.CancelledError:
                    raise asyncio.CancelledError("minimize_async was cancelled") from None
        finally:
            self._pending = None

    def callback(self, function: Callable[..., Any], *args: Any) -> Any:
        """`call` for the callback: its StopIteration (the way to stop a run) comes out as
        one, though Python turns it into a RuntimeError on leaving the coroutine."""
        try:
            return self.call(function, *args)
        except RuntimeError as exc:
            if isinstance(exc.__cause__, StopIteration):
                raise exc.__cause__ from None
            raise

    def close(self) -> None:
        """No function is called after this; the coroutine in flight is cancelled."""
        self.closed = True
        pending = self._pending
        if pending is not None:
            pending.cancel()
        self._jobs.put(None)
