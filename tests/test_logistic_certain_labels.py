"""Logistic regression's loss and gradient where every label's class is certain (margins
|z| of 20 to 40): softplus(z) - y z and sigmoid(z) - y cancelled to 0 there (float32 past
z of about 17), so on separable data a float32 run's records showed a loss and max|g| ~35x
below the true ones and a run could claim convergence it had not reached. Both backends
against a float64 reference at the same (rounded) parameters and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, make_objective
from hessian_service.engine.solvers.methods import Stepper
from native_support import BACKENDS
from scipy.special import expit


def _certain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, params): rows whose |z| is in [20, 40] under params (w, intercept 0)."""
    w = rng.standard_normal(3)
    w *= 30.0 / np.linalg.norm(w)
    x = rng.standard_normal((4000, 3))
    z = x @ w
    x = x[(np.abs(z) >= 20) & (np.abs(z) <= 40)][:200]
    assert len(x) >= 50
    return x, (x @ w > 0).astype(np.float64), np.append(w, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_gradient_match_float64_where_labels_are_certain(rng, backend, dtype):
    x, y, params = _certain(rng)
    xt, yt, pt = (torch.tensor(a, dtype=dtype) for a in (x, y, params))
    objective = make_objective("logistic_regression", {"X": xt, "y": yt})
    stepper = Stepper(objective, MethodOptions(backend=backend).validated(), pt)
    assert stepper.backend_label == backend
    point = stepper.evaluate(pt)
    # the reference: the same rounded values in float64, each term without cancellation
    x64, p64 = xt.double().numpy(), pt.double().numpy()
    z = x64 @ p64[:3] + p64[3]
    loss = np.mean(np.log1p(np.exp(-np.abs(z))))  # y matches sign(z): softplus(-|z|)
    e = np.where(y > 0, -expit(-z), expit(z))  # sigmoid(z) - y
    grad = np.append(x64.T @ e, e.sum()) / len(z)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(point.loss - loss) <= tol * loss, (point.loss, loss)
    got = point.grad.double().numpy()
    assert np.linalg.norm(got - grad) <= tol * np.linalg.norm(grad), (got, grad)
