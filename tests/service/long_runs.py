"""Runs that take long on purpose: the gradient-descent run the PostgreSQL replica tests
(handover, partition, restart) hand between servers, slow enough to be caught mid-run and
exact enough to compare record by record with an uninterrupted reference run; a run of many
fast iterations; and the stopping criteria of a run that only ends when cancelled."""

from __future__ import annotations

from typing import Any

import numpy as np
from hessian_client import problems
from hessian_client.proto import problem_pb2

# every tolerance off: the run goes to max_iterations, so both runs take the same steps
EXACT = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}
# stopping criteria a run does not meet on its own: it holds its worker until cancelled
ENDLESS = {"max_iterations": 10**6, **EXACT}
# start_run keywords of three slow dense iterations (an autograd Hessian and its
# eigendecomposition each): a run a shutdown catches inside an iteration
SADDLE_FREE_THREE = {
    "method": "saddle_free",
    "backend": "autograd",
    "stopping": {"max_iterations": 3, **EXACT},
}


def long_run_problem(seed: int) -> problem_pb2.Problem:
    """L2 logistic regression on 2000 random rows of 30 features (a slow, smooth descent)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, 30))
    y = (x[:, 0] + 0.5 * rng.standard_normal(2000) > 0).astype(np.float64)
    return problems.logistic_regression(x, y, l2=1e-3)


def long_run_spec(max_iterations: int) -> dict[str, Any]:
    """start_run keywords: gradient descent at a fixed rate for exactly `max_iterations`."""
    return {"method": "gradient_descent", "learning_rate": 0.05,
            "stopping": {"max_iterations": max_iterations, **EXACT}}  # fmt: skip


def gd_run(client: Any, iterations: int, name: str = "") -> Any:
    """Start gradient descent on Rosenbrock n = 4 from zeros at rate 1e-4 for exactly
    `iterations`: many fast iterations, each record reproducible bit for bit."""
    return client.start_run(
        problems.rosenbrock(dim=4),
        np.zeros(4),
        method="gradient_descent",
        learning_rate=1e-4,
        stopping={"max_iterations": iterations, **EXACT},
        name=name,
    )


def start_endless_run(client: Any) -> Any:
    """Start gradient descent on Rosenbrock at a step too small to converge, with ENDLESS
    stopping: a run that holds a worker until it is cancelled."""
    return client.start_run(
        problems.rosenbrock(dim=2),
        np.array([-1.2, 1.0]),
        method="gradient_descent",
        learning_rate=1e-6,
        stopping=ENDLESS,
    )
