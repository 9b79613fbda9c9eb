"""A live run holds a bounded window of records in memory (a run of a million iterations
would otherwise hold half a gigabyte until it ends); a watcher that starts behind the window,
or falls behind it while following, gets the records it lacks from the store, without a gap
and equal to what the engine computes in process.

The fall-behind test stalls the server's event loop on purpose (it talks to the store
directly meanwhile), so it uses its own server."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import hold_record, start_server, wait_until
from hessian_client import Client, status_name
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.engine.records import StepRecord
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
    real = LiveRun.committed_from
    calls: list[str] = []  # per read of the live buffer: "records", "none yet" or "let go"
    lives: list[LiveRun] = []
    delivered, ended = threading.Event(), threading.Event()

    def stalled(live: LiveRun, index: int):
        # the watcher's first read after it got records waits (on the server's event loop)
        # until the run has ended, so the window has moved far past the index it asks for
        if delivered.is_set() and not ended.is_set():
            ended.wait(60)
        batch, finished = real(live, index)
        lives.append(live)
        calls.append("let go" if batch is None else "records" if batch else "none yet")
        if batch:
            delivered.set()
        return batch, finished

    monkeypatch.setattr(LiveRun, "committed_from", stalled)
    # the run waits before storing record 1 until the watcher follows it live
    held = hold_record(monkeypatch, store, 1, lambda _: bool(calls))
    with Client(handle.address, timeout=60) as client:
        run = gd_run(client, iterations)
        stream = run.stream()
        first = next(stream)
        # the event loop is held from here on: poll the store directly, not through gRPC
        assert wait_until(lambda: store.get_run(run.id).status not in ACTIVE_STATUSES)
        ended.set()
        served = [first, *stream]
        stored = list(client.run(run.id).stream())
    assert held == [True], "the run waited for the watcher"
    following = calls.index("records")
    assert "let go" in calls[following + 1 :], f"it never fell behind while following: {calls}"
    assert lives[-1].dropped >= iterations - 2 * KEEP
    assert [r.iteration for r in served] == list(range(iterations + 1))
    assert [r.raw.SerializeToString() for r in served] == [
        r.raw.SerializeToString() for r in stored
    ]
    assert [r.loss for r in served] == _engine_losses(iterations)


def test_the_window_of_a_resumed_run_keeps_the_newest_committed_records():
    live = LiveRun("r-window", base=100)  # a resumed run: its list index 0 is iteration 100
    live.KEEP = 4
    records = [StepRecord(iteration=100 + i, loss=float(i)) for i in range(20)]
    for record in records[:13]:
        live.append(record)
    live.acknowledge(-1)  # another replica changed the run's row: nothing committed here
    assert (live.durable, live.last_record, live.committed_from(0)) == (0, None, ([], False))
    live.acknowledge(107)  # 8 committed, 2 KEEP: all but the newest 4 are let go
    assert (live.first_held(), live.dropped, live.last_record) == (104, 4, records[7])
    assert live.committed_from(3) == (None, False)  # let go: the watcher reads the store
    assert live.committed_from(4) == (records[4:8], False)
    assert live.records_since(4) == records[4:13]  # committed or not (the Optimize stream)
    with pytest.raises(RuntimeError, match="let go"):
        live.records_since(3)
    live.acknowledge(112)
    assert (live.first_held(), live.last_record) == (109, records[12])
    for record in records[13:]:
        live.append(record)
    live.acknowledge(119)
    live.finish()
    assert live.first_held() == 116
    assert live.committed_from(16) == (records[16:], True)  # the last ones: the run ended
    assert live.committed_from(20) == ([], True)
    assert live.committed_from(15) == (None, False)


def test_a_run_storing_its_end_wakes_its_watchers_once_with_the_last_records():
    live = LiveRun("r-end", base=0)
    records = [StepRecord(iteration=i, loss=float(i)) for i in range(6)]
    wakes = []
    live.listen(lambda: wakes.append(live.committed_from(0)))
    for record in records[:3]:
        live.append(record)
    live.acknowledge(2)
    assert wakes == [(records[:3], False)]  # while it runs, each commit wakes them
    for record in records[3:]:
        live.append(record)
    live.ending = True
    live.acknowledge(5)  # the commit that stores its end: no wake yet
    assert len(wakes) == 1 and live.committed_from(3) == (records[3:], False)
    live.finish()
    assert wakes[1:] == [(records, True)]  # one wake: every record, and they are the last
