"""Run execution: a bounded worker pool, live record buffers that watchers wait on, the store.

A run's records go to its LiveRun (in memory) and to the store (batched). Watchers are
shown a record only once the store reports it committed (its commit listener), so every
record a client has received survives a crash. When the run ends its final state is
committed before watchers are woken, so a watcher that arrives after the LiveRun is gone
reads everything from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch

from ..engine import (
    CancelToken,
    Checkpoint,
    MethodOptions,
    Run,
    StepRecord,
    StopCriteria,
    resolve_method,
)
from ..engine.cancel import Cancelled
from ..engine.errors import EngineError, ResourceLimitError, clip
from ..engine.objectives.base import Objective
from ..engine.options import check_dtype_range, check_method_budget
from ..engine.records import StopReason
from ..engine.solvers.asktell import CallerLost, RemoteObjective
from ..engine.solvers.methods import check_supported
from ..engine.solvers.sampling import generator, initial_params
from ..store import (
    ACTIVE_STATUSES,
    ANONYMOUS_OWNER,
    LeaseLostError,
    RunNotFoundError,
    RunRow,
    RunStateError,
    RunStatus,
    RunStore,
    StoreClosedError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
    StoreGoneError,
)
from .errors import ConflictError, DataLossError, LimitError, NotFoundError, require_id
from .threads import ThreadPolicy
from .workers import WorkerLost, WorkerPool


class Leases(Protocol):
    """What a run manager asks of the replica's lease keeper (server/failover.LeaseKeeper)."""

    def hold(self, live: LiveRun, acquired: bool = False) -> None: ...
    def release(self, run_id: str) -> None: ...
    def hand_over(self, run_id: str) -> bool: ...
    def holds(self, run_id: str) -> bool: ...
    def abandon(self, run_id: str) -> None: ...


MAX_RUN_MESSAGE_CHARS = 1024  # a run's closing message as stored (a longer one is cut)
log = logging.getLogger(__name__)
END_FIELDS = ("status", "stop_reason", "converged", "message")  # a run's end, as stored
FINAL_WRITE_RETRY_DELAYS = (0.05, 0.25, 1.0)  # seconds before each retry of a run's end
WATCH_POLL_SECONDS = 0.5  # a watcher of a run executing elsewhere re-reads the store this often


@dataclass(frozen=True)
class InitSpec:
    """A starting point to draw: `distribution` (sampling.initial_params' names) from `seed`."""

    seed: int
    distribution: str = "objective_default"


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class LiveRun:
    """An executing (or queued) run's recent records from `base` on, and its cancel token.

    Watchers do not wait on a thread: they `listen` with a callback (called from the thread
    that committed records or ended the run) and read `committed_from` when it fires.
    Memory stays bounded however long the run: once 2 `KEEP` committed records are held, all
    but the newest `KEEP` are let go (they are in the store), so at most 2 `KEEP` committed
    records (~4 MB) plus the uncommitted ones (at most the store's batch) are held, where a
    run of a million iterations held half a gigabyte; a watcher that far behind reads them
    from the store.
    """

    KEEP = 4096  # committed records kept for watchers that follow closely

    def __init__(self, run_id: str, base: int, owner: str = "") -> None:
        self.run_id = run_id
        self.base = base
        self.owner = owner
        self.cancel = CancelToken()
        self.cancel_cause = ""  # who asked (CancelRun, the Optimize caller's stop), for its end
        self.remote = False  # an Optimize run: executes on the optimize threads, not the pool
        self.shutdown = False
        self.lost = False  # its lease is gone: another replica may execute it now
        self.started = False
        self.submitted = False  # queued on a worker pool (a CancelRun may then end it)
        self.skipped = False  # cancelled while queued: no worker executes it
        self._records: list[StepRecord] = []  # records from list index `dropped` on
        self.dropped = 0  # committed records let go from the front (all in the store)
        self.durable = 0
        self.error: StoreError | None = None
        self.done = False
        self.final_row: RunRow | None = None  # the stored end, read back before `finish`
        self.final: dict[str, Any] | None = None  # the end it stored (None: none stored)
        self.ending = False  # storing its end: commits wake no watcher, `finish` wakes them
        self.cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()

    def ended_as(self, row: RunRow) -> RunRow:
        """`row` (read once this run ended) as this execution stored its end: the run may
        have been admitted again meanwhile (another Optimize stream resumed it, and that may
        have ended too), and the caller who drove it was told "QUEUED" with a success-shaped
        result, where its run had ended INTERRUPTED. An end not stored leaves `row` (the
        store's, settled INTERRUPTED), as its parameters are."""
        if self.final is None:
            return row
        ended = {k: self.final[k] for k in END_FIELDS if k in self.final}
        return replace(row, **ended)

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
            durable = min(self.dropped + len(self._records), iteration - self.base + 1)
            if durable <= self.durable:
                return
            self.durable = durable
            excess = durable - self.KEEP - self.dropped
            if excess >= self.KEEP:  # let go in chunks: a list's front costs O(len) to cut
                del self._records[:excess]
                self.dropped += excess
            if self.ending:  # the last records go out with the end, in one event
                return
        self._notify()

    def append(self, record: StepRecord) -> None:
        """Buffer one record. Watchers see records once durable, so only `acknowledge` (and
        `finish`) wake them: a wake-up per record costs the run a GIL hand-off per iteration."""
        with self.cond:
            self._records.append(record)

    def first_held(self) -> int:
        """The iteration of the oldest record still in memory (earlier ones are in the store)."""
        with self.cond:
            return self.base + self.dropped

    def records_since(self, index: int) -> list[StepRecord]:
        """Every record from list index `index` on, committed or not (an Optimize stream sends
        each before the next evaluation, so it never falls `KEEP` committed records behind)."""
        with self.cond:
            if index < self.dropped:
                raise RuntimeError(f"records from {index} on were let go ({self.dropped} were)")
            return self._records[index - self.dropped :]

    def finish(self) -> None:
        """Mark the run ended and wake every watcher."""
        with self.cond:
            self.done = True
        self._notify()

    def committed_from(self, index: int) -> tuple[list[StepRecord] | None, bool]:
        """Committed records from list index `index` on (now, no wait), and whether they are
        the last (the run ended: nothing more is committed); None when the record at `index`
        was let go (read it from the store)."""
        with self.cond:
            if index < self.dropped:
                return None, False
            return self._records[index - self.dropped : self.durable - self.dropped], self.done

    @property
    def last_record(self) -> StepRecord | None:
        """The newest committed record."""
        with self.cond:
            return self._records[self.durable - self.dropped - 1] if self.durable else None


def require_interrupted(row: RunRow, field: str = "run_id") -> None:
    """Refuse to resume a run that is not INTERRUPTED (as `settle` reports it)."""
    if row.status != RunStatus.INTERRUPTED:
        raise ConflictError(field, f"run {row.run_id} is {row.status}, not INTERRUPTED")


class RunManager:
    """Starts, resumes, cancels and stops runs on a bounded worker pool.

    Optimize runs (the caller evaluates: most of their time is spent waiting for it) run on
    their own threads, at most `max_optimize_runs`, so a slow caller holds no pool worker;
    they count against that limit instead of `max_concurrent_runs`.
    """

    def __init__(
        self,
        store: RunStore,
        *,
        workers: int,
        max_concurrent_runs: int,
        checkpoint_every: int,
        max_optimize_runs: int = 32,
        max_runs_per_owner: int = 0,
        on_record: Callable[[str], None] | None = None,
        threads: ThreadPolicy | None = None,
        max_iterations: int = 0,
        max_stored_runs: int = 0,
        processes: WorkerPool | None = None,
        process_after: float = 0.0,
    ) -> None:
        """`max_iterations`: the cap on a started run's stopping.max_iterations (0: none);
        `max_stored_runs`: the oldest ended runs are deleted past it after each start and
        end (0: all are kept); `processes`: the worker processes runs iterate in (None: on
        the pool's threads; the manager closes them at shutdown); `process_after` (seconds; 0: every
        run starts in a worker): a run that starts while no other is live begins on its
        thread and moves to a worker once it has iterated that long."""
        self.store = store
        self.processes = processes
        self.process_after = process_after
        self.max_iterations = max_iterations
        self.max_stored_runs = max_stored_runs
        self.threads = threads
        self.max_concurrent_runs = max_concurrent_runs
        self.max_runs_per_owner = max_runs_per_owner
        self.checkpoint_every = checkpoint_every
        self.on_record = on_record
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="hessian-run")
        self.max_optimize_runs = max_optimize_runs
        self._optimize_executor = ThreadPoolExecutor(
            max_optimize_runs, thread_name_prefix="hessian-optimize"
        )
        self._live: dict[str, LiveRun] = {}
        # the last created_at given: runs are dated in order even where the wall clock
        # steps back (ListRuns' newest first and retention's oldest first follow it)
        self._last_created = store.newest_created_at()
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

    @contextlib.asynccontextmanager
    async def commit_wake(self, run_id: str) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        """Listen for the store's next commit of `run_id` (records, or on a shared store another
        replica's status change) from entry on; yields `wait(timeout)`, which returns once
        one was reported since entry or after `timeout` seconds. Entering before reading the
        store means a commit between that read and the wait still wakes it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._commit_waiters.setdefault(run_id, []).append((loop, future))

        async def wait(timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)

        try:
            yield wait
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

    def _admit(self, run_id: str, base: int, owner: str, objective: Objective) -> LiveRun:
        remote = isinstance(objective, RemoteObjective)
        with self._lock:
            if self._stopping:
                raise ConflictError("server", "shutting down; no new runs")
            if run_id in self._live:
                raise ConflictError("run_id", f"run {run_id} is already executing")
            same_kind = sum(live.remote == remote for live in self._live.values())
            limit, flag = (
                (self.max_optimize_runs, "max_optimize_runs")
                if remote
                else (self.max_concurrent_runs, "max_concurrent_runs")
            )
            if same_kind >= limit:
                kind = "Optimize runs" if remote else "runs"
                raise LimitError(
                    flag,
                    f"{same_kind} {kind} are queued or running, the server's limit; retry later",
                )
            mine = sum(live.owner == owner for live in self._live.values())
            if self.max_runs_per_owner and mine >= self.max_runs_per_owner:
                raise LimitError(
                    "max_runs_per_token",
                    f"the token this run belongs to already has {mine} runs queued or "
                    "running, the server's per-token limit; wait for one to end or cancel one",
                )
            live = LiveRun(run_id, base, owner)
            live.remote = remote
            self._live[run_id] = live
            return live

    def _forget(self, run_id: str) -> None:
        with self._lock:
            self._live.pop(run_id, None)

    def _retain(self, keep: str) -> None:
        """--max-stored-runs: delete the oldest ended runs past the cap (after each start and
        each end, so the cap holds once runs finish, not only at the next start), never
        `keep`, the run just started or just ended: its client has yet to read its result
        (a short run may already have ended when its start applies the cap)."""
        if self.max_stored_runs:
            try:
                self.store.enforce_retention(self.max_stored_runs, keep=keep)
            except StoreError as exc:  # the next start or end tries again
                log.warning("could not apply --max-stored-runs: %s", exc)

    def _release(self, live: LiveRun) -> None:
        """The run is no longer live here (it ended, or its admission failed): forget it,
        then wake its watchers, who end with its final row or read the store (NOT_FOUND, or
        the row as it stands). In that order: a client that saw the end then finds the run
        no longer counted (active runs, per-token limits)."""
        self._forget(live.run_id)
        live.finish()

    def start(
        self,
        *,
        problem_id: str,
        objective: Objective,
        options: MethodOptions,
        stopping: StopCriteria,
        initial: torch.Tensor | InitSpec | None = None,
        name: str = "",
        owner: str = ANONYMOUS_OWNER,
        hold_problem: Callable[[], AbstractContextManager[None]] | None = None,
        iterations_given: bool = True,
        check_row: Callable[[RunRow], None] | None = None,
    ) -> RunRow:
        """StartRun: refuse criteria over the iteration cap, choose the starting point (the
        given tensor, one drawn by `initial`, else the objective's default from seed 0),
        resolve method auto, refuse a dense method over its memory budget, then launch.
        `iterations_given`: False where the caller left max_iterations to its default (the
        refusal then says so, and what to pass)."""
        check_iteration_limit(self.max_iterations, stopping, iterations_given)
        if isinstance(initial, InitSpec):
            params = initial_params(objective, initial.seed, initial.distribution)
        elif initial is None:
            params = objective.init_params(generator(0))
        else:
            params = initial
        params = objective.check_params(params, "initial_params")
        options, method_note = resolve_method(options, objective.num_params, params.dtype)
        check_method_budget(options, objective.num_params, params.dtype)
        check_dtype_range(options, params.dtype)
        return self.launch(
            problem_id=problem_id,
            objective=objective,
            params=params,
            options=options,
            stopping=stopping,
            name=name,
            owner=owner,
            method_note=method_note,
            hold_problem=hold_problem,
            check_row=check_row,
        )

    def _dated(self) -> float:
        """A created_at after every earlier one: the wall clock, or just past the last."""
        with self._lock:
            self._last_created = max(time.time(), math.nextafter(self._last_created, math.inf))
            return self._last_created

    def launch(
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
        hold_problem: Callable[[], AbstractContextManager[None]] | None = None,
        check_row: Callable[[RunRow], None] | None = None,
    ) -> RunRow:
        """Record a new run (QUEUED, with its starting checkpoint), queue it, then apply the
        stored-runs cap. `check_row` may refuse the run's row before anything is stored (the
        caller's answer, sized with it, would not fit a message).

        `method_note` (why method auto chose the options' method) is kept in the spec, and
        the criteria with the method's defaults filled in (RunInfo shows what the run obeys).
        Options the objective cannot serve are refused here, before anything is stored.
        `remote`: a caller-evaluated run's declaration (asktell), kept in the spec; such a
        run has no stored problem. `hold_problem`: stores the run's problem for its owner and
        keeps it while the run row is written (entered once the run is admitted, so a
        refused run stores nothing).
        """
        check_supported(objective, options)
        run_id = "r-" + uuid.uuid4().hex
        # as run, not as sent: the defaults of the method and of the parameters' dtype
        stopping = stopping.for_method(options.method, objective.compute_dtype(params))
        spec = {"options": asdict(options), "stopping": asdict(stopping)}
        if len(objective.param_shape) > 1:  # GetRun's parameters come back shaped so
            spec["param_shape"] = list(objective.param_shape)
        if method_note:
            spec["method_note"] = method_note
        if remote is not None:
            spec["remote"] = remote
        row = RunRow(run_id, problem_id, spec, name=name, created_at=self._dated(), owner=owner)
        if check_row is not None:
            check_row(row)
        live = self._admit(run_id, 0, owner, objective)
        try:
            checkpoint = StoredCheckpoint.of(Checkpoint(0, params, {}))
            with hold_problem() if hold_problem is not None else contextlib.nullcontext():
                acquired_at = self._leased(
                    run_id,
                    lambda: self.store.create_run(row, checkpoint, require_problem=remote is None),
                )
            self._keep_lease(live, acquired_at)
            self._submit(live, objective, params, options, stopping, None)
        except BaseException:
            self._release(live)
            raise
        self._retain(run_id)
        return row

    def resume(self, row: RunRow, objective: Objective) -> RunRow:
        """Continue an INTERRUPTED run from its latest checkpoint under the same id (and
        owner: watchers of a live run are checked against it).

        `row` is as `settle` reports it: an orphan (its row still active) counts as INTERRUPTED.
        """
        require_interrupted(row)
        stored = self.store.latest_checkpoint(row.run_id)
        if stored is None and self.store.get_run(row.run_id) is None:
            raise RunNotFoundError(row.run_id)  # deleted since the caller read it
        if stored is None:
            raise ConflictError("run_id", f"run {row.run_id} has no checkpoint to resume from")
        checkpoint = stored.checkpoint()
        options = MethodOptions(**row.spec["options"])
        stopping = StopCriteria(**row.spec["stopping"])
        check_supported(objective, options.validated())
        self.store.require_room()  # a full store would stop it again at its first record
        base = row.last_record.iteration + 1 if row.last_record is not None else 0
        live = self._admit(row.run_id, base, row.owner, objective)
        try:
            # conditional: DeleteRun or the retention cap may have removed the run meanwhile
            acquired_at = self._leave_interrupted(
                row.run_id, leased=True, status=RunStatus.QUEUED, stop_reason="", message=""
            )
            self._keep_lease(live, acquired_at)
            self._submit(live, objective, checkpoint.params, options, stopping, checkpoint)
        except BaseException:
            self._release(live)
            raise
        row.status, row.stop_reason, row.message = RunStatus.QUEUED, "", ""
        return row

    def take_over(self, row: RunRow, objective: Objective, acquired_at: float) -> None:
        """Continue a run whose replica died (this one now holds its lease, taken at monotonic
        time `acquired_at`) from its latest checkpoint, under the same id; records it already
        has are not appended again."""
        stored = self.store.latest_checkpoint(row.run_id)
        if stored is None:
            raise ConflictError("run_id", f"run {row.run_id} has no checkpoint to resume from")
        checkpoint = stored.checkpoint()
        options = MethodOptions(**row.spec["options"])
        stopping = StopCriteria(**row.spec["stopping"])
        base = row.last_record.iteration + 1 if row.last_record is not None else 0
        live = self._admit(row.run_id, base, row.owner, objective)
        try:
            self._keep_lease(live, acquired_at)
            self._submit(live, objective, checkpoint.params, options, stopping, checkpoint)
        except BaseException:
            self._release(live)
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
                status=RunStatus.INTERRUPTED,
                stop_reason=StopReason.ERROR,
                message=message,
            )
            with self._lock:
                self._orphans.pop(row.run_id, None)
        except (StoreError, RunStateError) as exc:
            log.warning("run %s: its INTERRUPTED status is not stored yet: %s", row.run_id, exc)
        row.status, row.stop_reason, row.message = RunStatus.INTERRUPTED, StopReason.ERROR, message
        return row

    def get(self, run_id: str, scope: str | None) -> RunRow:
        """The run as `settle` reports it, if a caller of tenant `scope` may see it (None:
        every run); another tenant's run is NOT_FOUND, like a missing one."""
        row = self.store.get_run(require_id("run_id", run_id, "StartRun"))
        if row is None or scope not in (None, row.owner):
            raise NotFoundError("run_id", f"run with id {run_id!r}")
        return self.settle(row)

    async def watch(
        self, run_id: str, scope: str | None, from_iteration: int, page: int
    ) -> AsyncIterator[tuple[list[StepRecord], RunRow | None]]:
        """A run's records from `from_iteration` on, in batches of at most `page` without a
        gap, each as (batch, None), then its final row: ([], row), or (last batch, row) when
        the end comes with the last records (a live run's end; a stored run's last page,
        read with its row on one thread hop). Live records come from its LiveRun as
        they are committed, earlier ones (and those of a run executing elsewhere) from the
        store; waiting holds no thread (store reads run on the default executor), and a run
        live here whose owner is the caller's starts with no store read at all.

        A run may be resumed at any moment, so this loops until the row read after the
        records is final and holds no record past them (for a live run that ended here, the
        row its worker read back right after storing the end).
        """
        nxt = from_iteration
        while True:
            live = self.live(run_id)  # live here and the caller's: no store read, no thread
            if live is None or scope not in (None, live.owner):
                live, row, first, final = await asyncio.to_thread(
                    self._live_then_row, run_id, scope, nxt, page
                )
                if final:  # over, and `first` is the rest: one thread hop for all of it
                    yield first, row
                    return
                if first:
                    yield first, None
                    nxt = first[-1].iteration + 1
            if live is not None:
                # records before the live buffer (a resumed run's history, and committed ones
                # it let go) are in the store
                while nxt < (held := live.first_held()):
                    batch = await asyncio.to_thread(
                        self._stored_page, live.run_id, nxt, page, held - 1
                    )
                    if not batch:
                        if nxt >= live.base:  # let go as committed, yet not in the store
                            await asyncio.to_thread(self._missing, live.run_id, nxt, held - 1)
                        break
                    yield batch, None
                    nxt = batch[-1].iteration + 1
                nxt = max(nxt, live.base)
                async for batch, last in _follow(live, nxt, page):
                    nxt = batch[-1].iteration + 1 if batch else nxt
                    row = live.final_row if last and live.error is None else None
                    # (not if the run was admitted again since: a resumed Optimize run)
                    if row is not None and _ended(row, nxt) and self.live(run_id) in (None, live):
                        yield batch, row
                        return
                    if batch:
                        yield batch, None
                if live.error is not None and nxt >= live.first_held():
                    raise live.error  # every record it committed was sent (none let go unsent)
            else:
                while batch := await asyncio.to_thread(self._stored_page, row.run_id, nxt, page):
                    yield batch, None
                    nxt = batch[-1].iteration + 1
            async with self.commit_wake(run_id) as woken:
                row = await asyncio.to_thread(self.get, run_id, scope)
                if _ended(row, nxt):
                    yield [], row
                    return
                if not _unseen(row, nxt) and self.live(run_id) is None:
                    # active with no live run here: settling, or executing on another replica
                    # (woken by its commits through the shared store's push)
                    await woken(WATCH_POLL_SECONDS)

    def _live_then_row(
        self, run_id: str, scope: str | None, nxt: int, page: int
    ) -> tuple[LiveRun | None, RunRow, list[StepRecord], bool]:
        """(live, row, first, final): the live run (looked up first: one admitted later
        shows as active in the row) and the row; for a run not live here whose row says it
        has ended, also its stored records from `nxt` (one page) and whether they are all
        there is (the row, read again after them, is final and names none past them: a
        run resumed meanwhile is not)."""
        live = self.live(run_id)
        row = self.get(run_id, scope)
        if live is None and row.status in ACTIVE_STATUSES:
            live = self.live(run_id)  # admitted between the lookup and the read
        if live is not None or row.status in ACTIVE_STATUSES:
            return live, row, [], False
        first = self._stored_page(run_id, nxt, page)
        row = self.get(run_id, scope)
        return None, row, first, _ended(row, first[-1].iteration + 1 if first else nxt)

    def _stored_page(
        self, run_id: str, nxt: int, page: int, last: int | None = None
    ) -> list[StepRecord]:
        """Stored records from iteration `nxt` on without a gap (up to `last`, at most `page`
        of them); empty when there are none to send.

        The row is read first: every record up to its last_record was committed before, so
        when iteration `nxt` is not there it was deleted behind the server's back: raise
        DataLossError naming the missing range, rather than re-read forever.
        """
        row = self.store.get_run(run_id)
        stored = row.last_record.iteration if row is not None and row.last_record else -1
        last = stored if last is None else min(last, stored)
        if last < nxt:
            return []
        records = self.store.records(run_id, nxt, min(page, last - nxt + 1))
        present = 0
        while present < len(records) and records[present].iteration == nxt + present:
            present += 1
        if not present:
            self._missing(run_id, nxt, records[0].iteration - 1 if records else last, stored)
        return records[:present]

    def _missing(self, run_id: str, first: int, last: int, stored: int | None = None) -> None:
        """Raise DataLossError for records `first`..`last` (NotFound if the run was deleted);
        `stored`: the last iteration the run's row names (read here when not given)."""
        row = self.store.get_run(run_id)
        if row is None:
            raise NotFoundError("run_id", f"run with id {run_id!r}")  # deleted meanwhile
        if stored is None:
            stored = row.last_record.iteration if row.last_record is not None else -1
        raise DataLossError(
            "run_id",
            f"run {run_id}: the records of iterations {first} to {last} are missing from the "
            f"store, which says the run reached iteration {stored}; the store was damaged",
        )

    def _submit(self, live: LiveRun, *args: Any) -> None:
        """Queue an admitted run on a worker; if shutdown closed the pool, store it INTERRUPTED."""
        try:
            executor = self._optimize_executor if live.remote else self._executor
            with live.cond:
                live.submitted = True
            executor.submit(self._execute_limited, live, *args)
        except RuntimeError:  # shutdown() ran after _admit let this run in
            message = f"the server shut down before the run started; {_resumer(live)}"
            self._store_end(
                live.run_id,
                {
                    "status": RunStatus.INTERRUPTED,
                    "stop_reason": StopReason.SHUTDOWN,
                    "message": message,
                },
            )
            raise ConflictError(
                "server", f"shutting down; run {live.run_id} is stored INTERRUPTED ({message})"
            ) from None

    def _store_end(
        self, run_id: str, final: dict[str, Any], live: LiveRun | None = None
    ) -> StoreError | None:
        """Write a run's end (`live.final` once stored), retrying a failing store briefly; if
        it never takes it, the run becomes an orphan (reported INTERRUPTED, resumable).
        Returns the last store error."""
        error: StoreError | None = None
        for delay in (*FINAL_WRITE_RETRY_DELAYS, None):
            try:
                self.store.update_run(run_id, finished_at=time.time(), **final)
                if live is not None:
                    live.final = final
                return None
            except StoreClosedError:
                log.warning(
                    "run %s ended after the store closed: it stays as shutdown stored it", run_id
                )
                return None
            except StoreError as exc:
                error = exc
                if isinstance(exc, StoreGoneError):
                    break  # its file is gone: no retry can store it (GetRun says so at once)
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

    def cancel(self, run_id: str, cause: str = "") -> bool:
        """Ask a live run to stop before its next iteration; one still queued ends CANCELLED
        now, without an iteration (its worker skips it). False if it is not live. `cause`
        (who asked) ends its stored message."""
        live = self.live(run_id)
        if live is None:
            return False
        live.cancel_cause = live.cancel_cause or cause
        live.cancel.cancel()
        with live.cond:
            # (one not yet submitted, or whose lease is gone, stops at its first iteration)
            if live.started or live.skipped or not live.submitted or live.lost:
                return True
            live.skipped = True
        final = {
            "status": RunStatus.CANCELLED,
            "stop_reason": StopReason.CANCELLED,
            "converged": False,
            # a resumed or taken-over run waiting in the queue has its records already
            "message": "cancelled while queued: no iteration ran"
            if not live.base
            else f"cancelled while queued to continue from iteration {live.base}",
        }
        try:
            self._store_final(live, None, final)
        finally:
            self._release(live)
        return True

    def cancel_interrupted(self, row: RunRow) -> bool:
        """CancelRun of an INTERRUPTED run (`row` as `settle` reports it): it ends CANCELLED,
        never to be resumed, so its problem may go. False when it changed meanwhile (resumed
        or deleted: the store's conditional update decides which of the two came first)."""
        try:
            self._leave_interrupted(
                row.run_id,
                status=RunStatus.CANCELLED,
                stop_reason=StopReason.CANCELLED,
                message="cancelled while interrupted: it will not be resumed",
                finished_at=time.time(),
            )
        except RunStateError:
            return False
        return True

    def _leave_interrupted(self, run_id: str, leased: bool = False, **fields: Any) -> float:
        """Set `fields` on an INTERRUPTED run (as `settle` reports it: an orphan's stored row
        is still active), conditionally on that status (RunStateError when it changed);
        `leased`: and take its lease in the same transaction. Returns the monotonic time the
        transaction began (a lease taken in it runs from then)."""
        with self._lock:
            orphan = run_id in self._orphans
        statuses = (RunStatus.INTERRUPTED, *ACTIVE_STATUSES) if orphan else (RunStatus.INTERRUPTED,)

        def write() -> None:
            self.store.update_run(run_id, expect_status=statuses, **fields)

        if leased:
            began = self._leased(run_id, write)
        else:
            began = time.monotonic()
            write()
        with self._lock:
            self._orphans.pop(run_id, None)
        return began

    def _leased(self, run_id: str, write: Callable[[], None]) -> float:
        """`write` (what makes the run active) and, with replicas, the run's lease in one
        transaction, so no replica ever sees the run active without one (a lease write that
        failed after the row's commit left a QUEUED run nobody would take over or cancel, and
        a replica starting in between marked another's fresh run INTERRUPTED). The queued
        records go first, in a commit of their own: the lease's failure is then the new
        run's alone. Returns the monotonic time the transaction began (the lease's start)."""
        if self.leases is None:
            began = time.monotonic()
            write()
            return began
        self.store.flush()
        began = time.monotonic()
        try:
            with self.store.transaction():
                self.leases.acquire(run_id)  # first: its new fence is the one write() meets
                # a cancel request the run outlived is void; taken under the lease only (a
                # ResumeRun that lost the race consumed the winner's fresh request)
                self.store.take_cancel_requests([run_id])
                write()
        except BaseException:
            self.leases.forget(run_id)  # a fence the rollback left without its lease
            raise
        return began

    def _keep_lease(self, live: LiveRun, acquired_at: float) -> None:
        """With replicas: renew the lease the run's transaction took at `acquired_at`."""
        if self.leases is not None:
            self.leases.hold(live, acquired_at)

    @staticmethod
    def _claim(live: LiveRun) -> bool:
        """Mark a queued run started; False if it was cancelled while queued (skip it)."""
        with live.cond:
            if live.skipped:
                return False
            live.started = True
            return True

    def _execute_limited(self, live: LiveRun, objective: Objective, *args: Any) -> None:
        """`_execute` where the run should iterate: with --run-processes (when the objective
        can go there) in a worker process, or, with `process_after` while no other run is
        live here, on this thread until it has run that long, then in a worker; otherwise
        on this thread. A run iterating here has its torch threads set by the thread policy
        (if any)."""
        if not self._claim(live):
            return None
        if self.processes is not None and self.processes.takes(objective):
            if self.process_after > 0 and self._alone(live):
                log.debug("run %s starts on a server thread", live.run_id)
                with self.processes.moving(self.process_after, live.run_id) as runner:
                    return self._execute_here(live, objective, *args, runner=runner)
            with self.processes.worker() as runner:
                if runner is not None:
                    log.debug("run %s starts in a worker process", live.run_id)
                    return self._execute(live, objective, *args, runner=runner)
        return self._execute_here(live, objective, *args)

    def _alone(self, live: LiveRun) -> bool:
        """Whether `live` is the only run this server executes or has queued (Optimize runs,
        waiting on their callers, aside): a run is forgotten before its watchers learn it
        ended, so a client's next run after the last finds it so."""
        with self._lock:
            return not any(r is not live and not r.remote for r in self._live.values())

    def _execute_here(self, live: LiveRun, objective: Objective, *args: Any, **kw: Any) -> None:
        """`_execute` with this thread's torch threads set by the thread policy (if any)."""
        if self.threads is None:
            return self._execute(live, objective, *args, **kw)
        with self.threads.limited(objective):
            return self._execute(live, objective, *args, **kw)

    def _execute(
        self,
        live: LiveRun,
        objective: Objective,
        params: torch.Tensor,
        options: MethodOptions,
        stopping: StopCriteria,
        resume: Checkpoint | None,
        runner: Callable[..., Run] | None = None,
    ) -> None:
        """Iterate the run (`runner`: a worker process's ProcessRun, or a MovingRun; None: the
        engine's Run, here), storing its records and checkpoints, then its end."""
        run_id = live.run_id
        final: dict[str, Any] = {
            "status": RunStatus.FAILED,
            "stop_reason": StopReason.ERROR,
            "converged": False,
            "message": "",
        }
        run: Run | None = None
        try:
            if live.shutdown:
                final.update(status=RunStatus.INTERRUPTED, stop_reason=StopReason.SHUTDOWN)
                final["message"] = "the server shut down before the run started"
                return
            started = time.time()
            run = (runner or Run)(
                objective, params, options, stopping, cancel=live.cancel, resume=resume
            )
            # one commit for both: a run's store writes are a good part of a short job's time
            self.store.update_run(
                run_id, status=RunStatus.RUNNING, started_at=started, backend=run.backend
            )
            start = run.start_iteration
            for record in run:
                if (live.shutdown or live.lost) and run.stop_reason == StopReason.CANCELLED:
                    # The point a shutdown (or a lost lease) stopped at is not a record: the
                    # run resumes (or another replica continues it) from there
                    break
                if record.iteration >= live.base:
                    live.append(record)
                    self.store.append_record(run_id, record)
                    if self.on_record is not None:
                        self.on_record(record.backend)
                if record.iteration > start and record.iteration % self.checkpoint_every == 0:
                    self.store.put_checkpoint(run_id, StoredCheckpoint.of(run.checkpoint()))
            reason = run.stop_reason
            final.update(
                status=RunStatus.FINISHED,
                stop_reason=reason,
                converged=run.converged,
                message=run.message,
            )
            if reason == StopReason.NON_FINITE and run.last_record is None:
                final["status"] = RunStatus.FAILED  # not finite where it started or resumed
            if reason == StopReason.CANCELLED:
                final["status"] = RunStatus.CANCELLED
                if live.shutdown:
                    final.update(status=RunStatus.INTERRUPTED, stop_reason=StopReason.SHUTDOWN)
                    final["message"] = f"the server shut down; {_resumer(live)}"
        except CallerLost as exc:  # an Optimize stream broke or missed its deadline
            final.update(
                status=RunStatus.INTERRUPTED, stop_reason=StopReason.ERROR, message=str(exc)
            )
        except Cancelled as exc:  # cancelled while waiting for an Optimize caller
            final.update(
                status=RunStatus.CANCELLED, stop_reason=StopReason.CANCELLED, message=str(exc)
            )
            if live.shutdown:
                final.update(status=RunStatus.INTERRUPTED, stop_reason=StopReason.SHUTDOWN)
                final["message"] = (
                    f"the server shut down while the run waited for its caller; {_resumer(live)}"
                )
        except EngineError as exc:
            final["message"] = str(exc)
        except WorkerLost as exc:
            if self.stopping:  # shutdown killed its child inside an iteration
                final.update(_stopped_midway(live))
            elif live.cancel.cancelled:
                final.update(status=RunStatus.CANCELLED, stop_reason=StopReason.CANCELLED)
                final["message"] = f"cancelled; {exc}"
            else:  # killed (out of memory?): resumable from its last stored checkpoint
                final.update(status=RunStatus.INTERRUPTED)
                final["message"] = f"{exc}; {_resumer(live)} from its checkpoint"
                log.error("run %s INTERRUPTED: %s", run_id, exc)
        except LeaseLostError as exc:
            live.lost = True
            log.warning("run %s stops here: %s", run_id, exc)
        except StoreError as exc:
            self._uncommittable(live, exc, final)
        except RunStateError as exc:
            final["message"] = f"stopped: {exc}"
            log.warning("run %s stopped: %s", run_id, exc)
        except Exception as exc:
            log.exception("run %s failed with an internal error", run_id)
            final["message"] = f"internal error (a bug): {type(exc).__name__}: {exc}"
        finally:
            try:
                if live.lost:  # another replica owns it now: write nothing more
                    self.store.discard_queued(run_id)
                else:
                    self._store_final(live, run, final)
            finally:  # whatever storing the end raised, its watchers must not wait forever
                if self.leases is not None:  # nothing more is written for it from here:
                    # its unstored tail (an end that could not be stored) goes with the
                    # fence, else a later flush would write it unfenced for whoever holds
                    # the run now (never acknowledged: a takeover computes it again)
                    self.store.discard_queued(run_id)
                    self.leases.forget(run_id)
                self._release(live)
                self._retain(run_id)

    def _uncommittable(self, live: LiveRun, exc: StoreError, final: dict[str, Any]) -> None:
        """The run's records cannot be committed: it stops, its uncommitted (never
        acknowledged) tail is dropped (a failing batch left queued blocks every write of
        this store), and `final` says INTERRUPTED, resumable from its last stored checkpoint
        once space returns."""
        live.error = exc
        dropped = self.store.discard_queued(live.run_id)
        final.update(status=RunStatus.INTERRUPTED, stop_reason=StopReason.ERROR, converged=False)
        final["message"] = f"stopped: {exc}; {_resumer(live)} from its last stored checkpoint"
        level = logging.WARNING if isinstance(exc, StoreClosedError) else logging.ERROR
        log.log(
            level,
            "run %s INTERRUPTED (%d uncommitted records dropped): %s",
            live.run_id,
            dropped,
            exc,
        )

    def _store_final(self, live: LiveRun, run: Run | None, final: dict[str, Any]) -> None:
        """Store a run's last checkpoint and its end, then give its lease up."""
        run_id = live.run_id
        if final.get("status") == RunStatus.CANCELLED and live.cancel_cause:
            final["message"] = f"{final['message']} (by {live.cancel_cause})"
        final["message"] = clip(final["message"], MAX_RUN_MESSAGE_CHARS)
        # not after a store error: a checkpoint past the last stored record would
        # leave a gap in the records when the run is resumed from it
        last = run is not None and run.last_record is not None and live.error is None
        # an Optimize run's caller streams to this replica: no other can continue it, so it
        # is stored INTERRUPTED (the caller resumes it) instead of handed over
        shutdown = final.get("stop_reason") == StopReason.SHUTDOWN
        handing_over = shutdown and live.error is None and not live.remote
        live.ending = True
        if last and not (handing_over and self.leases is not None):
            try:  # one commit for records, checkpoint and end; on failure, step by step below
                self.store.finish_run(
                    run_id, StoredCheckpoint.of(run.checkpoint()), finished_at=time.time(), **final
                )
            except StoreFullError as exc:
                # its queued records do not fit: every later write of its end would flush
                # them first and fail the same way (the run abandoned, run again elsewhere)
                self._uncommittable(live, exc, final)
                last = False
            except (StoreError, RunStateError):
                pass
            else:
                live.final = final
                # read back here (when someone listens), so the run's watchers end without
                # a store read of their own; a watcher arriving later reads the store
                if live.watchers:
                    with contextlib.suppress(StoreError):
                        live.final_row = self.store.get_run(run_id)
                if self.leases is not None:
                    self.leases.release(run_id)
                return
        try:
            if last:
                self.store.put_checkpoint(run_id, StoredCheckpoint.of(run.checkpoint()))
        except StoreClosedError:
            pass  # shutdown stored the run's status already; _store_end says so below
        except (StoreError, RunStateError) as exc:
            log.error("could not store the last checkpoint of run %s: %s", run_id, exc)
        if self.leases is not None and handing_over and self.leases.hand_over(run_id):
            log.info("run %s handed over to another replica at shutdown", run_id)
            return
        error = None
        try:
            error = self._store_end(run_id, final, live)
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
        self._optimize_executor.shutdown(wait=False, cancel_futures=False)
        if self.processes is not None:
            self.processes.close()

    def _store_stop(self, live: LiveRun) -> None:
        """Mark a run that outlasts shutdown's wait INTERRUPTED (CANCELLED if the user asked)
        while the store is still open: its worker may only finish after the store closes."""
        try:
            self.store.update_run(
                live.run_id, expect_status=ACTIVE_STATUSES, **_stopped_midway(live)
            )
        except (StoreError, RunStateError) as exc:
            log.warning("could not mark run %s stopped at shutdown: %s", live.run_id, exc)


def _resumer(live: LiveRun) -> str:
    """What continues a stopped run: ResumeRun, or for an Optimize run (which ResumeRun
    refuses: its caller evaluates it) Optimize's resume_run_id."""
    if live.remote:
        return "Optimize's resume_run_id (minimize(..., resume=run_id)) continues it"
    return "ResumeRun continues it"


def check_iteration_limit(
    limit: int, stopping: StopCriteria, given: bool, field: str = "stopping.max_iterations"
) -> None:
    """Refuse criteria past the server's --max-iterations (0: none); `given`: whether the
    caller set max_iterations (else the refusal says it is the default, and what to pass)."""
    if not limit or stopping.max_iterations <= limit:
        return
    if given:
        raise ResourceLimitError(
            field, f"{stopping.max_iterations} is over the server limit of {limit}"
        )
    raise ResourceLimitError(
        field,
        f"the default of {stopping.max_iterations} iterations is over the server limit of "
        f"{limit}: pass {field} <= {limit}",
    )


def _stopped_midway(live: LiveRun) -> dict[str, Any]:
    """The end of a run that shutdown stopped inside an iteration: INTERRUPTED (resumable),
    or CANCELLED when the user had asked for that first."""
    if live.shutdown:
        return {
            "status": RunStatus.INTERRUPTED,
            "stop_reason": StopReason.SHUTDOWN,
            "message": f"the server shut down during an iteration; {_resumer(live)}",
        }
    return {
        "status": RunStatus.CANCELLED,
        "stop_reason": StopReason.CANCELLED,
        "message": "cancelled; the server shut down before the iteration ended",
    }


def _unseen(row: RunRow, nxt: int) -> bool:
    """Whether `row` names a record at or past `nxt` (one the watcher has not seen)."""
    return row.last_record is not None and row.last_record.iteration >= nxt


def _ended(row: RunRow, nxt: int) -> bool:
    """Whether `row` is a run's end for a watcher that has every record before `nxt`."""
    return row.status not in ACTIVE_STATUSES and not _unseen(row, nxt)


async def _follow(
    live: LiveRun, nxt: int, page: int
) -> AsyncIterator[tuple[list[StepRecord], bool]]:
    """(batch, last): batches (at most `page` records) of a live run's committed records from
    iteration `nxt` until it ends (the last one, perhaps empty, says so), or until the run
    let go of the record at `nxt` (the caller then reads the store); waits on an
    asyncio.Event its committing thread sets, not on a thread."""
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
            if batch is None:  # fell behind what the buffer holds: the caller reads the store
                return
            starts = range(0, len(batch), page)
            for start in starts:
                yield batch[start : start + page], finished and start == starts[-1]
            nxt += len(batch)
            if finished:
                if not batch:
                    yield [], True
                return
            if not batch:
                await changed.wait()
    finally:
        unlisten()
