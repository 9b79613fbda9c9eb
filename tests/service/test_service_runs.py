"""Runs through a real server: streaming, resuming after a dropped connection, cancel, listing."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from conftest import hold_record, start_server
from hessian_client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    problems,
    status_name,
)
from hessian_client.proto import service_pb2
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.engine.solvers.methods import Stepper
from long_runs import EXACT, gd_run
from tcp_proxy import TcpProxy


def _slow_newton_problem():
    """An MLP whose Newton iterations take milliseconds, for cancel and shutdown tests."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 6))
    y = np.tanh(x @ rng.standard_normal((6, 1)))
    return problems.mlp(x, y, layer_sizes=[6, 16, 12, 1], l2=1e-3)


def test_watch_from_k_after_a_cancelled_stream_yields_each_record_once(client, stub):
    run = gd_run(client, 400)
    info = run.wait()
    assert status_name(info) == "FINISHED" and info.num_records == 401
    first = []
    call = stub.WatchRun(service_pb2.WatchRunRequest(run_id=run.id, from_iteration=0))
    for event in call:
        first.extend(event.records)
        if len(first) >= 150:
            call.cancel()
            break
    first = first[:150]
    k = first[-1].iteration + 1
    rest = [
        record
        for e in stub.WatchRun(service_pb2.WatchRunRequest(run_id=run.id, from_iteration=k))
        for record in e.records
    ]
    iterations = [r.iteration for r in first + rest]
    assert iterations == list(range(401))


def test_stream_dropped_mid_run_resumes_transparently(server, monkeypatch):
    # The run's worker waits before storing record 200 (and 900) until the connection has been
    # cut after record 199 (899): the client cannot have buffered past the cut, so only a
    # reconnect brings the rest (60 s: a hang guard only).
    severed = {200: threading.Event(), 900: threading.Event()}
    store = server.runs.store

    def dropped(run_id: str) -> bool:
        return store.get_run(run_id).name == "dropped"

    held = [
        hold_record(monkeypatch, store, k, lambda _, cut=cut: cut.is_set(), only=dropped)
        for k, cut in severed.items()
    ]
    proxy = TcpProxy(server.address)
    try:
        with Client(proxy.address, timeout=30) as via_proxy, Client(server.address) as direct:
            run = gd_run(via_proxy, 1500, name="dropped")
            seen = []
            for record in run.stream(reconnect_timeout=20):
                seen.append(record)
                if len(seen) in severed:
                    proxy.sever()
                    severed[len(seen)].set()
            assert held == [[True], [True]], "the run waited at both cuts"
            assert proxy.accepted >= 3, "the stream should have reconnected twice"
            assert [r.iteration for r in seen] == list(range(1501))
            reference = list(direct.run(run.id).stream())
            assert [r.raw.SerializeToString() for r in seen] == [
                r.raw.SerializeToString() for r in reference
            ]
            assert status_name(run.final) == "FINISHED"
    finally:
        for event in severed.values():
            event.set()
        proxy.close()


def test_two_watchers_of_one_run_see_the_same_records(server):
    with Client(server.address) as a, Client(server.address) as b:
        run = gd_run(a, 1500)
        results: dict[str, list[bytes]] = {}

        def watch(name: str, c: Client) -> None:
            results[name] = [r.raw.SerializeToString() for r in c.run(run.id).stream()]

        threads = [threading.Thread(target=watch, args=(n, c)) for n, c in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results["a"]) == 1501
        assert results["a"] == results["b"]


def test_cancel_stops_a_long_run_within_one_iteration(client, monkeypatch):
    # The run's worker is held inside its third step (an event, not a clock), the run is
    # cancelled there, then released: no step may start after the cancel.
    inside, release = threading.Event(), threading.Event()
    steps = []
    step = Stepper.step

    def held_step(self, point):
        if self.objective.name == "mlp":
            steps.append(point)
            if len(steps) == 3:
                inside.set()
                assert release.wait(60)
        return step(self, point)

    monkeypatch.setattr(Stepper, "step", held_step)
    run = client.start_run(
        _slow_newton_problem(),
        seed=0,
        method="newton",
        damping=1e-3,
        backend="autograd",
        stopping={"max_iterations": 100_000, **EXACT},
    )
    assert inside.wait(60)
    run.cancel()
    release.set()
    records = list(run.stream())  # the client's 60 s call timeout guards against a hang
    final = run.final
    assert status_name(final) == "CANCELLED"
    assert final.stop_reason == "cancelled"
    assert len(steps) == 3  # the step in flight completed; none started after the cancel
    last = records[-1]
    # The final record is the point it stopped at: the one the third step reached.
    assert last.iteration == 3
    assert last.step_norm == 0.0
    assert [r.iteration for r in records] == list(range(4))


def test_run_result_get_list_and_delete(client):
    run = gd_run(client, 50, name="listed")
    result = run.result()
    assert result.status == "FINISHED"
    objective = make_objective("rosenbrock", {}, {"dim": 4})
    reference = Run(
        objective,
        torch.zeros(4, dtype=torch.float64),
        MethodOptions(method="gradient_descent", learning_rate=1e-4),
        StopCriteria(max_iterations=50, **EXACT),
    )
    reference.run_to_end()
    np.testing.assert_array_equal(result.params, reference.params.numpy())
    records = list(client.run(run.id).stream())
    assert result.info.last_record.raw.SerializeToString() == records[-1].raw.SerializeToString()
    finished = list(client.list_runs(status=["FINISHED"], page_size=2))
    ids = [i.run_id for i in finished]
    assert run.id in ids and len(ids) == len(set(ids))
    assert all(status_name(i) == "FINISHED" for i in finished)
    created = [i.created_at for i in finished]
    assert created == sorted(created, reverse=True)
    # one name as a string, any case (it was iterated letter by letter: "got 'F'")
    again = list(client.list_runs(status="finished", page_size=2))
    assert run.id in [i.run_id for i in again]
    assert all(status_name(i) == "FINISHED" for i in again)
    with pytest.raises(InvalidArgument) as err:
        list(client.list_runs(status=["FINISHED", 3]))
    assert err.value.field == "status"
    assert client.delete_run(run.id)
    with pytest.raises(NotFound, match="run_id"):
        client.get_run(run.id)


def test_full_run_queue_is_resource_exhausted(tmp_path):
    handle = start_server(tmp_path, workers=1, max_concurrent_runs=1)
    try:
        with Client(handle.address) as c:
            first = gd_run(c, 1_000_000)
            with pytest.raises(ResourceExhausted, match="max_concurrent_runs"):
                gd_run(c, 10)
            first.cancel()
            assert status_name(first.wait()) == "CANCELLED"
    finally:
        handle.stop(grace=1.0)


def test_watch_unknown_run_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchRun(service_pb2.WatchRunRequest(run_id="r-nope")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "run_id" in err.value.details()


def test_a_run_in_the_wrong_status_is_refused_naming_run_id_as_a_field(client):
    # RunConflictError said "run_id: ..." but carried no field: no BadRequest violation
    run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 2})
    run.wait()
    with pytest.raises(FailedPrecondition) as err:
        client.resume_run(run.id)
    assert err.value.field == "run_id" and "is FINISHED" in str(err.value)
