"""The SQLite run store: batched commits, paging, checkpoints and deletion (through the
RunStore interface only). Durability across reopen and interruption marking are in
test_postgres_store's contract tests, which run on SQLite as well as PostgreSQL."""

from __future__ import annotations

import sqlite3
import time

from hessian_service.engine.records import StepRecord
from hessian_service.store import RunRow, SQLiteRunStore, StoredCheckpoint


def _row(run_id: str, created: float, status: str = "QUEUED") -> RunRow:
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    return RunRow(run_id, "p-1", spec, status=status, created_at=created)


def _cp(iteration: int) -> StoredCheckpoint:
    return StoredCheckpoint(iteration, "float64", [2], bytes(16), {"damping": 0.5})


def _committed(path, run_id: str) -> int:
    """Records another connection can see (what a crash right now would keep)."""
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (run_id,)).fetchone()[0]


def test_records_commit_in_batches_of_n(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=10, commit_interval_s=3600)
    store.create_run(_row("r-a", 1.0), _cp(0))
    for i in range(25):
        store.append_record("r-a", StepRecord(iteration=i, loss=1.0 / (i + 1)))
    assert _committed(store.path, "r-a") == 20
    assert len(store.records("r-a", 0, 100)) == 20
    store.flush()
    assert _committed(store.path, "r-a") == 25
    store.close()


def test_records_commit_within_the_interval(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=1000, commit_interval_s=0.05)
    store.create_run(_row("r-a", 1.0), _cp(0))
    store.append_record("r-a", StepRecord(iteration=0, loss=2.0))
    deadline = time.monotonic() + 60  # a hang guard: the interval is 50 ms
    while _committed(store.path, "r-a") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _committed(store.path, "r-a") == 1
    store.close()


def test_list_runs_pages_newest_first_and_filters(tmp_path):
    store = SQLiteRunStore(tmp_path)
    for i in range(7):
        store.create_run(_row(f"r-{i}", float(i), "FINISHED" if i % 2 else "QUEUED"), _cp(0))
    page = store.list_runs([], 3, None)
    assert [r.run_id for r in page] == ["r-6", "r-5", "r-4"]
    after = (page[-1].created_at, page[-1].run_id)
    assert [r.run_id for r in store.list_runs([], 3, after)] == ["r-3", "r-2", "r-1"]
    assert [r.run_id for r in store.list_runs(["FINISHED"], 10, None)] == ["r-5", "r-3", "r-1"]
    store.close()


def test_resumed_duplicates_are_ignored_and_delete_removes_everything(tmp_path):
    store = SQLiteRunStore(tmp_path)
    store.create_run(_row("r-a", 1.0), _cp(0))
    for i in (0, 1, 2, 1, 2, 3):
        store.append_record("r-a", StepRecord(iteration=i, loss=float(i)))
    store.flush()
    assert store.get_run("r-a").num_records == 4
    assert [r.iteration for r in store.records("r-a", 0, 10)] == [0, 1, 2, 3]
    assert store.delete_run("r-a")
    assert store.get_run("r-a") is None
    assert store.records("r-a", 0, 10) == [] and store.latest_checkpoint("r-a") is None
    assert not store.delete_run("r-a")
    store.close()
