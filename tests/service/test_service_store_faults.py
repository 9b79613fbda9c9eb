"""A store that refuses a run's last writes (an I/O error on the final status, a full store, a
shutdown racing StartRun): a real server over a real SQLite file always leaves the run in a
state GetRun reports honestly and ResumeRun accepts, loses nothing committed, and never answers
INTERNAL."""

from __future__ import annotations

import re
import threading

import grpc
import numpy as np
import pytest
from hessian_client import Client, problems, status_name
from hessian_client.proto import optimize_pb2, service_pb2, service_pb2_grpc
from hessian_service.server import ServerConfig, build_server
from hessian_service.store import SQLiteRunStore, StoreError

GD = {"method": "gradient_descent", "learning_rate": 1e-3}
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

    def create_run(self, row, checkpoint):
        super().create_run(row, checkpoint)
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
