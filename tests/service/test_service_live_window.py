"""A live run holds a bounded window of records in memory (a run of a million iterations
would otherwise hold half a gigabyte until it ends); a watcher that starts behind the window,
or falls behind it while following, gets the records it lacks from the store, without a gap
and equal to what the engine computes in process."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import hold_record, start_server, wait_until
from hessian_client import Client, status_name
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.server.runs import LiveRun
from hessian_service.store.base import ACTIVE_STATUSES
from long_runs import EXACT, gd_run

KEEP = 32  # the window under test; the server's is LiveRun.KEEP


@pytest.fixture
def handle(tmp_path, monkeypatch):
    monkeypatch.setattr(LiveRun, "KEEP", KEEP)
    server = start_server(tmp_path, workers=1)
    yield server
    server.stop()


def _engine_losses(iterations: int) -> list[float]:
    """The same run in process: the reference every served loss must equal bit for bit."""
    objective = make_objective("rosenbrock", {}, {"dim": 4})
    options = MethodOptions(method="gradient_descent", learning_rate=1e-4)
    stopping = StopCriteria(max_iterations=iterations, **EXACT)
    return [r.loss for r in Run(objective, torch.zeros(4, dtype=torch.float64), options, stopping)]


def test_a_long_run_holds_a_bounded_window_and_a_late_watcher_reads_the_rest(handle, monkeypatch):
    iterations, hold_at = 3000, 2000
    reached, release = threading.Event(), threading.Event()
    held = hold_record(
        monkeypatch, handle.runs.store, hold_at, lambda _: release.is_set(), reached=reached
    )
    try:
        with Client(handle.address, timeout=60) as client:
            run = gd_run(client, iterations)
            live = handle.runs.live(run.id)
            assert reached.wait(60), "the run never reached the hold"
            assert wait_until(lambda: live.durable == hold_at)  # 0 .. hold_at - 1 committed
            # the memory bound: at most 2 KEEP committed records (and none uncommitted) held
            assert hold_at - live.first_held() <= 2 * KEEP, live.first_held()
            assert live.dropped >= hold_at - 2 * KEEP
            stream = run.stream()
            early = [next(stream) for _ in range(10)]  # from the store: let go long ago
            release.set()
            served = early + list(stream)
            stored = list(client.run(run.id).stream())
            final = client.get_run(run.id)
    finally:
        release.set()
    assert held == [True], "the run waited at the hold"
    assert status_name(final) == "FINISHED"
    assert [r.iteration for r in served] == list(range(iterations + 1))
    assert [r.raw.SerializeToString() for r in served] == [
        r.raw.SerializeToString() for r in stored
    ]
    assert [r.loss for r in served] == _engine_losses(iterations)


def test_a_watcher_that_falls_behind_the_window_continues_from_the_store(handle, monkeypatch):
    iterations = 4000
    store = handle.runs.store
    with Client(handle.address, timeout=60) as client:
        run = gd_run(client, iterations)
        live = handle.runs.live(run.id)
        real = live.committed_from
        calls: list[bool] = []  # per call: whether the index was let go already
        delivered, ended = threading.Event(), threading.Event()

        def stalled(index):
            # the watcher's first read after it got records waits (on the server's event
            # loop) until the run has ended, so the window has moved far past its index
            if delivered.is_set() and not ended.is_set():
                ended.wait(60)
            batch, finished = real(index)
            calls.append(batch is None)
            if batch:
                delivered.set()
            return batch, finished

        monkeypatch.setattr(live, "committed_from", stalled)
        stream = run.stream()
        first = next(stream)
        # the event loop is held from here on: poll the store directly, not through gRPC
        assert wait_until(lambda: store.get_run(run.id).status not in ACTIVE_STATUSES)
        ended.set()
        served = [first, *stream]
        stored = list(client.run(run.id).stream())
    assert any(calls), f"the watcher never fell behind the window: {calls}"
    assert live.dropped >= iterations - 2 * KEEP
    assert [r.iteration for r in served] == list(range(iterations + 1))
    assert [r.raw.SerializeToString() for r in served] == [
        r.raw.SerializeToString() for r in stored
    ]
    assert [r.loss for r in served] == _engine_losses(iterations)
