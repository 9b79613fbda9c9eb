"""Random catalogue problems for tests: fresh data on every call, float64 unless asked."""

from __future__ import annotations

import torch
from hessian_service.engine import Objective, make_objective

F64 = torch.float64
CATALOGUE = (
    "mse",
    "least_squares",
    "logistic_regression",
    "softmax_regression",
    "mlp",
    "rosenbrock",
    "quadratic",
)


def random_problem(name: str, dtype: torch.dtype = F64, size: int = 6) -> Objective:
    """A small random instance of catalogue objective `name` (about `size` features)."""
    n_samples, d = 4 * size, size
    x = torch.randn(n_samples, d, dtype=dtype)
    if name == "mse":
        return make_objective("mse", {"target": torch.rand(size, 3, dtype=dtype)})
    if name == "least_squares":
        data = {"X": x, "y": torch.randn(n_samples, dtype=dtype)}
        return make_objective(name, data, {"l2": 0.1, "fit_intercept": True})
    if name == "logistic_regression":
        data = {"X": x, "y": torch.randint(0, 2, (n_samples,)).to(dtype)}
        return make_objective(name, data, {"l2": 0.01})
    if name == "softmax_regression":
        data = {"X": x, "labels": torch.randint(0, 4, (n_samples,))}
        return make_objective(name, data, {"num_classes": 4, "l2": 0.01})
    if name == "mlp":
        data = {"X": x, "y": torch.randn(n_samples, 2, dtype=dtype)}
        return make_objective(name, data, {"layer_sizes": [d, 5, 2], "activation": "tanh"})
    if name == "rosenbrock":
        return make_objective(name, {}, {"dim": size})
    if name == "quadratic":
        m = torch.randn(size, size, dtype=dtype)
        a = m @ m.T + torch.eye(size, dtype=dtype)
        return make_objective(name, {"A": a, "b": torch.randn(size, dtype=dtype)})
    raise AssertionError(name)


def random_params(objective: Objective, dtype: torch.dtype = F64) -> torch.Tensor:
    """Random parameters of the right length (standard normal, scaled down)."""
    return 0.5 * torch.randn(objective.num_params, dtype=dtype)
