"""`hessian_client.aio.Client`: the same API as `hessian_client.Client` on grpc.aio.

Every call is awaited (`await client.newton_step(...)`); a run's records are an async
iterator (`async for record in run.stream()`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from .client import (
    _DEFAULT,
    DEFAULT_MAX_MESSAGE_BYTES,
    _Api,
    _RunBase,
    _wait_seconds,
    _Watch,
    _watched,
    call_error,
    check_fits,
    records_frame,
)
from .errors import Cancelled, FailedPrecondition, HessianError
from .results import RunInfo, RunResult, StepRecord, WireRunInfo

__all__ = ["Client", "Run"]


class Client(_Api):
    """An asyncio connection to a hessian server (create it inside a running event loop)."""

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        token: str | None = None,
        timeout: float | None = 60.0,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        root_certificates: bytes | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        try:
            self._connect(
                aio, address, token, timeout, max_message_bytes, root_certificates, ca_file
            )
        except RuntimeError as exc:  # grpc.aio found no event loop to bind the channel to
            raise FailedPrecondition(
                f"client: make an aio.Client inside the event loop that uses it (in an async "
                f"function); there is none here ({exc})",
                field="client",
            ) from None
        # the loop grpc.aio bound the channel to when it was made: the running one, else the
        # thread's default loop (a module-level client, then asyncio.run(main()): another)
        self._loop: asyncio.AbstractEventLoop | None = getattr(self._channel, "_loop", None)

    def _check_loop(self) -> None:
        """Refuse a call from another event loop than the channel's (grpc.aio's channel is
        bound to its loop: asyncio raised "Future attached to a different loop")."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            raise FailedPrecondition(
                "client: this aio.Client belongs to the event loop it was created in (a "
                "client made outside any, to the thread's default loop, not asyncio.run's); "
                "create it inside the loop that uses it, one per loop (or use the sync Client)",
                field="client",
            )

    async def close(self) -> None:
        """Close the channel."""
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def call(self, method: str, request: Any, timeout: Any = _DEFAULT) -> Any:
        """Await unary `method`, turning gRPC errors into typed HessianError subclasses."""
        self._check_loop()
        check_fits(request, self.max_message_bytes)
        try:
            return await getattr(self.stub, method)(
                request, timeout=self._deadline(timeout), metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise call_error(exc, request) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under()
            raise

    def _raise_if_closed_under(self) -> None:
        """A call in flight when close() closed the channel: grpc.aio cancels it, and the
        caller saw asyncio.CancelledError as if its own task had been cancelled (which
        gather and TaskGroup treat otherwise); it gets Cancelled, as the sync client's
        caller does. A task its caller did cancel keeps its CancelledError."""
        task = asyncio.current_task()
        if self._closed and (task is None or not task.cancelling()):
            raise Cancelled(
                "CANCELLED: the client was closed while this call was in flight",
                field="client",
            ) from None

    def _unary(self, method: str, request: Any, timeout: Any, decode: Callable[[Any], Any]) -> Any:
        async def invoke() -> Any:
            return decode(await self.call(method, request, timeout))

        return invoke()

    def _run(self, run_id: str, info: WireRunInfo | None, like: Any) -> Run:
        return Run(self, run_id, RunInfo.from_wire(info) if info is not None else None, like)

    async def _start_watching(self, request: Any, like: Any, timeout: Any = _DEFAULT) -> Run:
        self._check_loop()
        check_fits(request, self.max_message_bytes)
        call = self.stub.StartAndWatchRun(
            request, timeout=self._deadline(timeout), metadata=self.metadata
        )
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server before API 1.2
                return await self._unary("StartRun", request, timeout, self._start_decoder(like))
            raise call_error(exc, request) from None
        except asyncio.CancelledError:
            self._raise_if_closed_under()
            raise
        return _watched(self._run, call, None if first is aio.EOF else first, like)

    def list_runs(
        self, status: str | Sequence[str] = (), page_size: int = 50, *, timeout: Any = _DEFAULT
    ) -> AsyncIterator[RunInfo]:
        """Every run, newest first, filtered by a status name or several (`async for`);
        pages are fetched as needed (`timeout` bounds each page's call). The arguments are
        checked here, not at the first page."""
        return self._pages(self._list_request(status, page_size), timeout)

    async def _pages(self, request: Any, timeout: Any) -> AsyncIterator[RunInfo]:
        while True:
            response = await self.call("ListRuns", request, timeout)
            for r in response.runs:
                yield RunInfo.from_wire(r)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token


class Run(_RunBase):
    """An asyncio handle on a server-side run (the sync `Run`'s API, awaited)."""

    client: Client

    async def stream(
        self,
        from_iteration: int = 0,
        *,
        reconnect_timeout: float = 30.0,
        timeout: float | None = None,
    ) -> AsyncIterator[StepRecord]:
        """Every record from `from_iteration` on, exactly once, until the run ends (see the
        sync `Run.stream`: reconnects after drops, `timeout` bounds the whole stream)."""
        self.client._check_loop()
        watch = _Watch(self, from_iteration, reconnect_timeout, timeout)
        opened = self._take_opened(timeout)
        while True:
            remaining = watch.remaining()
            if watch.expired(remaining):
                if late := watch.overdue(await self._status()):
                    raise late
                remaining = None
            call, opened = opened, None
            reading_opened = call is not None
            try:
                if call is None:
                    call = self.client.stub.WatchRun(
                        watch.request(), timeout=remaining, metadata=self.client.metadata
                    )
                # read(), not async for: StartAndWatchRun's call was read from once already
                while (event := await call.read()) is not aio.EOF:
                    for record in watch.records(event):
                        yield record
                if watch.ended():
                    return
            except grpc.RpcError as exc:
                if watch.timed_out_by(exc, reading_opened) and (
                    late := watch.overdue(await self._status())
                ):
                    raise late from None
            except asyncio.CancelledError:
                self.client._raise_if_closed_under()
                raise
            finally:  # a consumer that stopped early (break, cancel) leaves no WatchRun open
                if call is not None:
                    call.cancel()
            await asyncio.sleep(watch.backoff())

    async def _status(self) -> str:
        try:
            return (await self.client.get_run(self.id)).status
        except HessianError:
            return "running"

    async def wait(self, timeout: float | None = None) -> RunInfo:
        """Until the run ends -> its final info; DeadlineExceeded after `timeout` s."""
        timeout = _wait_seconds(timeout)  # before the call that finds where to start
        start = 0  # StartAndWatchRun's call streams from the first record
        if self._opened is None:
            start = max((await self.client.get_run(self.id)).num_records - 1, 0)
        async for _ in self.stream(start, timeout=timeout):
            pass
        assert self.final is not None
        return self.final

    async def cancel(self, *, timeout: Any = _DEFAULT) -> RunInfo:
        """Ask the server to stop the run before its next iteration."""
        return await self.client.cancel_run(self.id, timeout=timeout)

    async def info(self, *, timeout: Any = _DEFAULT) -> RunInfo:
        """The run's current state."""
        return await self.client.get_run(self.id, timeout=timeout)

    async def result(self, timeout: float | None = None) -> RunResult:
        """Wait for the end (at most `timeout` s), then the final info and parameters (in
        the shape and type they were sent as, when this handle started the run)."""
        await self.wait(timeout)
        return self._result(await self.client.get_run(self.id, include_params=True))

    async def records(self, from_iteration: int = 0) -> list[StepRecord]:
        """Every record from `from_iteration` on (waits for the run to end)."""
        return [r async for r in self.stream(from_iteration)]

    async def records_frame(self, from_iteration: int = 0) -> Any:
        """The run's records as a pandas DataFrame (needs pandas; waits for the end)."""
        return records_frame(await self.records(from_iteration))
