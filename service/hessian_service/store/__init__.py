"""Run and problem persistence behind one interface; SQLite is the embedded default."""

from .base import RunRow, RunStore, StoredCheckpoint
from .sqlite import SQLiteRunStore

__all__ = ["RunRow", "RunStore", "SQLiteRunStore", "StoredCheckpoint"]
