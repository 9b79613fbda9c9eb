"""Logistic and softmax regression's loss and gradient where every label's class is certain
(margins of 20 to 40): softplus(z) - y z and sigmoid(z) - y, logsumexp(z) - z_y and
p_y - 1, cancelled to 0 there (float32 past a margin of about 17; float64 kept 7 digits of
softmax's loss at 20), so on separable data a float32 run's records showed a loss and
max|g| ~35x below the true ones (softmax: a loss of exactly 0) and a run could claim
convergence it had not reached. Both backends against a float64 reference at the same
(rounded) parameters and data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, make_objective
from hessian_service.engine.solvers.methods import Stepper
from native_support import BACKENDS
from scipy.special import expit, softmax


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


def _certain_softmax(
    rng: np.random.Generator, mixed: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, labels, params) for 3 classes: rows whose label's class leads the next by 20 to
    40; `mixed` adds rows with random labels (the label's class not always the largest)."""
    w = 15.0 * rng.standard_normal((3, 3))
    x = rng.standard_normal((20000, 3))
    z = np.sort(x @ w, axis=1)
    margin = z[:, -1] - z[:, -2]
    x = x[(margin >= 20) & (margin <= 40)][:150]
    assert len(x) >= 50
    labels = (x @ w).argmax(axis=1)
    if mixed:
        x = np.vstack([x, rng.standard_normal((50, 3))])
        labels = np.concatenate([labels, rng.integers(0, 3, size=50)])
    return x, labels, np.vstack([w, np.zeros((1, 3))])


@pytest.mark.parametrize("mixed", [False, True], ids=["certain", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_loss_and_gradient_match_float64_where_labels_are_certain(
    rng, backend, dtype, mixed
):
    x, labels, params = _certain_softmax(rng, mixed)
    xt, pt = torch.tensor(x, dtype=dtype), torch.tensor(params.reshape(-1), dtype=dtype)
    objective = make_objective(
        "softmax_regression", {"X": xt, "labels": torch.tensor(labels)}, {"num_classes": 3}
    )
    stepper = Stepper(objective, MethodOptions(backend=backend).validated(), pt)
    assert stepper.backend_label == backend
    point = stepper.evaluate(pt)
    # the reference in float64: per row m + log1p(sum of e^(d - m) off the largest), d the
    # logits less the label's, m their largest (0 where the label's class leads)
    x64, p64 = xt.double().numpy(), pt.double().numpy().reshape(4, 3)
    z = x64 @ p64[:3] + p64[3]
    rows = np.arange(len(z))
    d = z - z[rows, labels][:, None]
    m = d.max(axis=1)
    e = np.exp(d - m[:, None])
    e[rows, d.argmax(axis=1)] = 0.0
    loss = np.mean(m + np.log1p(e.sum(axis=1)))
    p = softmax(z, axis=1)
    rest = p.copy()
    rest[rows, labels] = 0.0
    residual = p.copy()
    residual[rows, labels] = -rest.sum(axis=1)  # p_y - 1 without its cancellation
    grad = (np.hstack([x64, np.ones((len(z), 1))]).T @ residual / len(z)).reshape(-1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(point.loss - loss) <= tol * loss, (point.loss, loss)
    got = point.grad.double().numpy()
    assert np.linalg.norm(got - grad) <= tol * np.linalg.norm(grad)
