"""Problems for tests: random catalogue problems (fresh data on every call, float64 unless
asked), the breast-cancer logistic regression, a hand-written saddle objective, and the
stopping tolerances that let a run go to max_iterations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
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
# StopCriteria keywords that switch off every tolerance: a run stops at max_iterations only
NO_TOL = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}


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


def breast_cancer(l2: float = 1e-3) -> tuple[Objective, np.ndarray, np.ndarray]:
    """L2 logistic regression on scikit-learn's breast cancer data, features standardised;
    also the standardised features and the labels as float64 numpy (for references)."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    data = {"X": torch.tensor(x), "y": torch.tensor(y, dtype=F64)}
    return make_objective("logistic_regression", data, {"l2": l2}), x, y.astype(np.float64)


class Saddle(Objective):
    """f(x, y) = x^2 - y^2 + y^4 / 4: a saddle at the origin, minima at (0, +-sqrt 2)."""

    name = "saddle"

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        self.param_shape = (2,)
        self.dtype = F64

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        x, y = params[0], params[1]
        return x**2 - y**2 + y**4 / 4
