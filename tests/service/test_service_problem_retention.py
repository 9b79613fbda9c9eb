"""Stored problems can be deleted (explicitly, or by --max-problem-bytes) and that frees a
store capped by --max-store-bytes; built objectives are cached by bytes, not by count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import start_server
from hessian_client import (
    Client,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    problems,
    status_name,
)
from hessian_client.cli import main as cli_main
from hessian_service.server.problems import (
    OBJECT_OVERHEAD_BYTES,
    ProblemRegistry,
    objective_bytes,
)
from hessian_service.store import SQLiteRunStore
from long_runs import ENDLESS

BIG = 32_768  # float64 values: a 256 KiB problem
QUICK = {"method": "gradient_descent", "stopping": {"max_iterations": 3}}


def _big(seed: int):
    return problems.mse(np.random.default_rng(seed).normal(size=BIG))


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
