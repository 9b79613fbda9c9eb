"""A live run holds a bounded window of records in memory (a run of a million iterations
would otherwise hold half a gigabyte until it ends); a watcher that starts behind the window,
or falls behind it while following, gets the records it lacks from the store, without a gap
and equal to what the engine computes in process."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import start_server
from hessian_client import Client, problems, status_name
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.server.runs import LiveRun
from hessian_service.store.base import ACTIVE_STATUSES

KEEP = 32  # the window under test; the server's is LiveRun.KEEP
NO_TOLERANCES = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}


@pytest.fixture
def handle(tmp_path, monkeypatch):
    monkeypatch.setattr(LiveRun, "KEEP", KEEP)
    server = start_server(tmp_path, workers=1)
    yield server
    server.stop()


def _start(client: Client, iterations: int):
    return client.start_run(
        problems.rosenbrock(dim=4),
        np.zeros(4),
        method="gradient_descent",
        learning_rate=1e-4,
        stopping={"max_iterations": iterations, **NO_TOLERANCES},
    )


def _engine_losses(iterations: int) -> list[float]:
    """The same run in process: the reference every served loss must equal bit for bit."""
    objective = make_objective("rosenbrock", {}, {"dim": 4})
    options = MethodOptions(method="gradient_descent", learning_rate=1e-4)
    stopping = StopCriteria(max_iterations=iterations, **NO_TOLERANCES)
    return [r.loss for r in Run(objective, torch.zeros(4, dtype=torch.float64), options, stopping)]


def _until(predicate, timeout: float = 60.0) -> None:
    """Poll until `predicate` holds; the timeout guards a hang, it is not a timing claim."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.005)


def test_a_long_run_holds_a_bounded_window_and_a_late_watcher_reads_the_rest(handle, monkeypatch):
    iterations, hold_at = 3000, 2000
    store = handle.runs.store
    append = store.append_record
    reached, release = threading.Event(), threading.Event()

    def held_append(run_id, record):
        if record.iteration == hold_at:
            reached.set()
            release.wait(60)
        append(run_id, record)

    monkeypatch.setattr(store, "append_record", held_append)
    try:
        with Client(handle.address, timeout=60) as client:
            run = _start(client, iterations)
            live = handle.runs.live(run.id)
            assert reached.wait(60), "the run never reached the hold"
            _until(lambda: live.durable == hold_at)  # records 0 .. hold_at - 1 committed
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
        run = _start(client, iterations)
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
        _until(lambda: store.get_run(run.id).status not in ACTIVE_STATUSES)
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
