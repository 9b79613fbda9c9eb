"""Stored problems can be deleted (explicitly, or by --max-problem-bytes) and that frees a
store capped by --max-store-bytes; built objectives are cached by bytes, not by count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import start_server, wait_until
from hessian_client import (
    Client,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    problems,
    status_name,
)
from hessian_client.cli import main as cli_main
from hessian_service.server.errors import NotFoundError
from hessian_service.server.problems import (
    OBJECT_OVERHEAD_BYTES,
    ProblemRegistry,
    objective_bytes,
)
from hessian_service.store import SQLiteRunStore
from long_runs import ENDLESS

BIG = 32_768  # float64 values: a 256 KiB problem
QUICK = {"method": "gradient_descent", "stopping": {"max_iterations": 3}}


def _big(seed: int, size: int = BIG):
    return problems.mse(np.random.default_rng(seed).normal(size=size))


def test_deleting_problems_frees_a_full_store_and_start_run_works_again(tmp_path):
    handle = start_server(tmp_path, max_store_bytes=2 * 1024**2)
    try:
        with Client(handle.address) as c:
            small = c.create_problem(problems.rosenbrock(dim=2))
            stored = []
            with pytest.raises(ResourceExhausted, match="full"):
                for seed in range(40):
                    stored.append(c.create_problem(_big(seed)))
            assert len(stored) >= 4
            # the room a big one lacked still takes small things: fill it to the brim
            with pytest.raises(ResourceExhausted, match="full"):
                for seed in range(100, 10_000):
                    stored.append(c.create_problem(_big(seed, 256)))
            with pytest.raises(ResourceExhausted, match="full"):
                c.start_run(small, np.zeros(2), **QUICK)
            for pid in stored:
                assert c.delete_problem(pid) is True
            assert status_name(c.start_run(small, np.zeros(2), **QUICK).wait(60)) == "FINISHED"
            again = c.create_problem(_big(0))  # the space is reusable for problems too
            assert again == stored[0]
    finally:
        handle.stop(grace=1.0)


def test_retention_by_bytes_deletes_the_least_recently_used_and_spares_a_running_runs_problem(
    tmp_path,
):
    cap = 1024**2
    handle = start_server(tmp_path, max_problem_bytes=cap, workers=1)
    long = {
        "method": "gradient_descent",
        "learning_rate": 1e-12,
        "stopping": ENDLESS,
    }
    size = len(_big(0).SerializeToString(deterministic=True))  # each big one: the same size
    try:
        with Client(handle.address) as c:
            pinned_problem = problems.rosenbrock(dim=2)
            pinned = c.create_problem(pinned_problem)  # the oldest: first to go, but in use
            run = c.start_run(pinned, np.zeros(2), **long)
            ids = [c.create_problem(_big(seed)) for seed in range(12)]  # 3 MiB in all
            limits = c.info().limits
            assert (limits.max_problem_bytes, limits.problem_cache_bytes) == (cap, 256 * 1024**2)
            room = cap - len(pinned_problem.SerializeToString(deterministic=True))
            kept = room // size
            assert 0 < kept < len(ids)
            for old in ids[:-kept]:
                with pytest.raises(NotFound):
                    c.delete_problem(old)
            x = np.zeros(BIG)
            for seed in range(len(ids) - kept, len(ids)):
                target = np.random.default_rng(seed).normal(size=BIG)
                step = c.gradient_step(ids[seed], x, learning_rate=0.5).params
                np.testing.assert_allclose(step, x + 0.5 * 2 * target / BIG, rtol=1e-12)
            with pytest.raises(FailedPrecondition, match="is used by 1 queued, running"):
                c.delete_problem(pinned)
            c.cancel_run(run.id)
            run.wait(60)
            assert c.delete_problem(pinned) is True
            with pytest.raises(ResourceExhausted, match="--max-problem-bytes"):
                c.create_problem(problems.mse(np.zeros(200_000)))
    finally:
        handle.stop(grace=1.0)


def test_the_objective_cache_is_bounded_by_bytes(tmp_path):
    store = SQLiteRunStore(tmp_path)
    try:
        n = 1000
        size = n * 8 + OBJECT_OVERHEAD_BYTES  # float64 target, counted independently
        registry = ProblemRegistry(store, max_params=10**6, cache_bytes=3 * size)
        pids = [registry.create(_mse(n, seed), "anonymous")[0] for seed in range(5)]
        assert registry.cached_bytes == 3 * size
        assert list(registry._cache) == pids[2:]  # least recently used went first
        registry.by_id(pids[0], "anonymous")  # rebuilt from the store, cached again
        assert list(registry._cache) == [*pids[3:], pids[0]]
        assert registry.cached_bytes == 3 * size
        huge = registry.create(_mse(5 * n, 9), "anonymous")[0]  # over the whole cache
        assert huge not in registry._cache and registry.cached_bytes == 3 * size
        assert list(registry._cache) == [*pids[3:], pids[0]]  # nothing evicted for it
    finally:
        store.close()


def test_objective_bytes_counts_each_tensor_storage_once():
    x = torch.zeros(50, 4, dtype=torch.float64)
    obj = _objective_with(x)
    assert objective_bytes(obj) == 50 * 4 * 8 + 50 * 8 + OBJECT_OVERHEAD_BYTES


def _mse(n: int, seed: int):
    return problems.mse(np.random.default_rng(seed).normal(size=n))


def _objective_with(x: torch.Tensor):
    from hessian_service.engine.objectives import make_objective

    y = torch.zeros(x.shape[0], dtype=torch.float64)
    return make_objective("least_squares", {"X": x, "y": y}, {})


def test_the_cli_deletes_a_problem_and_names_one_it_cannot_find(server, capsys):
    with Client(server.address) as c:
        pid = c.create_problem(problems.rosenbrock(dim=4))
    assert cli_main(["--address", server.address, "delete-problem", pid]) == 0
    assert f"deleted: {pid}" in capsys.readouterr().out
    assert cli_main(["--address", server.address, "delete-problem", pid]) == 1
    assert f"problem_id: no problem with id '{pid}'" in capsys.readouterr().err


class _Reads:
    """Counts a store's has_problem reads; `then` runs after each (a concurrent delete)."""

    def __init__(self, store, then=None) -> None:
        self.count, self.then, self._read = 0, then, store.has_problem

    def __call__(self, pid, owner=None):
        self.count += 1
        held = self._read(pid, owner)
        if self.then is not None:
            self.then(pid)
        return held


def test_a_remembered_hold_goes_with_a_deleted_or_evicted_problem(tmp_path):
    """On the embedded store a tenant's hold is read once, then remembered with the cached
    objective; DeleteProblem, retention and a delete racing the read all end it."""
    store = SQLiteRunStore(tmp_path)
    try:
        one = len(_mse(1000, 0).SerializeToString(deterministic=True))
        registry = ProblemRegistry(store, max_params=10**6, max_stored_bytes=2 * one + one // 2)
        reads = store.has_problem = _Reads(store)
        pid = registry.create(_mse(1000, 0), "alice")[0]
        for _ in range(3):
            registry.by_id(pid, "alice")
        assert reads.count == 1  # read once, then remembered
        with pytest.raises(NotFoundError):
            registry.by_id(pid, "bob")  # another tenant's hold is not alice's
        registry.delete(pid, "alice")
        with pytest.raises(NotFoundError):
            registry.by_id(pid, "alice")

        first = registry.create(_mse(1000, 1), "alice")[0]
        registry.by_id(first, "alice")
        registry.by_id(first, "alice")
        for seed in (2, 3):  # past the cap: the least recently used (first) is evicted
            registry.create(_mse(1000, seed), "alice")
        assert store.get_problem(first) is None
        with pytest.raises(NotFoundError):
            registry.by_id(first, "alice")

        raced = registry.create(_mse(1000, 4), "alice")[0]

        def delete_now(p):  # alice's hold was read, then deleted before it was remembered,
            reads.then = None  # and bob's create of the same problem cached it again
            registry.delete(p, "alice")
            assert registry.create(_mse(1000, 4), "bob")[0] == p

        reads.then = delete_now
        registry.by_id(raced, "alice")  # overlapped the delete: either answer is fine
        with pytest.raises(NotFoundError):
            registry.by_id(raced, "alice")
    finally:
        store.close()


class _SharedStore:
    """The embedded store seen as a shared one (as PostgreSQL is): another process may
    delete what is in it."""

    def __init__(self, inner: SQLiteRunStore) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_shared_stores_holds_are_read_on_every_call(tmp_path):
    inner = SQLiteRunStore(tmp_path)
    try:
        reads = inner.has_problem = _Reads(inner)
        registry = ProblemRegistry(_SharedStore(inner), max_params=10**6)
        pid = registry.create(_mse(100, 0), "alice")[0]
        registry.by_id(pid, "alice")
        registry.by_id(pid, "alice")
        assert reads.count == 2
        inner.delete_problem(pid, "alice")  # by another replica: this registry is not told
        with pytest.raises(NotFoundError):
            registry.by_id(pid, "alice")
    finally:
        inner.close()


@pytest.mark.parametrize("cache_bytes", [256 * 1024**2, 0])
@pytest.mark.parametrize("way", ["inline", "by_id", "create"])
def test_concurrent_requests_for_one_new_problem_build_it_once(
    tmp_path, monkeypatch, way, cache_bytes
):
    """Eight threads asking for one problem not yet built (inline, by id after a restart
    emptied the cache, or CreateProblem) build it once and share that objective: each
    built its own before, an exported program compiling for seconds per request; with the
    cache off (0) the waiters took turns building it again."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from hessian_client.proto import service_pb2
    from hessian_service.server import problems as problems_module
    from hessian_service.server.auth import Tenant

    store = SQLiteRunStore(tmp_path)
    try:
        problem = _mse(50, 7)
        pid = ProblemRegistry(store, max_params=10**6).create(problem, "alice")[0]
        # a fresh cache, as after a restart
        registry = ProblemRegistry(store, max_params=10**6, cache_bytes=cache_bytes)
        builds, entered, release = [], threading.Event(), threading.Event()
        real = problems_module.build_objective

        def slow_build(*args, **kwargs):
            builds.append(1)
            entered.set()
            release.wait(5)  # the others arrive while this build is under way
            return real(*args, **kwargs)

        monkeypatch.setattr(problems_module, "build_objective", slow_build)
        tenant = Tenant("alice")
        ask = {
            "inline": lambda: registry.resolve(service_pb2.StepRequest(problem=problem), tenant),
            "by_id": lambda: registry.resolve(service_pb2.StepRequest(problem_id=pid), tenant),
            "create": lambda: registry.create(problem, "alice"),
        }[way]
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(ask)
            assert entered.wait(10)
            rest = [pool.submit(ask) for _ in range(7)]
            # all eight at the build's gate before it ends (one arriving after it would,
            # with the cache off, rightly build again)
            assert wait_until(lambda: registry._building[pid][1] == 8, timeout=30)
            release.set()
            answers = [first.result(), *(f.result() for f in rest)]
        assert len(builds) == 1
        assert {answer[0] for answer in answers} == {pid}
        assert all(answer[1] is answers[0][1] for answer in answers)
        assert registry._building == {}
    finally:
        store.close()
