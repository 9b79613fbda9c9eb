"""The store interface the server uses: problems by content id, runs, records, checkpoints.

Implementations must be safe to call from many threads. Records are appended with
`append_record` and become durable in batches (`flush` forces it); `records` returns only
durable records, so a reader never sees a record a crash could take back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.records import StepRecord

ACTIVE_STATUSES = ("QUEUED", "RUNNING")


@dataclass
class RunRow:
    """A run as stored: its spec (JSON-friendly dicts), status and outcome."""

    run_id: str
    problem_id: str
    spec: dict[str, Any]
    name: str = ""
    status: str = "QUEUED"
    stop_reason: str = ""
    converged: bool = False
    message: str = ""
    backend: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    num_records: int = 0
    last_record: StepRecord | None = None


@dataclass
class StoredCheckpoint:
    """Parameters (raw little-endian bytes) and method state at record `iteration`."""

    iteration: int
    dtype: str
    shape: list[int]
    params: bytes
    state: dict[str, float] = field(default_factory=dict)


class RunStore(ABC):
    """Persistence for problems, runs, step records and parameter checkpoints."""

    @abstractmethod
    def put_problem(self, problem_id: str, blob: bytes) -> None:
        """Store a problem's serialised form once under its content id (idempotent)."""

    @abstractmethod
    def get_problem(self, problem_id: str) -> bytes | None:
        """The serialised problem, or None."""

    @abstractmethod
    def create_run(self, row: RunRow, checkpoint: StoredCheckpoint) -> None:
        """Insert a new run with its starting checkpoint (durable on return)."""

    @abstractmethod
    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set RunRow fields (status, stop_reason, ...) and commit, after pending records."""

    @abstractmethod
    def get_run(self, run_id: str) -> RunRow | None:
        """One run, or None."""

    @abstractmethod
    def list_runs(
        self, statuses: Sequence[str], limit: int, after: tuple[float, str] | None
    ) -> list[RunRow]:
        """Runs newest first, filtered by status (empty: all), after the key (created_at, id)."""

    @abstractmethod
    def append_record(self, run_id: str, record: StepRecord) -> None:
        """Queue a record; it is committed within the store's batch size or interval."""

    @abstractmethod
    def flush(self) -> None:
        """Commit every queued record now."""

    @abstractmethod
    def records(self, run_id: str, from_iteration: int, limit: int) -> list[StepRecord]:
        """Durable records of a run with iteration >= from_iteration, in order."""

    @abstractmethod
    def put_checkpoint(self, run_id: str, checkpoint: StoredCheckpoint) -> None:
        """Commit queued records, then this checkpoint (it replaces older ones)."""

    @abstractmethod
    def latest_checkpoint(self, run_id: str) -> StoredCheckpoint | None:
        """The newest checkpoint, or None."""

    @abstractmethod
    def delete_run(self, run_id: str) -> bool:
        """Delete a run, its records and checkpoints; False if there was none."""

    @abstractmethod
    def mark_interrupted(self, message: str) -> list[str]:
        """At start-up: runs left QUEUED or RUNNING by a dead process become INTERRUPTED."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources."""
