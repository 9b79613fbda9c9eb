"""RunManager.start and RunManager.watch on a real SQLite file, without a gRPC server: the
start point, method resolution, the limits refused before anything is stored, retention, and
a watch that yields every record once, in order and in pages, then the final row."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, StopCriteria, make_objective
from hessian_service.engine.errors import ResourceLimitError
from hessian_service.engine.solvers.methods import Stepper
from hessian_service.server.errors import DataLossError, NotFoundError
from hessian_service.server.runs import InitSpec, RunManager
from hessian_service.store import RunRow, RunStatus, SQLiteRunStore

N = 6
EXACT = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}


@pytest.fixture
def store(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_interval_s=0.01)
    store.put_problem("p", b"")  # a run needs its problem stored, held by its owner
    yield store
    store.close()


def _manager(store, **limits) -> RunManager:
    return RunManager(store, workers=1, max_concurrent_runs=8, checkpoint_every=1000, **limits)


def _rosenbrock():
    return make_objective("rosenbrock", {}, {"dim": N})


def _rosenbrock64(x: np.ndarray) -> float:
    """An independent float64 Rosenbrock (sum 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2)."""
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def _wait(manager: RunManager, run_id: str) -> None:
    live = manager.live(run_id)
    if live is not None:
        with live.cond:
            assert live.cond.wait_for(lambda: live.done, timeout=60)


def _start(manager: RunManager, options: MethodOptions, iterations: int = 0, **kw) -> RunRow:
    return manager.start(
        problem_id="p",
        objective=_rosenbrock(),
        options=options,
        stopping=StopCriteria(max_iterations=iterations, **EXACT),
        **kw,
    )


GD = MethodOptions(method="gradient_descent", learning_rate=1e-4)


def _expected_start(kind: str) -> torch.Tensor:
    if kind == "tensor":
        return torch.linspace(-2.0, 2.0, N, dtype=torch.float64)
    if kind == "normal":
        return torch.randn(N, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    if kind == "uniform":
        return torch.rand(N, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    return torch.tensor([-1.2, 1.0] * (N // 2), dtype=torch.float64)  # Rosenbrock's classic


@pytest.mark.parametrize("kind", ["tensor", "normal", "uniform", "default"])
def test_start_begins_at_the_chosen_point(store, kind):
    initial = {
        "tensor": _expected_start("tensor"),
        "normal": InitSpec(11, "normal"),
        "uniform": InitSpec(12, "uniform"),
        "default": None,
    }[kind]
    manager = _manager(store)
    try:
        row = _start(manager, GD, initial=initial)  # 0 iterations: record 0 is the start
        _wait(manager, row.run_id)
    finally:
        manager.shutdown(timeout=5)
    expected = _expected_start(kind)
    stored = store.latest_checkpoint(row.run_id).checkpoint().params
    assert torch.equal(stored, expected)
    (record,) = store.records(row.run_id, 0, 10)
    assert record.loss == pytest.approx(_rosenbrock64(expected.numpy()), rel=1e-12)
    assert store.get_run(row.run_id).status is RunStatus.FINISHED


@pytest.mark.parametrize(
    ("budget", "method"), [(8 * N * N, "newton"), (8 * N * N - 1, "newton_cg")]
)
def test_start_resolves_method_auto_by_the_dense_budget_and_keeps_why(store, budget, method):
    manager = _manager(store)
    try:
        row = _start(manager, MethodOptions(method="auto", dense_budget_bytes=budget))
        _wait(manager, row.run_id)
    finally:
        manager.shutdown(timeout=5)
    spec = store.get_run(row.run_id).spec
    assert spec["options"]["method"] == method
    assert f"method auto chose {method}" in spec["method_note"]


def test_a_dense_method_over_its_budget_is_refused_before_anything_is_stored(store):
    manager = _manager(store)
    try:
        with pytest.raises(ResourceLimitError) as info:
            _start(manager, MethodOptions(method="saddle_free", dense_budget_bytes=8 * N * N - 1))
        assert info.value.field == "options.dense_budget_bytes"
        assert manager.active_count() == 0
    finally:
        manager.shutdown(timeout=5)
    assert store.list_runs([], 10, None) == []


def test_criteria_over_the_iteration_cap_are_refused_before_anything_is_stored(store):
    manager = _manager(store, max_iterations=50)
    try:
        row = _start(manager, GD, iterations=50)  # at the cap: allowed
        _wait(manager, row.run_id)
        with pytest.raises(ResourceLimitError) as info:
            _start(manager, GD, iterations=51)
        assert info.value.field == "stopping.max_iterations" and "51" in str(info.value)
    finally:
        manager.shutdown(timeout=5)
    assert [r.run_id for r in store.list_runs([], 10, None)] == [row.run_id]


def test_each_start_deletes_the_oldest_ended_runs_past_the_cap(store):
    manager = _manager(store, max_stored_runs=2)
    ids = []
    try:
        for _ in range(3):
            ids.append(_start(manager, GD).run_id)
            _wait(manager, ids[-1])
    finally:
        manager.shutdown(timeout=5)
    assert store.get_run(ids[0]) is None
    assert {r.run_id for r in store.list_runs([], 10, None)} == set(ids[1:])


async def _collect(manager: RunManager, run_id: str, start: int, page: int, scope=None):
    batches, final = [], []
    async for records, row in manager.watch(run_id, scope, start, page):
        assert not final, "nothing follows the final row"
        if records:
            batches.append(records)
        if row is not None:
            final.append(row)
    return batches, final


async def _events(manager: RunManager, run_id: str, start: int, page: int) -> list:
    """Every (records, final row or None) the watch yields, as it yields them."""
    return [event async for event in manager.watch(run_id, None, start, page)]


def _losses(records) -> list[tuple[int, float]]:
    return [(r.iteration, r.loss) for r in records]


@pytest.mark.parametrize("start", [0, 7])
def test_watch_of_an_ended_run_pages_its_stored_records_then_the_final_row(store, start):
    manager = _manager(store)
    try:
        row = _start(manager, GD, iterations=20)
        _wait(manager, row.run_id)
        batches, final = asyncio.run(_collect(manager, row.run_id, start, page=4))
    finally:
        manager.shutdown(timeout=5)
    assert all(1 <= len(b) <= 4 for b in batches)
    seen = [r for b in batches for r in b]
    assert _losses(seen) == _losses(store.records(row.run_id, start, 100))
    assert [r.iteration for r in seen] == list(range(start, 21))
    assert len(final) == 1 and final[0].status is RunStatus.FINISHED


def test_watch_of_an_ended_run_that_fits_a_page_is_one_store_hop(store, monkeypatch):
    """The records and the final row of a run that ended come in one event, read on one
    thread hop (it was four: row, page, empty page, row)."""
    manager = _manager(store)
    hops = []
    to_thread = asyncio.to_thread

    async def counted(fn, *args):
        hops.append(fn.__name__)
        return await to_thread(fn, *args)

    try:
        row = _start(manager, GD, iterations=20)
        _wait(manager, row.run_id)
        monkeypatch.setattr(asyncio, "to_thread", counted)
        got = asyncio.run(_events(manager, row.run_id, 3, 100))
    finally:
        manager.shutdown(timeout=5)
    assert hops == ["_live_then_row"]
    ((records, final),) = got
    assert _losses(records) == _losses(store.records(row.run_id, 3, 100))
    assert [r.iteration for r in records] == list(range(3, 21))
    assert final.status is RunStatus.FINISHED and final.num_records == 21


def test_watch_of_a_run_resumed_while_its_page_is_read_does_not_end_there(store, monkeypatch):
    """The row is read again after the records: if it says the run is active again (resumed
    between the two reads) the watch goes on instead of ending on the old final row."""
    manager = _manager(store)
    try:
        row = _start(manager, GD, iterations=20)
        _wait(manager, row.run_id)
        reads = itertools.count()
        real = manager.get

        def get(run_id, scope):
            got = real(run_id, scope)
            if next(reads) == 1:  # the read after the page: the run was resumed meanwhile
                return RunRow(**{**vars(got), "status": RunStatus.RUNNING})
            return got

        monkeypatch.setattr(manager, "get", get)
        got = asyncio.run(_events(manager, row.run_id, 0, 100))
    finally:
        manager.shutdown(timeout=5)
    assert got[0][1] is None, "not ended on the row read before the resumption"
    assert [r.iteration for records, _ in got for r in records] == list(range(21))
    assert got[-1][1].status is RunStatus.FINISHED and sum(f is not None for _, f in got) == 1


def test_watch_of_a_live_run_sees_every_record_once_in_order(store):
    manager = _manager(store)
    try:
        row = _start(manager, GD, iterations=400)
        batches, final = asyncio.run(_collect(manager, row.run_id, 0, page=64))
    finally:
        manager.shutdown(timeout=5)
    seen = [r for b in batches for r in b]
    assert all(1 <= len(b) <= 64 for b in batches)
    assert _losses(seen) == _losses(store.records(row.run_id, 0, 1000))
    assert [r.iteration for r in seen] == list(range(401))
    assert final[0].status is RunStatus.FINISHED and final[0].num_records == 401


def test_watch_reports_records_deleted_behind_its_back_as_data_loss(store, tmp_path):
    manager = _manager(store)
    try:
        row = _start(manager, GD, iterations=10)
        _wait(manager, row.run_id)
        with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
            db.execute(
                "DELETE FROM records WHERE run_id = ? AND iteration BETWEEN 3 AND 5", (row.run_id,)
            )
        seen = []

        async def watch() -> None:
            async for records, _ in manager.watch(row.run_id, None, 0, 100):
                seen.extend(records)

        with pytest.raises(DataLossError) as info:
            asyncio.run(watch())
    finally:
        manager.shutdown(timeout=5)
    assert [r.iteration for r in seen] == [0, 1, 2]
    assert "iterations 3 to 5" in str(info.value)


def test_watch_of_another_tenants_run_is_not_found(store):
    store.put_problem("p", b"", owner="alice")
    manager = _manager(store)
    try:
        row = _start(manager, GD, owner="alice")
        _wait(manager, row.run_id)
        with pytest.raises(NotFoundError):
            asyncio.run(_collect(manager, row.run_id, 0, 10, scope="bob"))
        batches, final = asyncio.run(_collect(manager, row.run_id, 0, 10, scope="alice"))
    finally:
        manager.shutdown(timeout=5)
    assert [r.iteration for b in batches for r in b] == [0] and final[0].owner == "alice"


def test_watch_of_a_live_run_checks_its_tenant_without_reading_the_store(store, monkeypatch):
    """A run live here is followed from memory: its owner's watch starts with no store read,
    and another tenant's watch of it is still NOT_FOUND. The run holds after 5 steps, so
    it is live throughout and keeps every record in memory however slow the machine."""
    store.put_problem("p", b"", owner="alice")
    manager = _manager(store)
    reads: list[str] = []
    release, steps, step = threading.Event(), itertools.count(), Stepper.step

    def held_step(self, point):
        if next(steps) >= 5:
            assert release.wait(60)
        return step(self, point)

    monkeypatch.setattr(Stepper, "step", held_step)

    async def first_batch(scope: str) -> list:
        watch = manager.watch(row.run_id, scope, 0, 10)
        try:
            records, _ = await watch.__anext__()
        finally:
            await watch.aclose()
        return records

    try:
        row = _start(manager, GD, iterations=10_000_000, owner="alice")
        assert manager.live(row.run_id) is not None
        with pytest.raises(NotFoundError):
            asyncio.run(first_batch("bob"))
        real = store.get_run
        monkeypatch.setattr(store, "get_run", lambda run_id: reads.append(run_id) or real(run_id))
        records = asyncio.run(first_batch("alice"))
        assert manager.live(row.run_id) is not None, "still running: followed live"
        assert reads == []
    finally:
        release.set()
        manager.shutdown(timeout=5)
    assert [r.iteration for r in records] == list(range(len(records))) and 1 <= len(records) <= 5
    stored = store.records(row.run_id, 0, len(records))
    assert _losses(records) == _losses(stored)


def test_a_failed_admission_wakes_a_watcher_already_following_it(store):
    """An admission undone (here: a resume whose run was deleted meanwhile) leaves no watcher
    that found the run live waiting forever: it wakes, reads the store and gets NOT_FOUND."""
    store.put_problem("p", b"", owner="alice")
    manager = _manager(store)
    try:
        row = _start(manager, GD, iterations=3, owner="alice")
        _wait(manager, row.run_id)
        assert store.delete_run(row.run_id)
        live = manager._admit(row.run_id, 0, "alice", _rosenbrock())

        async def watch_then_abandon() -> None:
            watch = asyncio.create_task(_collect(manager, row.run_id, 0, 10, scope="alice"))
            await asyncio.sleep(0.2)
            assert not watch.done(), "following the live run"
            manager._release(live)
            await asyncio.wait_for(watch, 10)

        with pytest.raises(NotFoundError):
            asyncio.run(watch_then_abandon())
        assert manager.live(row.run_id) is None
    finally:
        manager.shutdown(timeout=5)


def test_runs_are_dated_in_order_when_the_wall_clock_steps_back(store, monkeypatch):
    # created_at was time.time(): after a restart with the clock an hour back, ListRuns put
    # the newest run last and retention deleted it first, as the oldest
    import hessian_service.server.runs as runs_module

    first = _manager(store)
    a = _start(first, GD)
    _wait(first, a.run_id)
    first.shutdown(10)
    real = runs_module.time.time
    monkeypatch.setattr(runs_module.time, "time", lambda: real() - 3600.0)
    second = _manager(store)  # a restart: the stored runs are the floor
    b = _start(second, GD)
    c = _start(second, GD)
    for row in (b, c):
        _wait(second, row.run_id)
    listed = [r.run_id for r in store.list_runs((), 10, None)]
    assert listed == [c.run_id, b.run_id, a.run_id]  # newest first
    assert store.enforce_retention(2) == [a.run_id]  # the oldest goes
    second.shutdown(10)
