"""Run and problem persistence behind one interface; SQLite is the embedded default."""

from .base import (
    FINAL_STATUSES,
    RunRow,
    RunStore,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from .sqlite import SQLiteRunStore

__all__ = [
    "FINAL_STATUSES",
    "RunRow",
    "RunStore",
    "SQLiteRunStore",
    "StoreError",
    "StoreFullError",
    "StoredCheckpoint",
]
