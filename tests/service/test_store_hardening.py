"""The SQLite store and its recovery hold up against what an adversarial tester did to them:
a store truncated by one page is recovered (SQLite refused every read of it, so recovery
kept nothing and exited 0 with an empty store in place); a recovery that can read nothing
leaves the file and exits 2; a second recovery keeps the first one's damaged copy; a store
file shared through a link, or whose server.lock was removed, is refused to a second server;
a leftover -wal with no store file, and a store a killed recovery left half swapped, are
refused, not absorbed; DeleteProblem of a problem in use names the field."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, free_port, spawn_server, start_server, wait_until
from hessian_client import Client, errors, problems
from hessian_service.engine.records import StepRecord
from hessian_service.store import (
    RunRow,
    SQLiteRunStore,
    StoreCorruptError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from hessian_service.store.dirlock import DataDirInUseError
from hessian_service.store.recovery import recover_store

RECORDS = 3000
LONG = {"method": "gradient_descent", "learning_rate": 1e-4,
        "stopping": {"max_iterations": 1_000_000, "gradient_tolerance": 0.0}}  # fmt: skip
# a store left as a SIGKILLed server leaves it: its last commits only in runs.sqlite3-wal
UNCLOSED = """
import os, sys
from hessian_service.engine.records import StepRecord
from hessian_service.store import RunRow, SQLiteRunStore, StoredCheckpoint
store = SQLiteRunStore(sys.argv[1])
store.create_run(RunRow("r-wal", "p-1", {"options": {}, "stopping": {}}, status="RUNNING"),
                 StoredCheckpoint(0, "float64", [1], bytes(8)))
for i in range(50):
    store.append_record("r-wal", StepRecord(iteration=i, loss=float(i), backend="autograd"))
store.flush()
os._exit(0)
"""


# a server SIGKILLed with 60 runs RUNNING, 100 records each (its last commits in the -wal)
KILLED_RUNNING = """
import os, sys
from hessian_service.engine.records import StepRecord
from hessian_service.store import RunRow, SQLiteRunStore, StoredCheckpoint
store = SQLiteRunStore(sys.argv[1])
for r in range(60):
    store.create_run(RunRow(f"r-{r}", "p-1", {"options": {}, "stopping": {}}, status="RUNNING"),
                     StoredCheckpoint(0, "float64", [1], bytes(8)))
    for i in range(100):
        store.append_record(f"r-{r}", StepRecord(iteration=i, loss=float(i), backend="x"))
store.flush()
os._exit(0)
"""


def _filled_store(data_dir) -> None:
    """A closed store with one finished run ("r-a") of RECORDS records."""
    store = SQLiteRunStore(data_dir, commit_every=500)
    store.create_run(
        RunRow("r-a", "p-1", {"options": {}, "stopping": {}}, status="RUNNING"),
        StoredCheckpoint(0, "float64", [1], bytes(8)),
    )
    for i in range(RECORDS):
        store.append_record("r-a", StepRecord(iteration=i, loss=float(i), backend="autograd"))
    store.update_run("r-a", status="FINISHED")
    store.close()


def _unclosed_store(data_dir) -> None:
    """A store whose run "r-wal" and its 50 records are in runs.sqlite3-wal alone."""
    subprocess.run([sys.executable, "-c", UNCLOSED, str(data_dir)], check=True, timeout=60)
    assert (data_dir / "runs.sqlite3-wal").stat().st_size > 0


def _server(data_dir, *flags: str, port: int = 0) -> subprocess.CompletedProcess:
    """hessian-server on `data_dir` to its exit (a refused start, or --recover-store)."""
    return subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--address", f"127.0.0.1:{port}",
         "--data-dir", str(data_dir), "--log-format", "text", *flags],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def _rows(path, sql: str) -> list:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("cut", "at_least"),
    [("one page", RECORDS - 100), ("to half, mid-page", RECORDS // 4)],
)
def test_a_truncated_store_is_recovered_with_its_intact_rows(tmp_path, cut, at_least):
    # cut mid-page, the last page reads as zeros after the cut: cells with NULL keys, which
    # stopped the recovery with a TypeError once the truncated file could be read at all
    _filled_store(tmp_path)
    path = tmp_path / "runs.sqlite3"
    size, page = path.stat().st_size, _rows(path, "PRAGMA page_size")[0][0]
    os.truncate(path, size - page if cut == "one page" else size // 2 + page // 3)
    out = _server(tmp_path, "--recover-store")
    assert out.returncode == 0, out.stderr
    assert _rows(path, "SELECT run_id, status FROM runs") == [("r-a", "FINISHED")]
    kept = [r[0] for r in _rows(path, "SELECT iteration FROM records ORDER BY iteration")]
    # the records on the lost pages go, and those after them: the run keeps the rest, whole
    assert kept == list(range(len(kept))) and len(kept) > at_least, len(kept)
    assert _rows(path, "SELECT num_records FROM runs") == [(len(kept),)]
    SQLiteRunStore(tmp_path).close()  # the new store passes the start-up integrity check


def test_a_recovery_that_reads_no_row_leaves_the_store_and_exits_2(tmp_path):
    _filled_store(tmp_path)
    path = tmp_path / "runs.sqlite3"
    with open(path, "r+b") as fh:
        fh.write(bytes(100))  # the header: SQLite no longer knows the file as a database
    before = _digest(path)
    out = _server(tmp_path, "--recover-store")
    assert out.returncode == 2, out.stdout
    assert f"no row could be read from {path}" in out.stderr
    assert "the store was left as it is" in out.stderr
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite3", "server.lock"]


def test_a_second_recovery_keeps_the_first_ones_damaged_copy(tmp_path):
    _filled_store(tmp_path)
    path = tmp_path / "runs.sqlite3"
    os.truncate(path, path.stat().st_size - 4096)
    damaged = _digest(path)
    first = recover_store(tmp_path)
    assert first.damaged_copy == tmp_path / "runs.sqlite3.damaged"
    second = recover_store(tmp_path)
    assert second.damaged_copy == tmp_path / "runs.sqlite3.damaged.1"
    assert "kept as " + str(tmp_path / "runs.sqlite3.damaged.1") in second.summary()
    assert _digest(tmp_path / "runs.sqlite3.damaged") == damaged  # the only original
    assert recover_store(tmp_path).damaged_copy == tmp_path / "runs.sqlite3.damaged.2"


def test_a_store_a_killed_recovery_left_half_swapped_is_refused_then_recovered_whole(
    tmp_path,
):
    # the state a recovery killed after keeping the copy and removing the live -wal leaves
    _unclosed_store(tmp_path)
    path = tmp_path / "runs.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        os.link(f"{path}{suffix}", f"{path}.damaged{suffix}")
    for suffix in ("-wal", "-shm"):
        os.unlink(f"{path}{suffix}")
    with pytest.raises(StoreCorruptError, match=r"same file as .*runs\.sqlite3\.damaged"):
        SQLiteRunStore(tmp_path)
    report = recover_store(tmp_path)  # reads the copy, whole with its -wal
    assert report.damaged_copy == tmp_path / "runs.sqlite3.damaged"
    assert _rows(path, "SELECT run_id, num_records FROM runs") == [("r-wal", 50)]
    assert not (tmp_path / "runs.sqlite3.damaged.1").exists()
    SQLiteRunStore(tmp_path).close()


def test_a_leftover_wal_without_its_store_file_is_refused_and_kept(tmp_path):
    _unclosed_store(tmp_path)
    os.replace(tmp_path / "runs.sqlite3", tmp_path.parent / f"{tmp_path.name}-moved.sqlite3")
    wal = tmp_path / "runs.sqlite3-wal"
    before = _digest(wal)
    named = f"does not exist but {wal} and {wal.with_name('runs.sqlite3-shm')} are there"
    with pytest.raises(StoreError, match=re.escape(named)):
        SQLiteRunStore(tmp_path, exclusive=True)
    assert not (tmp_path / "runs.sqlite3").exists() and _digest(wal) == before


def test_one_server_per_store_file_through_a_link_or_without_server_lock(tmp_path):
    first_dir, other_dir = tmp_path / "a", tmp_path / "b"
    port = free_port()
    first = spawn_server(first_dir, port)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            run = client.start_run(problems.rosenbrock(dim=10), np.zeros(10), **LONG)
            assert wait_until(lambda: client.get_run(run.id).status == "RUNNING")
            other_dir.mkdir()
            (other_dir / "runs.sqlite3").symlink_to(first_dir / "runs.sqlite3")
            holder = f"is in use by another hessian-server (pid {first.pid}, holding the database"
            refused = [_server(other_dir, port=free_port()), _server(other_dir, "--recover-store")]
            (first_dir / "server.lock").unlink()  # a clean-up job removing "stale" lock files
            refused.append(_server(first_dir, port=free_port()))
            for out in refused:
                assert out.returncode == 2, out.stderr
                assert holder in out.stderr, out.stderr
            info = client.get_run(run.id)
            assert info.status == "RUNNING", info.message
            assert not list(first_dir.glob("*.damaged*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)


def test_a_file_this_process_holds_is_refused_without_dropping_its_locks(tmp_path):
    held = SQLiteRunStore(tmp_path / "a", exclusive=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "runs.sqlite3").symlink_to(tmp_path / "a" / "runs.sqlite3")
    try:
        with pytest.raises(DataDirInUseError, match=f"pid {os.getpid()},"):
            SQLiteRunStore(tmp_path / "b", exclusive=True)
    finally:
        held.close()
    SQLiteRunStore(tmp_path / "b", exclusive=True).close()  # let go with its holder


def test_deleting_a_problem_in_use_names_the_field(tmp_path):
    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as client:
            problem_id = client.create_problem(problems.rosenbrock(dim=10))
            run = client.start_run(problem_id, np.zeros(10), **LONG)
            with pytest.raises(errors.FailedPrecondition) as refused:
                client.delete_problem(problem_id)
            client.cancel_run(run.id)
    finally:
        handle.stop(grace=1.0)
    assert refused.value.field == "problem_id"
    assert refused.value.expected.startswith(f"problem {problem_id} is used by 1 queued")


def test_a_store_past_a_lowered_cap_starts_and_its_runs_can_end_and_go(tmp_path):
    """A server killed with runs RUNNING, restarted with --max-store-bytes below the store's
    size: marking those runs INTERRUPTED needed pages past max_page_count, so the start
    failed ("full ... raise the cap or delete runs (DeleteRun ...)": no server to delete
    with). Deletes and status writes now get the reserve beyond the store's size."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-c", KILLED_RUNNING, str(data)], check=True, timeout=60)
    size = sum(f.stat().st_size for f in data.glob("runs.sqlite3*"))
    cap = 64 * 1024
    assert size > 4 * cap and (data / "runs.sqlite3-wal").stat().st_size > 0
    capped = SQLiteRunStore(data, max_bytes=cap)
    try:
        interrupted = capped.mark_interrupted("the server stopped while the run was executing")
        assert len(interrupted) == 60
        assert {capped.get_run(f"r-{r}").status for r in range(60)} == {"INTERRUPTED"}
        assert capped.delete_run("r-0") and capped.get_run("r-0") is None
        assert len(capped.records("r-1", 0, 1000)) == 100  # nothing else touched
    finally:
        capped.close()


@pytest.mark.parametrize("cap", [256 * 1024, 1024 * 1024])
def test_a_capped_store_holds_its_write_ahead_log_to_an_eighth_of_the_cap(tmp_path, cap):
    """SQLite checkpoints its log at 1,000 pages and never cuts it back: a store filled to a
    1 MiB cap kept a 48 kB file beside 3 MB of runs.sqlite3-wal, so the cap bounded the file,
    not the disk. Under a cap the log is checkpointed and cut at an eighth of it."""
    store = SQLiteRunStore(tmp_path, max_bytes=cap)
    wal, peak, full = tmp_path / "runs.sqlite3-wal", 0, None
    try:
        for r in range(200):
            store.create_run(
                RunRow(f"r-{r}", "p-1", {"options": {}, "stopping": {}}, status="RUNNING"),
                StoredCheckpoint(0, "float64", [1], bytes(8)),
            )
            for i in range(300):
                store.append_record(f"r-{r}", StepRecord(iteration=i, loss=i / 7, backend="x"))
            store.flush()
            peak = max(peak, wal.stat().st_size)
    except StoreFullError as exc:
        full = exc
    finally:
        with contextlib.suppress(StoreFullError):  # the records the full store refused
            store.close()
    assert full is not None, "the store never filled: the test wrote too little"
    one_commit = 300 * 4096 // 16  # a flush's pages with their frame headers, generously
    assert peak <= cap // 8 + one_commit
    assert (tmp_path / "runs.sqlite3").stat().st_size <= cap
