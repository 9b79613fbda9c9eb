"""Run and problem persistence behind one interface; SQLite is the embedded default."""

from .base import (
    FINAL_STATUSES,
    RunConflictError,
    RunNotFoundError,
    RunRow,
    RunStateError,
    RunStore,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from .sqlite import SQLiteRunStore

__all__ = [
    "FINAL_STATUSES",
    "RunConflictError",
    "RunNotFoundError",
    "RunRow",
    "RunStateError",
    "RunStore",
    "SQLiteRunStore",
    "StoreError",
    "StoreFullError",
    "StoredCheckpoint",
]
