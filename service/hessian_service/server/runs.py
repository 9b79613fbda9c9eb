"""Run execution: a bounded worker pool, live record buffers that watchers wait on, the store.

A run's records go to its LiveRun (in memory) and to the store (batched). Watchers are
shown a record only once the store reports it committed (its commit listener), so every
record a client has received survives a crash. When the run ends its final state is
committed before watchers are woken, so a watcher that arrives after the LiveRun is gone
reads everything from the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
import torch

from ..engine import CancelToken, Checkpoint, MethodOptions, Run, StepRecord, StopCriteria
from ..engine.cancel import Cancelled
from ..engine.errors import EngineError
from ..engine.objectives.base import Objective
from ..engine.records import StopReason
from ..engine.solvers.asktell import CallerLost
from ..engine.solvers.methods import check_supported
from ..store import (
    ACTIVE_STATUSES,
    ANONYMOUS_OWNER,
    LeaseLostError,
    RunNotFoundError,
    RunRow,
    RunStateError,
    RunStore,
    StoreClosedError,
    StoredCheckpoint,
    StoreError,
)
from .errors import ConflictError, LimitError
from .threads import ThreadPolicy


class Leases(Protocol):
    """What a run manager asks of the replica's lease keeper (server/failover.LeaseKeeper)."""

    def hold(self, live: LiveRun, acquired: bool = False) -> None: ...
    def release(self, run_id: str) -> None: ...
    def hand_over(self, run_id: str) -> bool: ...
    def holds(self, run_id: str) -> bool: ...
    def abandon(self, run_id: str) -> None: ...


log = logging.getLogger(__name__)
FINAL_WRITE_RETRY_DELAYS = (0.05, 0.25, 1.0)  # seconds before each retry of a run's end


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def to_stored(cp: Checkpoint) -> StoredCheckpoint:
    """A checkpoint as bytes for the store."""
    params = cp.params.detach().cpu().contiguous()
    return StoredCheckpoint(
        iteration=cp.iteration,
        dtype=str(params.dtype).removeprefix("torch."),
        shape=list(params.shape),
        params=params.numpy().astype(params.numpy().dtype.newbyteorder("<")).tobytes(),
        state={k: float(v) for k, v in cp.state.items()},
    )


def from_stored(cp: StoredCheckpoint) -> Checkpoint:
    """An engine checkpoint from the store's bytes."""
    dtype = np.dtype(cp.dtype).newbyteorder("<")
    array = np.frombuffer(cp.params, dtype=dtype).astype(dtype.newbyteorder("="))
    return Checkpoint(cp.iteration, torch.from_numpy(array).reshape(cp.shape), dict(cp.state))


class LiveRun:
    """An executing (or queued) run's in-memory records from `base` on, and its cancel token.

    Watchers do not wait on a thread: they `listen` with a callback (called from the thread
    that committed records or ended the run) and read `committed_from` when it fires.
    """

    def __init__(self, run_id: str, base: int, owner: str = "") -> None:
        self.run_id = run_id
        self.base = base
        self.owner = owner
        self.cancel = CancelToken()
        self.shutdown = False
        self.lost = False  # its lease is gone: another replica may execute it now
        self.started = False
        self.records: list[StepRecord] = []
        self.durable = 0
        self.error: StoreError | None = None
        self.done = False
        self.cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()

    def _notify(self) -> None:
        """Call every listener (outside the lock: a listener may be slow or re-enter)."""
        with self.cond:
            self.cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` whenever records are committed or the run ends; returns the undo."""
        with self.cond:
            self._listeners.add(listener)
        return lambda: self._unlisten(listener)

    def _unlisten(self, listener: Callable[[], None]) -> None:
        with self.cond:
            self._listeners.discard(listener)

    @property
    def watchers(self) -> int:
        """How many listeners wait on this run now."""
        with self.cond:
            return len(self._listeners)

    def acknowledge(self, iteration: int) -> None:
        """The store committed every record up to `iteration`: watchers may see them."""
        with self.cond:
            durable = min(len(self.records), iteration - self.base + 1)
            if durable <= self.durable:
                return
            self.durable = durable
        self._notify()

    def append(self, record: StepRecord) -> None:
        """Buffer one record. Watchers see records once durable, so only `acknowledge` (and
        `finish`) wake them: a wake-up per record costs the run a GIL hand-off per iteration."""
        with self.cond:
            self.records.append(record)

    def finish(self) -> None:
        """Mark the run ended and wake every watcher."""
        with self.cond:
            self.done = True
        self._notify()

    def committed_from(self, index: int) -> tuple[list[StepRecord], bool]:
        """Committed records from list index `index` on (now, no wait), and whether that is all."""
        with self.cond:
            return self.records[index : self.durable], self.done and self.durable <= index

    @property
    def last_record(self) -> StepRecord | None:
        """The newest committed record."""
        with self.cond:
            return self.records[self.durable - 1] if self.durable else None


class RunManager:
    """Starts, resumes, cancels and stops runs on a bounded worker pool."""

    def __init__(
        self,
        store: RunStore,
        *,
        workers: int,
        max_concurrent_runs: int,
        checkpoint_every: int,
        max_runs_per_owner: int = 0,
        on_record: Callable[[str], None] | None = None,
        threads: ThreadPolicy | None = None,
    ) -> None:
        self.store = store
        self.threads = threads
        self.max_concurrent_runs = max_concurrent_runs
        self.max_runs_per_owner = max_runs_per_owner
        self.checkpoint_every = checkpoint_every
        self.on_record = on_record
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="hessian-run")
        self._live: dict[str, LiveRun] = {}
        # runs that stopped but whose end the store refused: their rows still say QUEUED or
        # RUNNING, so they are reported (and resumable) as INTERRUPTED with this message
        self._orphans: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.leases: Leases | None = None  # set for a store shared by replicas
        self._commit_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, Any]]] = {}
        store.add_commit_listener(self._on_commit)

    def _on_commit(self, committed: dict[str, int]) -> None:
        for run_id, iteration in committed.items():
            live = self.live(run_id)
            if live is not None:
                live.acknowledge(iteration)
        with self._lock:
            woken = [w for run_id in committed for w in self._commit_waiters.pop(run_id, [])]
        for loop, future in woken:
            loop.call_soon_threadsafe(_resolve, future)

    async def committed(self, run_id: str, timeout: float) -> None:
        """Wait (holding no thread) until the store reports a record commit of `run_id`, by
        this replica or, on a shared store, by another one; at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._commit_waiters.setdefault(run_id, []).append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                waiters = self._commit_waiters.get(run_id, [])
                if (loop, future) in waiters:
                    waiters.remove((loop, future))
                if not waiters:
                    self._commit_waiters.pop(run_id, None)

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun (no new runs are admitted)."""
        with self._lock:
            return self._stopping

    def queue_depth(self) -> int:
        """Runs admitted but not yet executing (waiting for a worker)."""
        with self._lock:
            return sum(not live.started for live in self._live.values())

    def live(self, run_id: str) -> LiveRun | None:
        """The LiveRun of a queued or executing run, or None."""
        with self._lock:
            return self._live.get(run_id)

    def active_count(self) -> int:
        """Runs queued or executing."""
        with self._lock:
            return len(self._live)

    def _admit(self, run_id: str, base: int, owner: str) -> LiveRun:
        with self._lock:
            if self._stopping:
                raise ConflictError("server", "shutting down; no new runs")
            if run_id in self._live:
                raise ConflictError("run_id", f"run {run_id} is already executing")
            if len(self._live) >= self.max_concurrent_runs:
                raise LimitError(
                    "max_concurrent_runs",
                    f"{len(self._live)} runs are queued or running, the server's limit; "
                    "retry later",
                )
            mine = sum(live.owner == owner for live in self._live.values())
            if self.max_runs_per_owner and mine >= self.max_runs_per_owner:
                raise LimitError(
                    "max_runs_per_token",
                    f"this token already has {mine} runs queued or running, the server's "
                    "per-token limit; wait for one to end or cancel one",
                )
            live = LiveRun(run_id, base, owner)
            self._live[run_id] = live
            return live

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._live.pop(run_id, None)

    def start(
        self,
        *,
        problem_id: str,
        objective: Objective,
        params: torch.Tensor,
        options: MethodOptions,
        stopping: StopCriteria,
        name: str = "",
        owner: str = ANONYMOUS_OWNER,
        method_note: str = "",
        remote: dict[str, Any] | None = None,
    ) -> RunRow:
        """Record a new run (QUEUED, with its starting checkpoint) and queue it.

        `method_note` (why method auto chose the options' method) is kept in the spec.
        Options the objective cannot serve are refused here, before anything is stored.
        `remote`: a caller-evaluated run's declaration (asktell), kept in the spec; such a
        run has no stored problem.
        """
        check_supported(objective, options)
        run_id = "r-" + uuid.uuid4().hex
        spec = {"options": asdict(options), "stopping": asdict(stopping)}
        if method_note:
            spec["method_note"] = method_note
        if remote is not None:
            spec["remote"] = remote
        row = RunRow(run_id, problem_id, spec, name=name, created_at=time.time(), owner=owner)
        live = self._admit(run_id, 0, owner)
        try:
            checkpoint = to_stored(Checkpoint(0, params, {}))
            self.store.create_run(row, checkpoint, require_problem=remote is None)
            if self.leases is not None:
                self.leases.hold(live)
            self._submit(live, objective, params, options, stopping, None)
        except BaseException:
            self._forget(run_id)
            raise
        return row

    def resume(self, row: RunRow, objective: Objective, owner: str = "") -> RunRow:
        """Continue an INTERRUPTED run from its latest checkpoint under the same id.

        `row` is as `settle` reports it: an orphan (its row still active) counts as INTERRUPTED.
        """
        if row.status != "INTERRUPTED":
            raise ConflictError("run_id", f"run {row.run_id} is {row.status}, not INTERRUPTED")
        stored = self.store.latest_checkpoint(row.run_id)
        if stored is None and self.store.get_run(row.run_id) is None:
            raise RunNotFoundError(row.run_id)  # deleted since the caller read it
        if stored is None:
            raise ConflictError("run_id", f"run {row.run_id} has no checkpoint to resume from")
        checkpoint = from_stored(stored)
        options = MethodOptions(**row.spec["options"])
        stopping = StopCriteria(**row.spec["stopping"])
        check_supported(objective, options.validated())
        base = row.last_record.iteration + 1 if row.last_record is not None else 0
        live = self._admit(row.run_id, base, owner)
        with self._lock:
            orphan = row.run_id in self._orphans
        try:
            # conditional: DeleteRun or the retention cap may have removed the run meanwhile
            self.store.update_run(
                row.run_id,
                expect_status=("INTERRUPTED", *ACTIVE_STATUSES) if orphan else ("INTERRUPTED",),
                status="QUEUED",
                stop_reason="",
                message="",
            )
            with self._lock:
                self._orphans.pop(row.run_id, None)
            if self.leases is not None:
                self.leases.hold(live)
            self._submit(live, objective, checkpoint.params, options, stopping, checkpoint)
        except BaseException:
            self._forget(row.run_id)
            raise
        row.status, row.stop_reason, row.message = "QUEUED", "", ""
        return row

    def take_over(self, row: RunRow, objective: Objective) -> None:
        """Continue a run whose replica died (this one now holds its lease) from its latest
        checkpoint, under the same id; records it already has are not appended again."""
        stored = self.store.latest_checkpoint(row.run_id)
        if stored is None:
            raise ConflictError("run_id", f"run {row.run_id} has no checkpoint to resume from")
        checkpoint = from_stored(stored)
        options = MethodOptions(**row.spec["options"])
        stopping = StopCriteria(**row.spec["stopping"])
        base = row.last_record.iteration + 1 if row.last_record is not None else 0
        live = self._admit(row.run_id, base, row.owner)
        try:
            if self.leases is not None:
                self.leases.hold(live, acquired=True)
            self._submit(live, objective, checkpoint.params, options, stopping, checkpoint)
        except BaseException:
            self._forget(row.run_id)
            raise

    def settle(self, row: RunRow) -> RunRow:
        """`row` as it really is: an orphan (stopped, end not stored) is INTERRUPTED.

        Writes that status now if the store takes it; otherwise reports it from memory.
        """
        with self._lock:
            message = self._orphans.get(row.run_id)
            if message is not None and row.status not in ACTIVE_STATUSES:
                del self._orphans[row.run_id]  # its end got stored after all (or it was resumed)
        if message is None or row.status not in ACTIVE_STATUSES:
            return row
        try:
            self.store.update_run(
                row.run_id,
                expect_status=ACTIVE_STATUSES,
                status="INTERRUPTED",
                stop_reason="error",
                message=message,
            )
            with self._lock:
                self._orphans.pop(row.run_id, None)
        except (StoreError, RunStateError) as exc:
            log.warning("run %s: its INTERRUPTED status is not stored yet: %s", row.run_id, exc)
        row.status, row.stop_reason, row.message = "INTERRUPTED", "error", message
        return row

    def _submit(self, live: LiveRun, *args: Any) -> None:
        """Queue an admitted run on a worker; if shutdown closed the pool, store it INTERRUPTED."""
        try:
            self._executor.submit(self._execute_limited, live, *args)
        except RuntimeError:  # shutdown() ran after _admit let this run in
            message = "the server shut down before the run started; ResumeRun continues it"
            self._store_end(
                live.run_id,
                {"status": "INTERRUPTED", "stop_reason": "shutdown", "message": message},
            )
            raise ConflictError(
                "server", f"shutting down; run {live.run_id} is stored INTERRUPTED ({message})"
            ) from None

    def _store_end(self, run_id: str, final: dict[str, Any]) -> StoreError | None:
        """Write a run's end, retrying a failing store briefly; if it never takes it, the run
        becomes an orphan (reported INTERRUPTED, resumable). Returns the last store error."""
        error: StoreError | None = None
        for delay in (*FINAL_WRITE_RETRY_DELAYS, None):
            try:
                self.store.update_run(run_id, finished_at=time.time(), **final)
                return None
            except StoreClosedError:
                log.warning(
                    "run %s ended after the store closed: it stays as shutdown stored it", run_id
                )
                return None
            except StoreError as exc:
                error = exc
                if delay is not None:
                    self._retry_pause(run_id, delay)
                if self.leases is not None and not self.leases.holds(run_id):
                    break  # the lease may lapse now: stop, another replica finishes the run
        if self.leases is not None:  # not an orphan: another replica takes it over
            self.leases.abandon(run_id)
            log.error("could not store the end of run %s (its lease lapses): %s", run_id, error)
            return error
        with self._lock:
            self._orphans[run_id] = (
                f"the run stopped but its end could not be stored ({error}); ResumeRun continues it"
            )
        log.error("could not store the end of run %s: %s", run_id, error)
        return error

    def _retry_pause(self, run_id: str, delay: float) -> None:
        """Sleep `delay`, in short slices for a leased run: it ends once the lease is unsafe."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            if self.leases is not None and not self.leases.holds(run_id):
                return
            time.sleep(min(left, 0.05) if self.leases is not None else left)

    def cancel(self, run_id: str) -> bool:
        """Ask a live run to stop before its next iteration; False if it is not live."""
        live = self.live(run_id)
        if live is None:
            return False
        live.cancel.cancel()
        return True

    def _execute_limited(self, live: LiveRun, objective: Objective, *args: Any) -> None:
        """`_execute` with this worker's torch threads set by the thread policy (if any)."""
        if self.threads is None:
            return self._execute(live, objective, *args)
        with self.threads.limited(objective):
            return self._execute(live, objective, *args)

    def _execute(
        self,
        live: LiveRun,
        objective: Objective,
        params: torch.Tensor,
        options: MethodOptions,
        stopping: StopCriteria,
        resume: Checkpoint | None,
    ) -> None:
        run_id = live.run_id
        final: dict[str, Any] = {
            "status": "FAILED",
            "stop_reason": "error",
            "converged": False,
            "message": "",
        }
        run: Run | None = None
        live.started = True
        try:
            if live.shutdown:
                final.update(status="INTERRUPTED", stop_reason="shutdown")
                final["message"] = "the server shut down before the run started"
                return
            started = time.time()
            run = Run(objective, params, options, stopping, cancel=live.cancel, resume=resume)
            # one commit for both: a run's store writes are a good part of a short job's time
            self.store.update_run(run_id, status="RUNNING", started_at=started, backend=run.backend)
            start = run.start_iteration
            for record in run:
                if live.shutdown and run.stop_reason == StopReason.CANCELLED:
                    # The point a shutdown stopped at is not a record: ResumeRun steps from it.
                    break
                if record.iteration >= live.base:
                    live.append(record)
                    self.store.append_record(run_id, record)
                    if self.on_record is not None:
                        self.on_record(record.backend)
                if record.iteration > start and record.iteration % self.checkpoint_every == 0:
                    self.store.put_checkpoint(run_id, to_stored(run.checkpoint()))
            reason = run.stop_reason
            final.update(
                status="FINISHED",
                stop_reason=reason.value,
                converged=reason.converged,
                message=run.message,
            )
            if reason == StopReason.CANCELLED:
                final["status"] = "CANCELLED"
                if live.shutdown:
                    final.update(status="INTERRUPTED", stop_reason="shutdown")
                    final["message"] = "the server shut down; ResumeRun continues the run"
        except CallerLost as exc:  # an Optimize stream broke or missed its deadline
            final.update(status="INTERRUPTED", stop_reason="error", message=str(exc))
        except Cancelled as exc:  # cancelled while waiting for an Optimize caller
            final.update(status="CANCELLED", stop_reason="cancelled", message=str(exc))
            if live.shutdown:
                final.update(status="INTERRUPTED", stop_reason="shutdown")
        except EngineError as exc:
            final["message"] = str(exc)
        except LeaseLostError as exc:
            live.lost = True
            log.warning("run %s stops here: %s", run_id, exc)
        except StoreError as exc:
            # Its records cannot be committed: stop, drop the uncommitted (never acknowledged)
            # tail and keep the run resumable from its last checkpoint once space returns.
            live.error = exc
            dropped = self.store.discard_queued(run_id)
            final.update(status="INTERRUPTED")
            final["message"] = (
                f"stopped: {exc}; ResumeRun continues the run from its last stored checkpoint"
            )
            level = logging.WARNING if isinstance(exc, StoreClosedError) else logging.ERROR
            log.log(
                level,
                "run %s INTERRUPTED (%d uncommitted records dropped): %s",
                run_id,
                dropped,
                exc,
            )
        except RunStateError as exc:
            final["message"] = f"stopped: {exc}"
            log.warning("run %s stopped: %s", run_id, exc)
        except Exception as exc:
            log.exception("run %s failed with an internal error", run_id)
            final["message"] = f"internal error (a bug): {type(exc).__name__}: {exc}"
        finally:
            if live.lost:  # another replica owns it now: write nothing more
                self.store.discard_queued(run_id)
            else:
                self._store_final(live, run, final)
            live.finish()
            self._forget(run_id)

    def _store_final(self, live: LiveRun, run: Run | None, final: dict[str, Any]) -> None:
        """Store a run's last checkpoint and its end, then give its lease up."""
        run_id = live.run_id
        try:
            # not after a store error: a checkpoint past the last stored record would
            # leave a gap in the records when the run is resumed from it
            if run is not None and run.last_record is not None and live.error is None:
                self.store.put_checkpoint(run_id, to_stored(run.checkpoint()))
        except StoreClosedError:
            pass  # shutdown stored the run's status already; _store_end says so below
        except (StoreError, RunStateError) as exc:
            log.error("could not store the last checkpoint of run %s: %s", run_id, exc)
        handing_over = final.get("stop_reason") == "shutdown" and live.error is None
        if self.leases is not None and handing_over and self.leases.hand_over(run_id):
            log.info("run %s handed over to another replica at shutdown", run_id)
            return
        error = None
        try:
            error = self._store_end(run_id, final)
            live.error = live.error or error
        except RunStateError as exc:
            log.warning("could not store the end of run %s: %s", run_id, exc)
        except Exception:
            log.exception("could not store the end of run %s", run_id)
        if self.leases is not None and error is None:  # else abandoned: the lease lapses
            self.leases.release(run_id)

    def shutdown(self, timeout: float) -> None:
        """Stop accepting runs; stop live ones before their next iteration (records kept)."""
        with self._lock:
            self._stopping = True
            lives = list(self._live.values())
        for live in lives:
            # a run the user already cancelled stays CANCELLED, not INTERRUPTED (resumable)
            live.shutdown = not live.cancel.cancelled
            live.cancel.cancel()
        deadline = time.monotonic() + timeout
        for live in lives:
            with live.cond:
                while not live.done and time.monotonic() < deadline:
                    live.cond.wait(0.1)
        for live in lives:
            if not live.done:  # still inside an iteration: store now what its end will be
                self._store_stop(live)
        self._executor.shutdown(wait=False, cancel_futures=False)

    def _store_stop(self, live: LiveRun) -> None:
        """Mark a run that outlasts shutdown's wait INTERRUPTED (CANCELLED if the user asked)
        while the store is still open: its worker may only finish after the store closes."""
        if live.shutdown:
            final = {"status": "INTERRUPTED", "stop_reason": "shutdown"}
            message = "the server shut down during an iteration; ResumeRun continues the run"
        else:
            final = {"status": "CANCELLED", "stop_reason": "cancelled"}
            message = "cancelled; the server shut down before the iteration ended"
        try:
            self.store.update_run(
                live.run_id, expect_status=ACTIVE_STATUSES, message=message, **final
            )
        except (StoreError, RunStateError) as exc:
            log.warning("could not mark run %s stopped at shutdown: %s", live.run_id, exc)
