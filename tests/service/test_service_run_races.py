"""Races between ResumeRun, DeleteRun, the retention cap and WatchRun, made deterministic by a real
SQLite store whose methods run a one-shot hook at the racy point: a real server on loopback
answers NOT_FOUND or FAILED_PRECONDITION (never INTERNAL, never a run without a row), and a
watcher's final event always carries a final status."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from conftest import hold_record, start_server
from hessian_client import Client, problems, status_name
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.server import ServerConfig, build_server
from hessian_service.store import (
    RunConflictError,
    RunNotFoundError,
    RunRow,
    SQLiteRunStore,
    StoredCheckpoint,
)

GD = {"method": "gradient_descent", "learning_rate": 1e-4}
ITERATIONS = 3000
FINAL = ("FINISHED", "CANCELLED", "FAILED", "INTERRUPTED")


class HookedStore(SQLiteRunStore):
    """The real SQLite store; `hooks[name](run_id)` runs once inside method `name`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks: dict[str, Callable[[str], None]] = {}
        self._hook_lock = threading.Lock()

    def _fire(self, name: str, run_id: str) -> None:
        with self._hook_lock:
            hook = self.hooks.pop(name, None)
        if hook is not None:
            hook(run_id)

    def latest_checkpoint(self, run_id):
        checkpoint = super().latest_checkpoint(run_id)
        self._fire("latest_checkpoint", run_id)
        return checkpoint

    def delete_run(self, run_id, *args, **kwargs):
        self._fire("delete_run", run_id)
        return super().delete_run(run_id, *args, **kwargs)

    def records(self, run_id, from_iteration, limit):
        page = super().records(run_id, from_iteration, limit)
        self._fire("records", run_id)
        return page


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A data directory holding one INTERRUPTED run (the server stopped while it ran)."""
    handle = start_server(tmp_path)
    # record 0 is committed and seen; the run waits before storing record 1 until the
    # shutdown told it to stop, so it cannot finish first however slow the machine

    def stopped(run_id: str) -> bool:
        live = handle.runs.live(run_id)
        return live is None or live.cancel.cancelled

    held = hold_record(monkeypatch, handle.runs.store, 1, stopped)
    try:
        with Client(handle.address) as c:
            run = c.start_run(
                problems.rosenbrock(dim=2),
                np.zeros(2),
                stopping={"max_iterations": ITERATIONS},
                **GD,
            )
            next(iter(run.stream()))
    finally:
        handle.stop(grace=1.0)
    assert held == [True], "the run waited at record 1 until the shutdown stopped it"
    return tmp_path, run.id


@pytest.fixture
def hooked(interrupted):
    """A server over the interrupted run's data directory with a HookedStore."""
    data_dir, run_id = interrupted
    store = HookedStore(data_dir, commit_interval_s=0.05)
    config = ServerConfig(address="127.0.0.1:0", data_dir=str(data_dir), grace_seconds=2.0)
    handle = build_server(config, store=store)
    try:
        with Client(handle.address) as c:
            assert status_name(c.get_run(run_id)) == "INTERRUPTED"
        yield handle, store, run_id
    finally:
        handle.stop(grace=1.0)


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_resume_of_a_run_deleted_meanwhile_is_not_found(hooked):
    """DeleteRun won the race (the --max-stored-runs cap, which could too, no longer deletes
    INTERRUPTED runs)."""
    handle, store, run_id = hooked
    store.hooks["latest_checkpoint"] = lambda rid: store.delete_run(rid)
    with grpc.insecure_channel(handle.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        err = _rpc_error(
            lambda: stub.ResumeRun(service_pb2.ResumeRunRequest(run_id=run_id), timeout=30)
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert err.details().startswith("run_id:") and run_id in err.details()
        err = _rpc_error(lambda: stub.GetRun(service_pb2.GetRunRequest(run_id=run_id), timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert handle.runs.active_count() == 0, "nothing executes a run that has no row"


def test_delete_of_a_run_resumed_meanwhile_is_failed_precondition(hooked):
    handle, store, run_id = hooked
    with Client(handle.address) as c:
        store.hooks["delete_run"] = lambda rid: c.resume_run(rid)  # ResumeRun won the race
        with grpc.insecure_channel(handle.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            request = service_pb2.DeleteRunRequest(run_id=run_id)
            err = _rpc_error(lambda: stub.DeleteRun(request, timeout=30))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert err.details().startswith("run_id:") and run_id in err.details()
        info = c.run(run_id).wait(60)
        assert status_name(info) == "FINISHED", info.message
        assert info.num_records == ITERATIONS + 1
        assert [r.iteration for r in c.run(run_id).stream()] == list(range(ITERATIONS + 1))


def test_a_conditional_update_or_delete_that_matches_no_row_says_why(tmp_path):
    store = SQLiteRunStore(tmp_path)
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    store.create_run(
        RunRow("r-a", "p-1", spec, status="FINISHED"),
        StoredCheckpoint(0, "float64", [2], bytes(16)),
    )
    with pytest.raises(RunConflictError, match=r"run_id: run r-a is FINISHED, not INTERRUPTED"):
        store.update_run("r-a", expect_status=("INTERRUPTED",), status="QUEUED")
    with pytest.raises(RunNotFoundError, match=r"run_id: run r-b does not exist"):
        store.update_run("r-b", expect_status=("INTERRUPTED",), status="QUEUED")
    with pytest.raises(RunNotFoundError):
        store.update_run("r-b", status="FAILED")
    store.update_run("r-a", status="RUNNING")
    with pytest.raises(RunConflictError, match="is RUNNING"):
        store.delete_run("r-a", statuses=FINAL)
    assert store.get_run("r-a").status == "RUNNING"
    store.update_run("r-a", expect_status=("RUNNING",), status="INTERRUPTED")
    assert store.delete_run("r-a", statuses=FINAL) and store.get_run("r-a") is None
    store.close()


def test_a_watch_that_a_resume_overtakes_ends_with_the_resumed_runs_final_status(hooked):
    handle, store, run_id = hooked
    with Client(handle.address) as c:
        kept = c.get_run(run_id).num_records
        # ResumeRun lands after WatchRun found no live run and while it reads the stored records
        store.hooks["records"] = lambda rid: c.resume_run(rid)
        run = c.run(run_id)
        iterations = [r.iteration for r in run.stream()]
        assert status_name(run.final) == "FINISHED", status_name(run.final)
        assert run.final.num_records == ITERATIONS + 1
        assert 0 < kept < ITERATIONS
        assert iterations == list(range(ITERATIONS + 1)), "every record exactly once"
