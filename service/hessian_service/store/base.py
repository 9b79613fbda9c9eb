"""The store interface the server uses: problems by content id, runs, records, checkpoints.

Implementations must be safe to call from many threads. Records are appended with
`append_record` and become durable in batches (`flush` forces it). The contract every
implementation keeps, and the server's acknowledgement rests on:

- `records`, `get_run` and `list_runs` return only committed (durable) state, so a reader
  never sees a record a crash of the process could take back;
- after each commit the store calls its commit listeners with, per run, the highest
  iteration now durable; the server shows a record to watchers only after that call, so
  a client that has received record k of a run can rely on records 0..k being served
  after a crash and restart;
- a record is committed at most `commit_every` queued records or `commit_interval_s`
  after it was appended (whichever comes first), and always before a status change,
  a checkpoint, or `flush`;
- a failed write raises StoreError (StoreFullError when out of space) and keeps the
  queued records queued: nothing is dropped silently, only by `discard_queued` for a run
  that stopped because they could not be committed (never acknowledged, so never seen).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..engine.records import Checkpoint, StepRecord, StopReason


class RunStatus(enum.StrEnum):
    """A stored run's status, declared once (stored as its value; the codec maps it to the
    wire's RunStatus by name). Here, not in the engine: only stored runs have a status."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"  # stopped by its criteria (see its stop reason)
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"  # stopped by the server, not by the run; ResumeRun continues it


ACTIVE_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)
FINAL_STATUSES = tuple(s for s in RunStatus if s not in ACTIVE_STATUSES)
# a problem a run in one of these may still need (to execute, or for ResumeRun) is kept
PROBLEM_PINNING_STATUSES = (*ACTIVE_STATUSES, RunStatus.INTERRUPTED)
# the runs --max-stored-runs may delete (not INTERRUPTED ones: resumable)
ENDED_STATUSES = tuple(s for s in FINAL_STATUSES if s != RunStatus.INTERRUPTED)
# the tenant of unauthenticated callers, and of runs and problems stored before tenants
ANONYMOUS_OWNER = "anonymous"
CommitListener = Callable[[dict[str, int]], None]
log = logging.getLogger(__name__)


class StoreError(Exception):
    """The store could not write (the data directory is unwritable, or an I/O error)."""


class StoreFullError(StoreError):
    """The store is out of space (disk full, or the configured size cap reached)."""


class StoreClosedError(StoreError):
    """The store was closed (the server is stopping): nothing more is read or written."""


class StoreGoneError(StoreError):
    """The store's file (or its write-ahead log) is no longer the one at its path: nothing
    more can be stored, and retrying will not change that."""


class StoreCorruptError(StoreError):
    """The store's file is damaged (failed its integrity check, or a read hit a bad page)."""


class ProblemNotFoundError(Exception):
    """No stored problem with this id (for this owner): never created, or deleted."""

    def __init__(self, problem_id: str, field: str = "problem_id") -> None:
        self.problem_id = problem_id
        self.field = field
        super().__init__(f"{field}: no problem with id {problem_id!r}")


class ProblemInUseError(Exception):
    """The problem cannot be deleted: a queued, running or interrupted run still needs it."""

    field = "problem_id"  # the request field, for the status's BadRequest field violation

    def __init__(self, problem_id: str, run_ids: Sequence[str]) -> None:
        self.problem_id = problem_id
        self.run_ids = list(run_ids)
        shown = ", ".join(self.run_ids[:3]) + (", ..." if len(self.run_ids) > 3 else "")
        super().__init__(
            f"{self.field}: problem {problem_id} is used by {len(self.run_ids)} queued, running "
            f"or interrupted (resumable) run(s) ({shown}); cancel or delete them first"
        )


class RunStateError(Exception):
    """A run update or delete matched no row: the run is gone or in another status."""

    field = "run_id"  # the request field, for the status's BadRequest field violation

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(f"{self.field}: run {run_id} {message}")


class RunNotFoundError(RunStateError):
    """The run does not exist (never did, or was deleted meanwhile)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id, "does not exist (deleted?)")


class RunConflictError(RunStateError):
    """The run exists but its status is not one the update or delete was conditional on."""

    def __init__(self, run_id: str, status: str, expected: Sequence[str]) -> None:
        self.status = status
        super().__init__(run_id, f"is {status}, not {' or '.join(expected)}")


@dataclass
class RunRow:
    """A run as stored: its spec (JSON-friendly dicts), status and outcome.

    `stop_reason` is "" until the run ends; a value no StopReason has (a damaged row) is
    kept as the string it is.
    """

    run_id: str
    problem_id: str
    spec: dict[str, Any]
    name: str = ""
    status: RunStatus = RunStatus.QUEUED
    stop_reason: StopReason | str = ""
    converged: bool = False
    message: str = ""
    backend: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    num_records: int = 0
    last_record: StepRecord | None = None
    owner: str = ANONYMOUS_OWNER

    def __post_init__(self) -> None:
        self.status = RunStatus(self.status)
        with contextlib.suppress(ValueError):
            self.stop_reason = StopReason(self.stop_reason)

    @property
    def remote(self) -> dict[str, Any] | None:
        """An Optimize run's caller-side facts (size, dtype, capabilities): its objective
        lives in the caller's process. None for a run on a stored problem."""
        return self.spec.get("remote")


@dataclass
class StoredCheckpoint:
    """Parameters (raw little-endian bytes) and method state at record `iteration`."""

    iteration: int
    dtype: str
    shape: list[int]
    params: bytes
    state: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, cp: Checkpoint) -> StoredCheckpoint:
        """An engine checkpoint as the store keeps it (little-endian bytes on any host)."""
        params = cp.params.detach().cpu().contiguous()
        return cls(
            iteration=cp.iteration,
            dtype=str(params.dtype).removeprefix("torch."),
            shape=list(params.shape),
            params=params.numpy().astype(params.numpy().dtype.newbyteorder("<")).tobytes(),
            state={k: float(v) for k, v in cp.state.items()},
        )

    def checkpoint(self) -> Checkpoint:
        """The engine checkpoint these bytes hold."""
        dtype = np.dtype(self.dtype).newbyteorder("<")
        array = np.frombuffer(self.params, dtype=dtype).astype(dtype.newbyteorder("="))
        return Checkpoint(
            self.iteration, torch.from_numpy(array).reshape(self.shape), dict(self.state)
        )


class RunStore(ABC):
    """Persistence for problems, runs, step records and parameter checkpoints."""

    _listeners: list[CommitListener]
    _listeners_lock = threading.Lock()

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call `listener({run_id: highest durable iteration})` after every record commit
        (from another replica's store also after a status change, with iteration -1)."""
        with self._listeners_lock:
            self._listeners = [*getattr(self, "_listeners", []), listener]

    def _notify_committed(self, committed: dict[str, int]) -> None:
        """For implementations: report a commit to the listeners (never raises)."""
        if not committed:
            return
        for listener in getattr(self, "_listeners", []):
            try:
                listener(committed)
            except Exception:
                log.exception("a commit listener failed")

    @abstractmethod
    def put_problem(self, problem_id: str, blob: bytes, owner: str = ANONYMOUS_OWNER) -> None:
        """Store a problem's serialised form once under its content id and make `owner` one
        of its owners (idempotent; refreshes the owner's last use)."""

    @abstractmethod
    def get_problem(self, problem_id: str, owner: str | None = None) -> bytes | None:
        """The serialised problem, or None; with `owner`, None unless that owner has it."""

    @abstractmethod
    def has_problem(self, problem_id: str, owner: str | None = None) -> bool:
        """Whether the problem is stored (with `owner`: whether that owner has it)."""

    @abstractmethod
    def delete_problem(self, problem_id: str, owner: str | None = None) -> bool:
        """Remove `owner`'s hold on a problem (None: every owner's); the bytes go with the
        last owner. False if there was nothing to delete. Raises ProblemInUseError while a
        run of that owner (None: of anyone) in PROBLEM_PINNING_STATUSES uses it."""

    @abstractmethod
    def enforce_problem_retention(self, max_bytes: int, keep: Sequence[str] = ()) -> list[str]:
        """Delete the least recently used problems no run in PROBLEM_PINNING_STATUSES uses
        (nor in `keep`) until the stored problems take at most `max_bytes`; return their ids."""

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction: the store's writes inside the block join it and commit, or
        roll back, together (a run's row and its lease: a replica that stored the one and not
        the other left a run QUEUED that no replica would take over)."""

    @abstractmethod
    def create_run(
        self, row: RunRow, checkpoint: StoredCheckpoint, *, require_problem: bool = False
    ) -> None:
        """Insert a new run with its starting checkpoint (durable on return).

        With `require_problem` the run's owner must hold its problem, checked in the same
        transaction (ProblemNotFoundError otherwise), and the problem counts as used now.
        """

    @abstractmethod
    def update_run(self, run_id: str, *, expect_status: Sequence[str] = (), **fields: Any) -> None:
        """Set RunRow fields (status, stop_reason, ...) and commit, after pending records.

        With `expect_status` the update applies only while the run's status is one of them,
        checked and written in one statement. Raises RunNotFoundError when there is no such
        run and RunConflictError when its status is not expected (nothing is written then).
        """

    @abstractmethod
    def get_run(self, run_id: str) -> RunRow | None:
        """One run, or None."""

    @abstractmethod
    def list_runs(
        self,
        statuses: Sequence[str],
        limit: int,
        after: tuple[float, str] | None,
        owner: str | None = None,
    ) -> list[RunRow]:
        """Runs newest first, filtered by status (empty: all) and owner (None: all), after
        the key (created_at, id)."""

    @abstractmethod
    def append_record(self, run_id: str, record: StepRecord) -> None:
        """Queue a record; it is committed within the store's batch size or interval."""

    @abstractmethod
    def flush(self) -> None:
        """Commit every queued record now."""

    def require_room(self) -> None:
        """Refuse new work (a run, a resumed one) with StoreFullError while the store is
        full and only a delete frees room (PostgreSQL: each write is sized against the cap
        as it is made, so nothing is refused ahead)."""
        return

    @abstractmethod
    def discard_queued(self, run_id: str) -> int:
        """Drop a stopped run's queued records, which the store could not commit; return how
        many. They were never acknowledged; ResumeRun recomputes them from a checkpoint."""

    @abstractmethod
    def records(self, run_id: str, from_iteration: int, limit: int) -> list[StepRecord]:
        """Durable records of a run with iteration >= from_iteration, in order."""

    @abstractmethod
    def put_checkpoint(self, run_id: str, checkpoint: StoredCheckpoint) -> None:
        """Commit queued records, then this checkpoint (it replaces older ones)."""

    def finish_run(self, run_id: str, checkpoint: StoredCheckpoint, **fields: Any) -> None:
        """Commit queued records, the run's last checkpoint and its end fields (update_run's).

        SQLite does it in one transaction (a short job's commits are much of its time); this
        default commits the checkpoint, then the end, and may raise after the first commit."""
        self.put_checkpoint(run_id, checkpoint)
        self.update_run(run_id, **fields)

    @abstractmethod
    def latest_checkpoint(self, run_id: str) -> StoredCheckpoint | None:
        """The newest checkpoint, or None."""

    @abstractmethod
    def delete_run(self, run_id: str, statuses: Sequence[str] = ()) -> bool:
        """Delete a run, its records and checkpoints; False if there was none.

        With `statuses` only a run in one of them is deleted (checked in the same transaction);
        a run in another status raises RunConflictError.
        """

    @abstractmethod
    def enforce_retention(self, max_runs: int, keep: str = "") -> list[str]:
        """Delete the oldest ended runs (FINISHED, CANCELLED, FAILED), never `keep` (a run
        that has just ended, whose client has yet to read it), until at most `max_runs`
        remain. Runs QUEUED or RUNNING are never deleted, nor INTERRUPTED ones: those are
        resumable work a crash or a shutdown left for their clients (CancelRun or DeleteRun
        lets one go); they all still count. Returns deleted ids.
        """

    def newest_created_at(self) -> float:
        """The largest created_at stored (0 for none): new runs are dated after it whatever
        the wall clock says (a clock stepped back reordered ListRuns and retention)."""
        return 0.0

    def request_cancel(self, run_id: str) -> None:
        """CancelRun of a run another replica executes: leave the request for its holder
        (take_cancel_requests). A store one process owns has no other replica: nothing."""
        return None

    def take_cancel_requests(self, run_ids: Sequence[str]) -> set[str]:
        """The runs among `run_ids` whose cancel was requested, the requests removed."""
        return set()

    @abstractmethod
    def count_runs_by_status(self) -> dict[str, int]:
        """How many stored runs have each status."""

    @abstractmethod
    def mark_interrupted(self, message: str) -> list[str]:
        """At start-up: runs left QUEUED or RUNNING by a dead process become INTERRUPTED."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources."""
