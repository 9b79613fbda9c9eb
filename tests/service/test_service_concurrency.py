"""32 concurrent clients, each taking 20 Newton steps, all answered correctly, none dropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from hessian_client import Client, problems
from hessian_service.engine import MethodOptions, make_objective, take_step

CLIENTS = 32
STEPS = 20


def _job(address: str, seed: int) -> tuple[list[np.ndarray], list[float]]:
    """20 damped Newton steps (lr 0.5) on this client's own least-squares problem."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal(40)
    params = rng.standard_normal(5)
    iterates, losses = [], []
    with Client(address, timeout=60) as c:
        pid = c.create_problem(problems.least_squares(x, y, l2=0.1))
        for _ in range(STEPS):
            result = c.newton_step(pid, params, learning_rate=0.5)
            params = result.params
            iterates.append(params)
            losses.append(result.record.loss)
    return iterates, losses


def test_32_clients_x_20_newton_steps_all_correct(server):
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda s: _job(server.address, s), range(CLIENTS)))
    assert len(results) == CLIENTS
    for seed, (iterates, losses) in enumerate(results):
        assert len(iterates) == STEPS
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((40, 5)), rng.standard_normal(40)
        params = torch.from_numpy(rng.standard_normal(5))
        objective = make_objective(
            "least_squares", {"X": torch.from_numpy(x), "y": torch.from_numpy(y)}, {"l2": 0.1}
        )
        for got, loss in zip(iterates, losses, strict=True):
            expected = take_step(objective, params, MethodOptions(learning_rate=0.5))
            assert loss == expected.record.loss
            np.testing.assert_array_equal(got, expected.params.numpy())
            params = expected.params
        # And the iterates approach the closed-form ridge solution (independent float64 check).
        a = x.T @ x / len(y) + 0.1 * np.eye(5)
        w_star = np.linalg.solve(a, x.T @ y / len(y))
        np.testing.assert_allclose(iterates[-1], w_star, rtol=1e-5, atol=1e-5)
