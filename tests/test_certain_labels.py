"""Cross-entropy losses and their derivatives where every label's class is certain (margins
of 20 to 40): softplus(z) - y z and sigmoid(z) - y, logsumexp(z) - z_y and p_y - 1, and
p_y (1 - p_y) in the Hessian cancelled there (float32 past a margin of about 17; float64
kept 7 digits of softmax's loss at 20), so on separable data a float32 run's records showed
a loss and max|g| ~35x below the true ones (softmax: a loss of exactly 0), a run could claim
convergence it had not reached, and the native float32 softmax Hessian was off by 650x its
norm. Logistic and softmax regression, the mlp (closed form and autograd) and an exported
program's cross_entropy, on both backends, against float64 references at the same
(rounded) parameters and data, each written out without the cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported_programs import from_problem
from hessian_client import problems
from hessian_service.engine import MethodOptions, make_objective
from hessian_service.engine.backends.selector import curvature_block_product
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


SOFTMAX_KINDS = ["certain", "mixed", "mislabelled"]


def _certain_softmax(
    rng: np.random.Generator, kind: str = "certain"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, labels, params) for 3 classes: rows whose largest class leads the next by 20 to
    40, labelled with it; "mixed" adds rows with random labels, "mislabelled" labels every
    row with its second class (a near-certain class that is not the label's)."""
    w = 15.0 * rng.standard_normal((3, 3))
    x = rng.standard_normal((20000, 3))
    z = np.sort(x @ w, axis=1)
    margin = z[:, -1] - z[:, -2]
    x = x[(margin >= 20) & (margin <= 40)][:150]
    assert len(x) >= 50
    labels = (x @ w).argsort(axis=1)[:, -2 if kind == "mislabelled" else -1]
    if kind == "mixed":
        x = np.vstack([x, rng.standard_normal((50, 3))])
        labels = np.concatenate([labels, rng.integers(0, 3, size=50)])
    return x, labels, np.vstack([w, np.zeros((1, 3))])


def _softmax_problem(rng: np.random.Generator, dtype: torch.dtype, kind: str) -> tuple:
    """(X, params, labels, objective) of _certain_softmax in `dtype`."""
    x, labels, params = _certain_softmax(rng, kind)
    xt, pt = torch.tensor(x, dtype=dtype), torch.tensor(params.reshape(-1), dtype=dtype)
    objective = make_objective(
        "softmax_regression", {"X": xt, "labels": torch.tensor(labels)}, {"num_classes": 3}
    )
    return xt, pt, labels, objective


@pytest.mark.parametrize("kind", SOFTMAX_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_loss_and_gradient_match_float64_where_labels_are_certain(
    rng, backend, dtype, kind
):
    xt, pt, labels, objective = _softmax_problem(rng, dtype, kind)
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


def _output_curvature(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(residual p - onehot, per-row Hessians diag(p) - p p^T) of the cross-entropy in
    float64 logits z, 1 - p_c summed from the other classes for each row's largest class."""
    rows = np.arange(len(z))
    p = softmax(z, axis=1)
    rest = p.copy()
    rest[rows, labels] = 0.0
    residual = p.copy()
    residual[rows, labels] = -rest.sum(axis=1)
    top = p.argmax(axis=1)
    q = 1.0 - p
    others = p.copy()
    others[rows, top] = 0.0
    q[rows, top] = others.sum(axis=1)
    hess = -p[:, :, None] * p[:, None, :]
    hess[:, np.arange(z.shape[1]), np.arange(z.shape[1])] = p * q
    return residual, hess


@pytest.mark.parametrize("kind", SOFTMAX_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_hessian_and_its_products_match_float64_where_labels_are_certain(
    rng, backend, dtype, kind
):
    xt, pt, labels, objective = _softmax_problem(rng, dtype, kind)
    options = MethodOptions(backend=backend, method="newton").validated()
    stepper = Stepper(objective, options, pt)
    assert stepper.backend_label == backend
    x64 = np.hstack([xt.double().numpy(), np.ones((len(labels), 1))])
    z = x64 @ pt.double().numpy().reshape(4, 3)
    _, out = _output_curvature(z, labels)
    # H = (1/N) sum_i x_i x_i^T kron S_i, flat index feature * 3 + class
    hess = np.einsum("ia,ib,icd->acbd", x64, x64, out).reshape(12, 12) / len(z)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    got = stepper.evaluate(pt).curvature.double().numpy()
    assert np.linalg.norm(got - hess) <= tol * np.linalg.norm(hess), np.linalg.norm(got - hess)
    v = torch.tensor(rng.standard_normal((12, 5)), dtype=dtype)
    product, label = curvature_block_product(objective, pt, backend)
    assert label == backend
    want = hess @ v.double().numpy()
    got = product(v).double().numpy()
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)


def _certain_network(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, labels, params) for an mlp [3, 4, 3] whose rows' largest output leads the next by
    20 to 40 (its output layer scaled up), labelled with that class."""
    x = rng.standard_normal((4000, 3))
    w1, b1 = rng.standard_normal((4, 3)), rng.standard_normal(4)
    w2, b2 = 40.0 * rng.standard_normal((3, 4)), rng.standard_normal(3)
    z = np.tanh(x @ w1.T + b1) @ w2.T + b2
    top2 = np.sort(z, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0] >= 20) & (top2[:, 1] - top2[:, 0] <= 40)
    assert keep.sum() >= 50
    params = np.concatenate([w1.ravel(), b1, w2.ravel(), b2])
    return x[keep][:80], z[keep][:80].argmax(axis=1), params


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_cross_entropy_matches_float64_where_labels_are_certain(rng, backend, dtype, curvature):
    x, labels, params = _certain_network(rng)
    xt, pt, yt = (
        torch.tensor(x, dtype=dtype),
        torch.tensor(params, dtype=dtype),
        torch.tensor(labels),
    )
    options = {"layer_sizes": [3, 4, 3], "loss": "cross_entropy"}
    objective = make_objective("mlp", {"X": xt, "y": yt}, options)
    method = MethodOptions(backend=backend, method="newton", curvature=curvature).validated()
    stepper = Stepper(objective, method, pt)
    point = stepper.evaluate(pt)
    # the reference: the network's outputs, Jacobian and second derivatives by float64
    # autograd; the loss's terms in the outputs written out (_output_curvature)
    reference = make_objective("mlp", {"X": xt.double(), "y": yt}, options)
    p64 = pt.double()
    z = reference.outputs(p64).detach().numpy()
    n_rows = len(z)
    d = z - z[np.arange(n_rows), labels][:, None]
    others = np.exp(d)
    others[np.arange(n_rows), labels] = 0.0  # the label's class leads: d <= 0 elsewhere
    loss = np.mean(np.log1p(others.sum(axis=1)))
    residual, out = _output_curvature(z, labels)
    jac = torch.func.jacrev(reference.outputs)(p64).reshape(-1, p64.numel()).numpy()
    grad = jac.T @ residual.reshape(-1) / n_rows
    blocks = np.zeros((3 * n_rows, 3 * n_rows))
    for i in range(n_rows):
        blocks[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] = out[i]
    hess = jac.T @ blocks @ jac / n_rows
    if curvature == "hessian":
        weights = torch.tensor(residual / n_rows)
        second = torch.func.hessian(lambda t: (reference.outputs(t) * weights).sum())(p64)
        hess = hess + second.numpy()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(point.loss - loss) <= tol * loss, (point.loss, loss)
    got = point.grad.double().numpy()
    assert np.linalg.norm(got - grad) <= tol * np.linalg.norm(grad)
    got = point.curvature.double().numpy()
    assert np.linalg.norm(got - hess) <= tol * np.linalg.norm(hess)


def test_exported_cross_entropy_matches_float64_where_labels_are_certain(rng):
    """An exported linear model with the cross_entropy output loss: its loss and gradient
    (autograd through the program) against the written-out float64 ones."""
    x, labels, params = _certain_softmax(rng)
    xt = torch.tensor(x, dtype=torch.float32)
    pt = torch.tensor(params.reshape(-1), dtype=torch.float32)

    def logits(w, X):
        w = w.reshape(4, 3)
        return X @ w[:3] + w[3]

    data = {"X": xt, "y": torch.tensor(labels)}
    objective = from_problem(problems.exported(logits, pt, data, loss="cross_entropy"))
    point = Stepper(objective, MethodOptions(method="newton").validated(), pt).evaluate(pt)
    x64 = np.hstack([xt.double().numpy(), np.ones((len(x), 1))])
    z = x64 @ pt.double().numpy().reshape(4, 3)
    d = z - z[np.arange(len(z)), labels][:, None]
    others = np.exp(d)
    others[np.arange(len(z)), labels] = 0.0
    loss = np.mean(np.log1p(others.sum(axis=1)))
    residual, _ = _output_curvature(z, labels)
    grad = (x64.T @ residual / len(z)).reshape(-1)
    assert abs(point.loss - loss) <= 1e-4 * loss, (point.loss, loss)
    got = point.grad.double().numpy()
    assert np.linalg.norm(got - grad) <= 1e-4 * np.linalg.norm(grad)
