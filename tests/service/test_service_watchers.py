"""WatchRun on the grpc.aio server: idle watchers hold no thread (health and unary calls still
answer, every watcher gets every record), and records deleted from the store behind a run's
last record end the stream with DATA_LOSS instead of an endless re-read."""

from __future__ import annotations

import sqlite3
import threading

import grpc
import numpy as np
import pytest
from conftest import occupy_workers, start_server, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hessian_client import Client, DataLoss, problems, status_name
from hessian_client.proto import service_pb2, service_pb2_grpc
from waiting import ended_within

WATCHERS = 1000
RPC_THREADS = 8
STOPPING = {
    "max_iterations": 6,
    "gradient_tolerance": 0.0,
    "function_tolerance": 0.0,
    "parameter_tolerance": 0.0,
}


@pytest.mark.slow
def test_a_thousand_idle_watchers_hold_no_thread_and_all_get_every_record(tmp_path):
    handle = start_server(tmp_path, workers=1, rpc_threads=RPC_THREADS)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    problem = problems.quadratic(a @ a.T + 6 * np.eye(6), rng.standard_normal(6))
    x0 = rng.standard_normal(6)
    # the only run worker waits on `gate`, so the watched run stays QUEUED: an idle wait
    gate = occupy_workers(handle)
    try:
        with Client(handle.address, timeout=60) as c:
            solo = c.newton_step(problem, x0, timeout=30)
            run = c.start_run(
                problem, x0, method="gradient_descent", learning_rate=0.01, stopping=STOPPING
            )
            assert status_name(c.get_run(run.id)) == "QUEUED"
            before = threading.active_count()
            with grpc.insecure_channel(handle.address) as channel:
                stub = service_pb2_grpc.HessianServiceStub(channel)
                request = service_pb2.WatchRunRequest(run_id=run.id)
                calls = [stub.WatchRun(request, timeout=300) for _ in range(WATCHERS)]
                live = handle.runs.live(run.id)
                assert wait_until(lambda: live.watchers == WATCHERS), live.watchers
                waiting = threading.active_count()
                # a watcher is a listener on the run, not a thread: at most the RPC pool grew
                assert waiting - before <= RPC_THREADS + 2, (before, waiting)
                # liveness, not speed: a loaded machine with 1000 open streams has a minute
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                busy = c.newton_step(problem, x0, timeout=60)
                assert np.array_equal(busy.params, solo.params)
                assert status_name(c.get_run(run.id)) == "QUEUED"
                gate.set()
                streams = []
                for call in calls:
                    events = list(call)
                    streams.append(
                        ([r.SerializeToString() for e in events for r in e.records], events[-1])
                    )
            stored = [r.raw.SerializeToString() for r in c.run(run.id).stream()]
        assert len(stored) == STOPPING["max_iterations"] + 1
        for records, last in streams:
            assert records == stored
            assert last.HasField("final") and status_name(last.final) == "FINISHED"
        assert wait_until(lambda: live.watchers == 0)
    finally:
        gate.set()
        handle.stop(grace=1.0)


def _finished_run(c: Client) -> tuple[str, int]:
    """A run of 10 records (iterations 0..9) that has FINISHED."""
    rng = np.random.default_rng(1)
    run = c.start_run(
        problems.mse(rng.standard_normal(4)),
        np.zeros(4),
        method="gradient_descent",
        learning_rate=0.1,
        stopping=STOPPING | {"max_iterations": 9},
    )
    info = run.wait(timeout=60)
    assert status_name(info) == "FINISHED" and info.num_records == 10
    return run.id, 10


@pytest.mark.parametrize(
    ("deleted", "watch_from", "delivered"),
    [((3, 5), 0, [0, 1, 2]), ((7, 9), 0, list(range(7))), ((0, 9), 0, []), ((4, 6), 5, [])],
)
def test_records_missing_behind_the_last_record_end_the_watch_with_data_loss(
    tmp_path, deleted, watch_from, delivered
):
    handle = start_server(tmp_path)
    try:
        with Client(handle.address, timeout=30) as c:
            run_id, _ = _finished_run(c)
            with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
                db.execute(
                    "DELETE FROM records WHERE run_id = ? AND iteration BETWEEN ? AND ?",
                    (run_id, *deleted),
                )
            with grpc.insecure_channel(handle.address) as channel:
                stub = service_pb2_grpc.HessianServiceStub(channel)
                request = service_pb2.WatchRunRequest(run_id=run_id, from_iteration=watch_from)
                got: list[int] = []
                with pytest.raises(grpc.RpcError) as caught:
                    for event in stub.WatchRun(request, timeout=20):
                        got += [r.iteration for r in event.records]
            assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value.details()
            first = max(deleted[0], watch_from)
            assert got == delivered
            details = caught.value.details()
            assert run_id in details and f"iterations {first} to {deleted[1]}" in details
            # the SDK's Run.stream raises (it used to re-read forever)
            outcome = ended_within(lambda: list(c.run(run_id).stream(watch_from)), 30, "Run.stream")
            assert isinstance(outcome.get("error"), DataLoss), outcome
            assert outcome["error"].code == grpc.StatusCode.DATA_LOSS
    finally:
        handle.stop(grace=1.0)


def test_a_watcher_that_goes_away_is_removed_from_its_run(tmp_path):
    handle = start_server(tmp_path, workers=1)
    gate = occupy_workers(handle)  # keeps the watched run QUEUED
    try:
        with Client(handle.address, timeout=30) as c:
            run = c.start_run(problems.mse(np.ones(3)), np.zeros(3), stopping=STOPPING)
            live = handle.runs.live(run.id)
            with grpc.insecure_channel(handle.address) as channel:
                stub = service_pb2_grpc.HessianServiceStub(channel)
                request = service_pb2.WatchRunRequest(run_id=run.id)
                calls = [stub.WatchRun(request, timeout=120) for _ in range(3)]
                assert wait_until(lambda: live.watchers == 3)
                calls[0].cancel()
                assert wait_until(lambda: live.watchers == 2)
            assert wait_until(lambda: live.watchers == 0), "closing the channel cancels the rest"
            assert status_name(c.get_run(run.id)) == "QUEUED"
    finally:
        gate.set()
        handle.stop(grace=1.0)
