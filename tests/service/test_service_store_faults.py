"""A store that refuses a run's last writes (an I/O error on the final status, a full store, a
shutdown racing StartRun): a real server over a real SQLite file always leaves the run in a
state GetRun reports honestly and ResumeRun accepts, loses nothing committed, and never answers
INTERNAL."""

from __future__ import annotations

import re
import sqlite3
import threading

import grpc
import numpy as np
import pytest
from conftest import start_server
from hessian_client import Client, ResourceExhausted, problems, status_name
from hessian_client.proto import optimize_pb2, service_pb2, service_pb2_grpc
from hessian_service.engine.records import StepRecord
from hessian_service.server import ServerConfig, build_server
from hessian_service.store import (
    RunRow,
    SQLiteRunStore,
    StoreClosedError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from store_full_runs import (
    CAPPED_ITERATIONS,
    GD,
    assert_resumed_run_lost_nothing,
    start_capped_run,
    stream_until_full,
)

ITERATIONS = 60


class FlakyStore(SQLiteRunStore):
    """The real SQLite store; writing a run's end (`finished_at`) fails `failures` more times,
    and `on_create(run_id)` runs once inside create_run after the row is inserted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures = 0
        self.refused = 0
        self.on_create = None
        self._flaky_lock = threading.Lock()

    def update_run(self, run_id, **values):
        with self._flaky_lock:
            fail = "finished_at" in values and self.failures > 0
            if fail:
                self.failures -= 1
                self.refused += 1
        if fail:
            raise StoreError(f"the run store {self.path} cannot be written: injected I/O error")
        return super().update_run(run_id, **values)

    def create_run(self, row, checkpoint, **options):
        super().create_run(row, checkpoint, **options)
        hook, self.on_create = self.on_create, None
        if hook is not None:
            hook(row.run_id)


@pytest.fixture
def flaky(tmp_path):
    store = FlakyStore(tmp_path, commit_interval_s=0.05)
    config = ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), grace_seconds=2.0)
    handle = build_server(config, store=store)
    yield handle, store
    handle.stop(grace=1.0)


def _start(c: Client):
    stopping = {"max_iterations": ITERATIONS, "gradient_tolerance": 0.0}
    return c.start_run(problems.rosenbrock(dim=3), np.zeros(3), stopping=stopping, **GD)


def test_a_final_status_write_that_fails_once_is_retried(flaky):
    handle, store = flaky
    store.failures = 1
    with Client(handle.address) as c:
        run = _start(c)
        records = list(run.stream())
        assert store.refused == 1
        assert status_name(run.final) == "FINISHED", run.final.message
        assert [r.iteration for r in records] == list(range(ITERATIONS + 1))
        assert status_name(c.get_run(run.id)) == "FINISHED"


def test_a_run_whose_end_cannot_be_stored_is_interrupted_and_resumes(flaky):
    handle, store = flaky
    with Client(handle.address) as c:
        reference = [r.loss for r in _start(c).stream()]
        store.failures = 10**6  # the store refuses the end until the test lets it write again
        run = _start(c)
        info = run.wait(60)
        assert status_name(info) == "INTERRUPTED"
        assert "could not be stored" in info.message and "injected I/O error" in info.message
        assert status_name(c.get_run(run.id)) == "INTERRUPTED"
        assert run.id in {r.run_id for r in c.list_runs(["INTERRUPTED"])}
        with store._flaky_lock:
            store.failures = 0
        resumed = c.resume_run(run.id)
        final = resumed.wait(60)
        assert status_name(final) == "FINISHED", final.message
        losses = [r.loss for r in c.run(run.id).stream()]
        assert losses == reference, "the resumed run's records are the uninterrupted run's"
    assert store.get_run(run.id).status == "FINISHED"


def test_a_run_admitted_as_the_server_shuts_down_is_stored_interrupted(flaky):
    handle, store = flaky
    store.on_create = lambda run_id: handle.runs.shutdown(timeout=0.1)
    request = service_pb2.StartRunRequest(
        problem=problems.rosenbrock(dim=2),
        options=optimize_pb2.MethodOptions(method=optimize_pb2.METHOD_GRADIENT_DESCENT),
    )
    with grpc.insecure_channel(handle.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRun(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert err.value.details().startswith("server: shutting down")
    run_id = re.search(r"r-[0-9a-f]{32}", err.value.details()).group(0)
    row = store.get_run(run_id)
    assert (row.status, row.stop_reason) == ("INTERRUPTED", "shutdown")
    assert store.latest_checkpoint(run_id).iteration == 0, "ResumeRun can start it later"


def test_a_run_the_full_store_stops_is_stored_interrupted_and_resumes_once_space_returns(
    tmp_path,
):
    handle = start_server(tmp_path, max_store_bytes=96 * 1024, commit_every_records=16)
    try:
        with Client(handle.address) as c:
            run = start_capped_run(c)  # about 300 KB of records: far over the 96 KiB cap
            seen = stream_until_full(run)
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED", info.message
            assert info.stop_reason == "error"
            assert "is full" in info.message and "ResumeRun" in info.message
            assert len(seen) <= info.num_records < CAPPED_ITERATIONS
            # resumed while the store is still full, it was answered OK and stopped again
            # at once: refused as StartRun is
            with pytest.raises(ResourceExhausted, match="is full"):
                c.resume_run(run.id)
            assert status_name(c.get_run(run.id)) == "INTERRUPTED"
        with sqlite3.connect(tmp_path / "runs.sqlite3") as db:  # stored so, not only reported
            row = db.execute("SELECT status, message FROM runs WHERE run_id = ?", (run.id,))
            status, message = row.fetchone()
        assert status == "INTERRUPTED" and "is full" in message
    finally:
        handle.stop(grace=1.0)
    reopened = start_server(tmp_path)  # space returns: the same data without the cap
    try:
        with Client(reopened.address) as c:
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED" and "is full" in info.message
            assert_resumed_run_lost_nothing(c, run.id, seen, timeout=60)
    finally:
        reopened.stop(grace=1.0)


def test_a_store_full_of_records_still_takes_the_status_write_that_ends_a_run(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=8, commit_interval_s=3600, max_bytes=128 * 1024)
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    checkpoint = StoredCheckpoint(0, "float64", [2], bytes(16))
    store.create_run(RunRow("r-a", "p-1", spec, status="RUNNING"), checkpoint)
    with pytest.raises(StoreFullError):
        for i in range(100_000):
            store.append_record("r-a", StepRecord(iteration=i, loss=1.0, backend="x" * 200))
    committed = store.get_run("r-a").num_records
    assert store.discard_queued("r-a") > 0  # the uncommitted tail: never acknowledged
    store.update_run("r-a", status="INTERRUPTED", stop_reason="error", message="m" * 6000)
    row = store.get_run("r-a")
    assert (row.status, row.num_records, len(row.message)) == ("INTERRUPTED", committed, 6000)
    with pytest.raises(StoreFullError):  # no new work while it is full
        store.create_run(RunRow("r-b", "p-1", spec), checkpoint)
    assert store.delete_run("r-a", statuses=("INTERRUPTED",))
    store.create_run(RunRow("r-b", "p-1", spec), checkpoint)  # the space is free again
    store.close()


def test_a_closed_store_refuses_every_call_with_a_store_error(tmp_path):
    store = SQLiteRunStore(tmp_path)
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    checkpoint = StoredCheckpoint(0, "float64", [2], bytes(16))
    store.create_run(RunRow("r-a", "p-1", spec, status="RUNNING"), checkpoint)
    store.close()
    store.close()  # twice is harmless (the server's stop may race a signal)
    calls = [
        lambda: store.update_run("r-a", status="FAILED"),
        lambda: store.append_record("r-a", StepRecord(iteration=0, loss=1.0)),
        lambda: store.put_checkpoint("r-a", checkpoint),
        lambda: store.get_run("r-a"),
        lambda: store.records("r-a", 0, 10),
        lambda: store.list_runs([], 10, None),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError, match=r"runs\.sqlite3 is closed"):
            call()


def test_one_start_too_big_for_the_room_left_does_not_refuse_the_next(tmp_path):
    """A StartRun whose starting checkpoint (2.4 MB) alone does not fit is refused; a small
    one after it is accepted (the failed write marked the whole store full until a delete)."""
    handle = start_server(tmp_path, max_store_bytes=1 << 20, max_params=400_000)
    try:
        with Client(handle.address) as c:
            with pytest.raises(ResourceExhausted, match="is full"):
                c.start_run(problems.rosenbrock(dim=300_000), np.zeros(300_000), method="newton_cg")
            small = c.start_run(problems.rosenbrock(dim=3), np.zeros(3),
                                stopping={"max_iterations": 2})  # fmt: skip
            assert small.wait(30).status == "FINISHED"
    finally:
        handle.stop()


@pytest.mark.parametrize("cap", [0, 10 * 2**20])
def test_a_full_store_says_what_frees_it(tmp_path, cap):
    # a full disk (no cap) advised DeleteRun, which needs room in the log too and failed
    # alike; only under --max-store-bytes do deletes have reserve pages
    store = SQLiteRunStore(tmp_path, max_bytes=cap)
    try:
        err = store._error(sqlite3.OperationalError("database or disk is full"))
    finally:
        store.close()
    assert isinstance(err, StoreFullError) and "is full" in str(err)
    if cap:
        assert f"--max-store-bytes {cap}" in str(err) and "delete runs (DeleteRun" in str(err)
    else:
        assert "the disk holding it has no room left" in str(err)
        assert "set --max-store-bytes below the disk's size" in str(err)


def test_a_data_dir_deleted_under_the_server_stops_every_write_instead_of_losing_it(tmp_path):
    """After `rm -rf --data-dir`, SQLite wrote on into the unlinked file: StartRun, records
    and ends were acknowledged (a run FINISHED with 501 records), and all of it was gone at
    the next start. Every commit now checks the file is still the store's: writes fail
    UNAVAILABLE naming it, a live run stops (not FINISHED), nothing is acknowledged."""
    import shutil

    from hessian_client import Unavailable

    data = tmp_path / "data"
    handle = start_server(data)
    try:
        with Client(handle.address, timeout=60) as client:
            slow = {"method": "gradient_descent", "learning_rate": 1e-7}
            live = client.start_run(problems.rosenbrock(2), np.zeros(2), **slow,
                                    stopping={"max_iterations": 1_000_000})  # fmt: skip
            next(iter(live.stream()))  # running, its first record stored
            shutil.rmtree(data)
            with pytest.raises(Unavailable, match="was deleted or replaced"):
                client.start_run(problems.rosenbrock(2), np.zeros(2))
            final = live.wait(timeout=60)
            assert final.status == "INTERRUPTED" and "deleted or replaced" in final.message
    finally:
        handle.stop(grace=1.0)


def test_a_write_ahead_log_deleted_under_the_server_stops_every_write(tmp_path):
    """Deleting runs.sqlite3-wal alone: SQLite wrote on into the unlinked log, whose commits
    reach the store file only at a checkpoint; after a kill -9 a FINISHED run and 5,301
    acknowledged records were gone. The log's identity is checked at each commit too."""
    from hessian_client import Unavailable

    data = tmp_path / "data"
    handle = start_server(data)
    try:
        with Client(handle.address, timeout=60) as client:
            client.start_run(problems.rosenbrock(2), np.zeros(2), stopping={"max_iterations": 2})
            (data / "runs.sqlite3-wal").unlink()
            with pytest.raises(Unavailable, match="deleted or replaced"):
                client.start_run(problems.rosenbrock(2), np.zeros(2))
    finally:
        handle.stop(grace=1.0)


def test_a_data_dir_moved_back_serves_the_next_run_in_full(tmp_path):
    """Moved away, a write refused, moved back: the next StartRun was answered OK and its run
    INTERRUPTED at once with the stale "deleted or replaced" (the refusal was kept as the
    queue's failure though it had taken no records)."""
    from hessian_client import Unavailable

    data, away = tmp_path / "data", tmp_path / "away"
    handle = start_server(data)
    try:
        with Client(handle.address, timeout=60) as client:
            data.rename(away)
            with pytest.raises(Unavailable, match="deleted or replaced"):
                client.start_run(problems.rosenbrock(2), np.zeros(2))
            away.rename(data)
            runs = [client.start_run(problems.rosenbrock(2), np.zeros(2),
                                     stopping={"max_iterations": 3}) for _ in range(3)]  # fmt: skip
            assert [r.wait(timeout=60).status for r in runs] == ["FINISHED"] * 3
            assert [r.info().num_records for r in runs] == [4] * 3
    finally:
        handle.stop(grace=1.0)
