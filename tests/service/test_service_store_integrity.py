"""A damaged or empty store is refused at start-up (exit 2, the file and the recovery command
named); with the check skipped, requests meeting a damaged page get DATA_LOSS, never
INTERNAL; an older store (schema version 0) is migrated to tenants when opened."""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import ROOT, start_server
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.engine.records import StepRecord
from hessian_service.store import RunRow, SQLiteRunStore, StoredCheckpoint, StoreError
from hessian_service.store.recovery import recover_store
from hessian_service.store.sqlite import SCHEMA_VERSION

RECORDS = 3000


def _filled_store(data_dir) -> str:
    """A closed store with one finished run of RECORDS records; returns the run id."""
    store = SQLiteRunStore(data_dir, commit_every=500)
    spec = {"options": {"method": "gradient_descent"}, "stopping": {}}
    store.create_run(
        RunRow("r-a", "p-1", spec, status="RUNNING"), StoredCheckpoint(0, "float64", [1], b"\0" * 8)
    )
    for i in range(RECORDS):
        store.append_record("r-a", StepRecord(iteration=i, loss=float(i), backend="autograd"))
    store.update_run("r-a", status="FINISHED")
    store.close()
    return "r-a"


def _damage_records(path) -> list[int]:
    """Overwrite the middle pages of the records table with random bytes; their numbers."""
    with sqlite3.connect(path) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = [r[0] for r in db.execute("SELECT pageno FROM dbstat WHERE name = 'records'")]
    db.close()
    middle = sorted(pages)[len(pages) // 3 : len(pages) // 3 + 3]
    noise = random.Random(0)
    with open(path, "r+b") as fh:
        for page in middle:
            fh.seek((page - 1) * size)
            fh.write(bytes(noise.randrange(256) for _ in range(size)))
    return middle


def _serve(data_dir, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--address", "127.0.0.1:0",
         "--data-dir", str(data_dir), "--log-format", "text", *flags],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_a_store_with_damaged_middle_pages_is_refused_at_start_up(tmp_path):
    _filled_store(tmp_path)
    path = tmp_path / "runs.sqlite3"
    assert _damage_records(path)
    out = _serve(tmp_path)
    assert out.returncode == 2, out.stderr
    assert f"the run store {path} is damaged" in out.stderr
    assert f"hessian-server --recover-store --data-dir {tmp_path}" in out.stderr


def test_recover_store_keeps_the_readable_rows_up_to_a_gap_and_the_server_serves_them(tmp_path):
    run_id = _filled_store(tmp_path)
    damaged = _damage_records(tmp_path / "runs.sqlite3")
    out = _serve(tmp_path, "--recover-store")
    assert out.returncode == 0, out.stderr
    assert "tables with unreadable pages: records" in out.stdout
    assert (tmp_path / "runs.sqlite3.damaged").is_file()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        stored = sorted(r[0] for r in db.execute("SELECT iteration FROM records"))
    db.close()
    handle = start_server(tmp_path)  # passes the integrity check now
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            info = stub.GetRun(service_pb2.GetRunRequest(run_id=run_id), timeout=30)
            kept = []
            for event in stub.WatchRun(service_pb2.WatchRunRequest(run_id=run_id), timeout=60):
                kept.extend(event.records)
    finally:
        handle.stop(grace=1.0)
    assert f"runs cut at their first record gap: {run_id}" in out.stdout
    assert info.status == service_pb2.RUN_STATUS_FINISHED
    # the records after the first lost one went too: the run is whole up to the gap, and a
    # watcher gets every record it holds and its end (DATA_LOSS at the gap, before)
    assert stored == list(range(len(stored))) and info.num_records == len(stored)
    assert info.last_record.iteration == len(stored) - 1
    assert [r.iteration for r in kept] == stored and all(r.loss == r.iteration for r in kept)
    assert damaged and 0 < len(stored) < RECORDS


def _run_with(store, run_id: str, status: str, records: int, checkpoints: list[int]) -> None:
    spec = {"options": {"method": "gradient_descent"}, "stopping": {}}
    store.create_run(RunRow(run_id, "p-1", spec, status="RUNNING"), _checkpoint(0))
    for i in range(records):
        store.append_record(run_id, StepRecord(iteration=i, loss=float(i), backend="autograd"))
    for k in checkpoints:
        store.put_checkpoint(run_id, _checkpoint(k))
    store.update_run(run_id, status=status)


def _checkpoint(iteration: int) -> StoredCheckpoint:
    return StoredCheckpoint(iteration, "float64", [1], b"\0" * 8)


def test_recovery_stops_the_runs_it_cuts_and_those_it_leaves_without_a_checkpoint(tmp_path):
    """What pages held is lost at random: records in the middle of a run, its checkpoints.
    SQLite's recovery kept records past a gap (a resumed run then finished with a hole no
    watcher gets past) and left runs INTERRUPTED whose ResumeRun could only refuse; a
    finished run's lost parameters came back as an empty final_params. Now as PostgreSQL's
    repair: cut at the gap, FAILED where resuming is impossible, DATA_LOSS for the params."""
    store = SQLiteRunStore(tmp_path, commit_every=50)
    _run_with(store, "r-late", "INTERRUPTED", 300, [299])  # checkpoint past the gap
    _run_with(store, "r-early", "INTERRUPTED", 300, [50])  # checkpoint before it
    _run_with(store, "r-tail", "INTERRUPTED", 300, [299])  # loses its last records only
    _run_with(store, "r-bare", "INTERRUPTED", 10, [9])
    _run_with(store, "r-done", "FINISHED", 10, [9])
    store.close()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:  # what the lost pages held
        db.execute("DELETE FROM records WHERE iteration BETWEEN 100 AND 149")
        db.execute("DELETE FROM records WHERE run_id = 'r-tail' AND iteration >= 100")
        db.execute("DELETE FROM checkpoints WHERE run_id IN ('r-bare', 'r-done')")
    db.close()
    report = recover_store(tmp_path)
    assert report.cut == ["r-early", "r-late", "r-tail"]
    assert report.failed == ["r-bare", "r-late", "r-tail"]
    store = SQLiteRunStore(tmp_path)
    try:
        names = ("r-late", "r-early", "r-tail", "r-bare")
        rows = {run_id: store.get_run(run_id) for run_id in names}
        for run_id in ("r-late", "r-early", "r-tail"):
            kept = [r.iteration for r in store.records(run_id, 0, 1000)]
            assert kept == list(range(100)) and rows[run_id].num_records == 100
            assert rows[run_id].last_record.iteration == 99
    finally:
        store.close()
    assert (rows["r-late"].status, rows["r-late"].message) == (
        "FAILED",
        "recovered: records after iteration 99 were lost and its checkpoint is later",
    )
    assert rows["r-tail"].status == "FAILED"  # its checkpoint (299) is past the kept 99
    assert rows["r-early"].status == "INTERRUPTED"  # resumable: from iteration 50
    assert (rows["r-bare"].status, rows["r-bare"].message) == (
        "FAILED",
        "recovered: no checkpoint to resume from",
    )
    handle = start_server(tmp_path)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            request = service_pb2.GetRunRequest(run_id="r-done", include_params=True)
            with pytest.raises(grpc.RpcError) as lost:
                stub.GetRun(request, timeout=30)
            done = stub.GetRun(service_pb2.GetRunRequest(run_id="r-done"), timeout=30)
    finally:
        handle.stop(grace=1.0)
    assert lost.value.code() == grpc.StatusCode.DATA_LOSS
    assert lost.value.details().startswith("include_params: run r-done: its parameters are")
    assert done.status == service_pb2.RUN_STATUS_FINISHED and done.num_records == 10


def test_a_zero_length_store_file_is_refused(tmp_path):
    (tmp_path / "runs.sqlite3").touch()
    out = _serve(tmp_path)
    assert out.returncode == 2, out.stderr
    assert "is damaged (the file is empty (0 bytes))" in out.stderr
    assert str(tmp_path / "runs.sqlite3") in out.stderr


def test_a_new_store_is_created_whole_and_a_leftover_half_made_one_is_ignored(tmp_path):
    (tmp_path / "runs.sqlite3.new").write_bytes(b"")  # a creation a crash interrupted
    store = SQLiteRunStore(tmp_path)
    store.close()
    assert not (tmp_path / "runs.sqlite3.new").exists()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_with_the_check_skipped_a_damaged_page_is_data_loss_not_internal(tmp_path):
    run_id = _filled_store(tmp_path)
    _damage_records(tmp_path / "runs.sqlite3")
    handle = start_server(tmp_path, skip_store_check=True)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            assert stub.GetRun(service_pb2.GetRunRequest(run_id=run_id), timeout=30).num_records
            with pytest.raises(grpc.RpcError) as err:
                for _ in stub.WatchRun(service_pb2.WatchRunRequest(run_id=run_id), timeout=60):
                    pass
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            assert f"the run store {tmp_path / 'runs.sqlite3'} is damaged" in err.value.details()
    finally:
        handle.stop(grace=1.0)


@pytest.mark.parametrize(
    ("damage", "said"),
    [("CAST(X'7B22FF22' AS TEXT)", "is damaged"), ("'not json'", "is not readable JSON")],
)
def test_a_record_whose_text_is_damaged_is_data_loss_not_unavailable_or_internal(
    tmp_path, damage, said
):
    """A row the page check passes but that is no record (bytes that are not UTF-8, text
    that is not JSON): it was UNAVAILABLE (retried for 30 s by Run.stream) or INTERNAL."""
    run_id = _filled_store(tmp_path)
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        db.execute(
            f"UPDATE records SET record = {damage} WHERE run_id = ? AND iteration = 7", (run_id,)
        )
    db.close()
    handle = start_server(tmp_path)
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            seen = []
            with pytest.raises(grpc.RpcError) as err:
                for event in stub.WatchRun(service_pb2.WatchRunRequest(run_id=run_id), timeout=60):
                    seen += [r.iteration for r in event.records]
            assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
            assert said in err.value.details() and "--recover-store" in err.value.details()
            assert seen == list(range(7))  # every intact record before the damaged one
    finally:
        handle.stop(grace=1.0)


VERSION_0 = """
CREATE TABLE problems (problem_id TEXT PRIMARY KEY, blob BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, problem_id TEXT NOT NULL, spec TEXT NOT NULL, name TEXT,
    status TEXT NOT NULL, stop_reason TEXT, converged INTEGER, message TEXT, backend TEXT,
    created_at REAL, started_at REAL, finished_at REAL, num_records INTEGER NOT NULL,
    last_record TEXT);
CREATE INDEX runs_by_time ON runs (created_at DESC, run_id DESC);
CREATE TABLE records (
    run_id TEXT NOT NULL, iteration INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (run_id, iteration)) WITHOUT ROWID;
CREATE TABLE checkpoints (
    run_id TEXT NOT NULL, iteration INTEGER NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    params BLOB NOT NULL, state TEXT NOT NULL, PRIMARY KEY (run_id, iteration));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO problems VALUES ('p-old', x'0102', 5.0);
INSERT INTO runs VALUES ('r-old', 'p-old', '{"options": {}, "stopping": {}}', 'old', 'INTERRUPTED',
    'shutdown', 0, '', 'autograd', 1.0, 2.0, 0.0, 0, NULL);
"""


def test_a_version_0_store_is_migrated_and_its_runs_and_problems_are_the_anonymous_tenants(
    tmp_path,
):
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        db.executescript(VERSION_0)
    db.close()
    store = SQLiteRunStore(tmp_path)
    try:
        assert store.get_run("r-old").owner == "anonymous"
        assert [r.run_id for r in store.list_runs([], 10, None, "anonymous")] == ["r-old"]
        assert store.list_runs([], 10, None, "token:someone") == []
        assert store.get_problem("p-old", "anonymous") == b"\x01\x02"
        assert store.get_problem("p-old", "token:someone") is None
        assert store.enforce_problem_retention(0) == [], "an INTERRUPTED run still needs it"
        store.update_run("r-old", status="FAILED")
        assert store.enforce_problem_retention(0) == ["p-old"]
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_store_from_a_newer_server_is_refused(tmp_path):
    SQLiteRunStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    newest = f"schema version 99, newer than this server's {SCHEMA_VERSION}"
    with pytest.raises(StoreError, match=newest):
        SQLiteRunStore(tmp_path)


def test_the_store_files_are_readable_by_their_owner_only(tmp_path):
    """runs.sqlite3 and its -wal and -shm files hold every tenant's problems and results;
    they were created 0644 (the umask's), readable by every local user. Also the file a
    --recover-store writes."""
    from hessian_service.store.recovery import recover_store
    from hessian_service.store.sqlite import SQLiteRunStore

    store = SQLiteRunStore(tmp_path)
    store.put_problem("p-1", b"problem-bytes")
    files = sorted(tmp_path.glob("runs.sqlite3*"))
    assert {f.name for f in files} >= {"runs.sqlite3", "runs.sqlite3-wal", "runs.sqlite3-shm"}
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
    store.close()
    recover_store(tmp_path)
    assert (tmp_path / "runs.sqlite3").stat().st_mode & 0o777 == 0o600


def test_final_params_say_which_record_they_belong_to(tmp_path):
    """GetRun(include_params) of a running run returns its latest checkpoint, which later
    records have passed (the proto called it the last accepted iterate, with nothing to say
    which); params_iteration names that record: the loss at final_params is that record's
    (float64 reference), and a finished run's is its last record."""
    from conftest import start_server, wait_until
    from hessian_client import Client
    from long_runs import ENDLESS, long_run_problem

    problem = long_run_problem(4)
    handle = start_server(tmp_path, checkpoint_every=40, commit_every_records=1)
    try:
        with Client(handle.address, timeout=60) as client:
            run = client.start_run(problem, np.zeros(31), method="gradient_descent",
                                   learning_rate=0.05, stopping=ENDLESS)  # fmt: skip
            wait_until(lambda: client.get_run(run.id).num_records > 130, timeout=60)
            info = client.get_run(run.id, include_params=True)
            client.cancel_run(run.id)
            done = client.run(run.id).wait(60)
            assert info.params_iteration % 40 == 0 and info.params_iteration >= 80
            assert info.params_iteration < info.last_record.iteration or info.status != "RUNNING"
            records = {r.iteration: r.loss for r in client.run(run.id).stream()}
            at = client.compute_hessian(problem, info.final_params, omit_matrix=True).loss
            assert at == pytest.approx(records[info.params_iteration], rel=1e-12, abs=0)
            ended = client.get_run(run.id, include_params=True)
            assert ended.params_iteration == done.last_record.iteration == max(records)
            at = client.compute_hessian(problem, ended.final_params, omit_matrix=True).loss
            assert at == pytest.approx(records[max(records)], rel=1e-12, abs=0)
            assert client.get_run(run.id).params_iteration is None  # no params, no iteration
    finally:
        handle.stop(grace=1.0)


def test_getrun_params_and_last_record_are_one_moment(tmp_path, monkeypatch):
    """GetRun read the run's row, then its latest checkpoint in another query: a checkpoint
    committed between the two came with the older row (PostgreSQL replicas: params_iteration
    550 beside last_record 500). The row is read again then; and the row's record is taken
    over a live run's older one (the row can be read after a commit the run has not yet
    been told of)."""
    import dataclasses

    from conftest import start_server
    from hessian_client import Client, problems
    from hessian_service.server import codec
    from long_runs import EXACT

    handle = start_server(tmp_path, checkpoint_every=10)
    try:
        with Client(handle.address, timeout=60) as client:
            run = client.start_run(
                problems.rosenbrock(dim=2),
                np.zeros(2),
                method="gradient_descent",
                learning_rate=1e-3,
                stopping={"max_iterations": 49, **EXACT},
            )
            done = run.wait(60)
            real = handle.store.get_run
            row = real(run.id)
            stale = dataclasses.replace(row, num_records=30, last_record=None)
            reads = []

            def first_stale(run_id):
                reads.append(run_id)
                return stale if len(reads) == 1 else real(run_id)

            monkeypatch.setattr(handle.store, "get_run", first_stale)
            info = client.get_run(run.id, include_params=True)
            assert info.params_iteration == info.last_record.iteration == 49
            assert info.num_records == done.num_records == 50
        live = dataclasses.replace(row.last_record, iteration=20)
        wire = codec.run_to_wire(row, live)
        assert (wire.last_record.iteration, wire.num_records) == (49, 50)
    finally:
        handle.stop(grace=1.0)
