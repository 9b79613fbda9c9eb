"""Run and problem persistence behind one interface; SQLite is the embedded default."""

from .base import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    RunConflictError,
    RunNotFoundError,
    RunRow,
    RunStateError,
    RunStore,
    StoreClosedError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from .sqlite import SQLiteRunStore

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "RunConflictError",
    "RunNotFoundError",
    "RunRow",
    "RunStateError",
    "RunStore",
    "SQLiteRunStore",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoredCheckpoint",
]
