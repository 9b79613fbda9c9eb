"""What the PostgreSQL store has that the SQLite store has had: a size cap (--max-store-bytes,
by counted bytes), a consistency check at open that refuses an inconsistent store, and
`hessian-server --recover-store --store DSN` to repair one, all on a real PostgreSQL 15.

The cap is checked against what PostgreSQL itself reports the stored payload to be
(octet_length of records, checkpoint parameters and problem blobs), not the store's own count.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import psycopg
import pytest
from conftest import start_server
from hessian_client import Client, ResourceExhausted, problems, status_name
from hessian_service.engine.records import StepRecord
from hessian_service.store import (
    PostgresRunStore,
    RunRow,
    StoreCorruptError,
    StoredCheckpoint,
    StoreFullError,
    layout,
)
from hessian_service.store.postgres import COMPACT_RECORDS
from long_runs import EXACT
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
from store_full_runs import (
    CAPPED_ITERATIONS,
    assert_resumed_run_lost_nothing,
    start_capped_run,
    stream_until_full,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAYLOAD = """SELECT
    (SELECT COALESCE(SUM(octet_length(record)), 0) FROM records)
    + (SELECT COALESCE(SUM(octet_length(params)), 0) FROM checkpoints)
    + (SELECT COALESCE(SUM(octet_length(blob)), 0) FROM problems)"""


def _row(run_id: str, status: str = "QUEUED") -> RunRow:
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 50}}
    return RunRow(run_id, "p-unstored", spec, status=status, created_at=1.0)


def _cp(iteration: int, size: int = 16) -> StoredCheckpoint:
    return StoredCheckpoint(iteration, "float64", [size // 8], b"\x01" * size, {"damping": 0.5})


def _record(rng: np.random.Generator, iteration: int) -> StepRecord:
    return StepRecord(iteration=iteration, loss=float(rng.standard_normal()))


def _seen(records: list[StepRecord]) -> list[tuple[int, float]]:
    """(iteration, loss) of each record (whole records hold NaN fields, never equal)."""
    return [(r.iteration, r.loss) for r in records]


def _sql(dsn: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, args)
        return cur.fetchall() if cur.description else []


def _payload(dsn: str) -> int:
    return _sql(dsn, PAYLOAD)[0][0]


def _bytes_per_run(dsn: str) -> tuple[dict[str, int], dict[str, int]]:
    """Each run's bytes as the store counted them, and as PostgreSQL measures its rows."""
    counted = dict(_sql(dsn, "SELECT run_id, stored_bytes FROM runs"))
    measured = dict(
        _sql(
            dsn,
            "SELECT r.run_id, (SELECT COALESCE(SUM(octet_length(record)), 0) FROM records x "
            "WHERE x.run_id = r.run_id) + (SELECT SUM(octet_length(params)) FROM checkpoints c "
            "WHERE c.run_id = r.run_id) FROM runs r",
        )
    )
    return counted, measured


def test_the_size_cap_refuses_the_write_that_would_pass_it_and_a_delete_frees_room(postgres_dsn):
    rng = np.random.default_rng(7)
    cap = 1000 + 16 + 20 * 60  # a problem, a run's checkpoint, then room for ~20 records
    store = PostgresRunStore(postgres_dsn, max_bytes=cap, commit_every=10_000)
    try:
        store.put_problem("p-big", b"\x00" * 1000)
        store.create_run(_row("r-a"), _cp(0))
        assert _payload(postgres_dsn) == 1016
        committed = 0
        while True:
            record = _record(rng, committed)
            store.append_record("r-a", record)
            before = _payload(postgres_dsn)
            try:
                store.flush()
            except StoreFullError as exc:
                refused = exc
                break
            committed += 1
            assert _payload(postgres_dsn) <= cap
        size = len(layout.record_json(record, COMPACT_RECORDS))  # as PostgreSQL stores it
        assert before <= cap < before + size, (before, size, cap)
        assert f"--max-store-bytes {cap}" in str(refused)
        assert _payload(postgres_dsn) == before  # the refused commit left nothing
        assert _sql(postgres_dsn, "SELECT COUNT(*) FROM records")[0][0] == committed
        with pytest.raises(StoreFullError):  # the queued record is kept, and it still fails
            store.append_record("r-a", _record(rng, committed + 1))
        with pytest.raises(StoreFullError):  # no new run while full
            store.create_run(_row("r-b"), _cp(0))
        store.discard_queued("r-a")
        store.put_checkpoint("r-a", _cp(committed - 1))  # same size: replaces, adds nothing
        with pytest.raises(StoreFullError):
            store.put_checkpoint("r-a", _cp(committed - 1, size=2048))
        assert store.delete_problem("p-big")
        store.append_record("r-a", record)
        store.flush()  # fits now
        assert _sql(postgres_dsn, "SELECT COUNT(*) FROM records")[0][0] == committed + 1
        assert store.get_run("r-a").num_records == committed + 1
    finally:
        store.close()


def test_a_run_the_capped_store_stops_is_interrupted_and_resumes_once_the_cap_is_lifted(
    tmp_path, postgres_dsn
):
    """Through a real server: the cap stops a run like a full disk, nothing it showed is lost."""
    capped = {"store": postgres_dsn, "commit_every_records": 16}
    handle = start_server(tmp_path / "a", max_store_bytes=64 * 1024, **capped)
    try:
        with Client(handle.address) as c:
            run = start_capped_run(c)  # about 300 KB of records: far over the 64 KiB cap
            seen = stream_until_full(run)
            info = c.get_run(run.id)
            assert (status_name(info), info.stop_reason) == ("INTERRUPTED", "error"), info.message
            assert "--max-store-bytes 65536" in info.message
            assert len(seen) <= info.num_records < CAPPED_ITERATIONS
        assert _payload(postgres_dsn) <= 64 * 1024
    finally:
        handle.stop(grace=1.0)
    reopened = start_server(tmp_path / "b", **capped)  # no cap now
    try:
        with Client(reopened.address) as c:
            assert_resumed_run_lost_nothing(c, run.id, seen, timeout=120)
    finally:
        reopened.stop(grace=1.0)


def test_migrating_to_the_counted_bytes_counts_what_was_stored_before(postgres_dsn):
    rng = np.random.default_rng(8)
    store = PostgresRunStore(postgres_dsn)
    for run_id in ("r-a", "r-b"):
        store.create_run(_row(run_id), _cp(0, size=8 * int(rng.integers(1, 50))))
        for i in range(int(rng.integers(1, 30))):
            store.append_record(run_id, _record(rng, i))
    store.close()
    # back to schema 1: the column the cap needs (and version 3's table) do not exist yet
    _sql(postgres_dsn, "ALTER TABLE runs DROP COLUMN stored_bytes")
    _sql(postgres_dsn, "DROP TABLE cancel_requests")
    _sql(postgres_dsn, "UPDATE hessian_meta SET value = '1' WHERE key = 'schema_version'")
    PostgresRunStore(postgres_dsn).close()
    counted, measured = _bytes_per_run(postgres_dsn)
    assert counted == measured and len(counted) == 2


def _filled(dsn: str) -> dict[str, list[StepRecord]]:
    """Four runs with records 0..n-1 (r-d with a checkpoint at 8), stored and closed."""
    rng = np.random.default_rng(9)
    store = PostgresRunStore(dsn)
    written: dict[str, list[StepRecord]] = {}
    for run_id, n in (("r-a", 10), ("r-b", 5), ("r-c", 7), ("r-d", 10)):
        store.create_run(_row(run_id), _cp(0))
        written[run_id] = [_record(rng, i) for i in range(n)]
        for record in written[run_id]:
            store.append_record(run_id, record)
    store.put_checkpoint("r-d", _cp(8))
    store.update_run("r-c", status="FINISHED")
    store.close()
    return written


def _damage(dsn: str) -> None:
    _sql(dsn, "DELETE FROM records WHERE run_id = 'r-a' AND iteration = 4")
    _sql(dsn, "DELETE FROM records WHERE run_id = 'r-d' AND iteration = 5")
    _sql(dsn, "UPDATE runs SET status = 'BOGUS' WHERE run_id = 'r-b'")
    _sql(dsn, "INSERT INTO records VALUES ('ghost', 0, '{}'), ('ghost', 1, '{}')")


def _server(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--address", "127.0.0.1:0",
         "--log-format", "text", *flags],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_an_inconsistent_store_is_refused_at_open_naming_what_and_the_recovery(postgres_dsn):
    _filled(postgres_dsn)
    PostgresRunStore(postgres_dsn).close()  # consistent: opens
    _damage(postgres_dsn)
    with pytest.raises(StoreCorruptError) as caught:
        PostgresRunStore(postgres_dsn)
    message = str(caught.value)
    assert "records are not iterations 0..num_records-1: r-a, r-d" in message
    assert "status the server does not know: r-b (BOGUS)" in message
    assert "records of runs that do not exist: ghost" in message
    assert "hessian-server --recover-store --store postgresql://127.0.0.1:" in message
    PostgresRunStore(postgres_dsn, check_integrity=False).close()  # --skip-store-check
    out = _server("--store", postgres_dsn)  # the server refuses to start on it
    assert out.returncode == 2 and "is inconsistent" in out.stderr, out.stderr


def test_recover_store_repairs_an_inconsistent_store_and_keeps_what_is_whole(postgres_dsn):
    written = _filled(postgres_dsn)
    _damage(postgres_dsn)
    out = _server("--recover-store", "--store", postgres_dsn)
    assert out.returncode == 0, out.stderr
    assert "runs cut at their first record gap: 2 (1 of them FAILED" in out.stdout, out.stdout
    store = PostgresRunStore(postgres_dsn)  # passes the check now
    try:
        assert _seen(store.records("r-a", 0, 100)) == _seen(written["r-a"][:4])  # up to the gap
        a = store.get_run("r-a")
        assert (a.status, a.num_records) == ("INTERRUPTED", 4)
        assert _seen([a.last_record]) == _seen(written["r-a"][3:4])
        d = store.get_run("r-d")  # its checkpoint (8) is past the records kept (0..4)
        assert (d.status, d.num_records) == ("FAILED", 5)
        b = store.get_run("r-b")
        assert b.status == "INTERRUPTED" and "BOGUS" in b.message
        assert _seen(store.records("r-b", 0, 100)) == _seen(written["r-b"])
        c = store.get_run("r-c")
        assert c.status == "FINISHED"
        assert _seen(store.records("r-c", 0, 100)) == _seen(written["r-c"])
        assert store.records("ghost", 0, 100) == []
    finally:
        store.close()
    counted, measured = _bytes_per_run(postgres_dsn)
    assert counted == measured


def test_a_short_run_the_cap_refuses_is_interrupted_at_once_and_its_replica_keeps_writing(
    tmp_path, postgres_dsn
):
    """A run whose records were all still queued when it ended (a short run) on a store
    with no room for them: its end's one commit failed on the cap, and so did every later
    write of its end (each flushes the run's queued records first), so the run stayed
    RUNNING until its lease lapsed and ran again elsewhere, and meanwhile every write of
    that replica failed, DeleteRun (the remedy the error names) included. The run is now
    stored INTERRUPTED at once, its unacknowledged records dropped."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    problem = problems.logistic_regression(x, (x[:, 0] > 0).astype(np.float64), l2=1e-3)
    measure = start_server(tmp_path / "a", store=postgres_dsn)
    try:
        with Client(measure.address) as c:
            pid = c.create_problem(problem)
            small = c.start_run(pid, np.zeros(9), stopping={"max_iterations": 0})
            small.wait(60)
    finally:
        measure.stop(grace=1.0)
    cap = _payload(postgres_dsn) + 2000  # the next run's start fits, its 31 records do not
    capped = start_server(tmp_path / "b", store=postgres_dsn, max_store_bytes=cap)
    try:
        with Client(capped.address) as c:
            run = c.start_run(pid, np.zeros(9), method="gradient_descent", learning_rate=0.1,
                              stopping={"max_iterations": 30, **EXACT})  # fmt: skip
            try:  # before: RUNNING until the lease (10 s) lapsed, DeadlineExceeded here
                run.wait(8)  # a watch that came after the end reads the stored row
            except ResourceExhausted as exc:  # one that followed the live run hears why
                assert re.search(r"run store .* is full", str(exc)), exc
            info = c.get_run(run.id)
            assert (status_name(info), info.stop_reason) == ("INTERRUPTED", "error"), info
            assert f"--max-store-bytes {cap}" in info.message
            c.delete_run(small.id)  # the replica writes again
    finally:
        capped.stop(grace=1.0)
