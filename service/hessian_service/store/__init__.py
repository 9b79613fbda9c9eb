"""Run and problem persistence behind one interface; SQLite is the embedded default,
PostgreSQL the store several replicas share."""

from .base import (
    ACTIVE_STATUSES,
    ANONYMOUS_OWNER,
    FINAL_STATUSES,
    PROBLEM_PINNING_STATUSES,
    ProblemInUseError,
    ProblemNotFoundError,
    RunConflictError,
    RunNotFoundError,
    RunRow,
    RunStateError,
    RunStatus,
    RunStore,
    StoreClosedError,
    StoreCorruptError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
    StoreGoneError,
)
from .postgres import LeaseLostError, PostgresRunStore
from .sqlite import SQLiteRunStore

__all__ = [
    "ACTIVE_STATUSES",
    "ANONYMOUS_OWNER",
    "FINAL_STATUSES",
    "PROBLEM_PINNING_STATUSES",
    "LeaseLostError",
    "PostgresRunStore",
    "ProblemInUseError",
    "ProblemNotFoundError",
    "RunConflictError",
    "RunNotFoundError",
    "RunRow",
    "RunStateError",
    "RunStatus",
    "RunStore",
    "SQLiteRunStore",
    "StoreClosedError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreGoneError",
    "StoredCheckpoint",
]
