"""Watch from anywhere: on one PostgreSQL store, WatchRun on replica B streams a run that
replica A executes, live (pushed by NOTIFY: the fallback poll is set to a minute here), every
record exactly once and in order, and from any iteration."""

from __future__ import annotations

import contextlib
import threading

import grpc
import numpy as np
import pytest
from conftest import hold_record, start_server
from hessian_client import Client, problems, status_name
from hessian_client.proto import service_pb2, service_pb2_grpc
from hessian_service.server import runs as runs_module
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

EXACT = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}


def _problem():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 10))
    y = (x[:, 0] + 0.5 * rng.standard_normal(300) > 0).astype(np.float64)
    return problems.logistic_regression(x, y, l2=1e-3)


def _start(client: Client, iterations: int):
    """Gradient descent on the logistic problem for exactly `iterations`."""
    return client.start_run(
        _problem(),
        method="gradient_descent",
        learning_rate=0.05,
        stopping={"max_iterations": iterations, **EXACT},
    )


def _watch(address: str, run_id: str, start: int, out: list, first: threading.Event) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        request = service_pb2.WatchRunRequest(run_id=run_id, from_iteration=start)
        for event in stub.WatchRun(request, timeout=120):
            out.extend((r.iteration, r.loss) for r in event.records)
            if event.records:
                first.set()
            if event.HasField("final"):
                out.append(("final", status_name(event.final)))


@pytest.mark.slow
def test_watch_on_another_replica_is_live_and_complete(tmp_path, postgres_dsn, monkeypatch):
    monkeypatch.setattr(runs_module, "WATCH_POLL_SECONDS", 60.0)  # only a push wakes it
    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", commit_interval_ms=20)
    b = start_server(tmp_path / "b", store=postgres_dsn, replica_id="b", commit_interval_ms=20)
    # A's worker waits before storing record 100 until the test has seen the run live, so the
    # 3000-iteration run cannot finish first on a slow machine (60 s: a hang guard only)
    checked = threading.Event()
    held = hold_record(monkeypatch, a.runs.store, 100, lambda _: checked.is_set())
    try:
        with Client(a.address) as ca:
            run = _start(ca, 3000)
            streams: dict[int, list] = {0: [], 40: []}
            firsts = {k: threading.Event() for k in streams}
            threads = [
                threading.Thread(target=_watch, args=(b.address, run.id, k, streams[k], firsts[k]))
                for k in streams
            ]
            for t in threads:
                t.start()
            assert firsts[0].wait(60)
            # live: B's watcher got records while A was still executing the run
            assert status_name(ca.get_run(run.id)) in ("QUEUED", "RUNNING")
            checked.set()
            info = run.wait(120)
            for t in threads:
                t.join(120)
            assert status_name(info) == "FINISHED"
            served = [(r.iteration, r.loss) for r in ca.run(run.id).stream()]
        assert held == [True], "the run waited until it was seen live"
        assert [it for it, _ in served] == list(range(3001))
        assert streams[0] == [*served, ("final", "FINISHED")]
        assert streams[40] == [*served[40:], ("final", "FINISHED")]
    finally:
        checked.set()
        b.stop()
        a.stop()


@pytest.mark.slow
def test_an_end_committed_after_the_last_record_reaches_another_replicas_watcher(
    tmp_path, postgres_dsn, monkeypatch
):
    """A's end waits until every record is committed and B's watcher, having sent them all,
    waits for a push; the end's commit then carries no record. B must still hear of it by
    push (the fallback poll is an hour), not only when a record commits."""
    monkeypatch.setattr(runs_module, "WATCH_POLL_SECONDS", 3600.0)
    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", commit_interval_ms=20)
    b = start_server(tmp_path / "b", store=postgres_dsn, replica_id="b", commit_interval_ms=20)
    iterations = 50
    idle = threading.Event()  # B's watcher waits for a push with every record sent
    commit_wake = b.runs.commit_wake

    @contextlib.asynccontextmanager
    async def watched_wake(run_id: str):
        async with commit_wake(run_id) as woken:  # listening from here on

            async def wait(timeout: float) -> None:
                last = a.runs.store.get_run(run_id).last_record
                if last is not None and last.iteration == iterations:
                    idle.set()
                await woken(timeout)

            yield wait

    monkeypatch.setattr(b.runs, "commit_wake", watched_wake)
    finish = a.runs.store.finish_run
    held = []

    def held_finish(run_id, checkpoint, **fields):
        held.append(idle.wait(60))
        finish(run_id, checkpoint, **fields)

    monkeypatch.setattr(a.runs.store, "finish_run", held_finish)
    try:
        with Client(a.address) as ca:
            run = _start(ca, iterations)
            out: list = []
            watcher = threading.Thread(
                target=_watch, args=(b.address, run.id, 0, out, threading.Event())
            )
            watcher.start()
            watcher.join(120)
            assert not watcher.is_alive(), "B's watcher never heard of the run's end"
            served = [(r.iteration, r.loss) for r in ca.run(run.id).stream()]
    finally:
        idle.set()
        b.stop()
        a.stop()
    assert held == [True], "A's end waited for B's idle watcher"
    assert out == [*served, ("final", "FINISHED")]
    assert [it for it, _ in served] == list(range(iterations + 1))
