"""The second-order test at a run's end is taken off the objective's gauge directions: a
softmax regression with intercepts (its loss is invariant to a common shift of the
intercepts over the classes) ends at a minimum, not "flat" (a review finding). The
restricted spectrum is checked against an explicit orthonormal basis of the complement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, Run, StopCriteria, hessian, make_objective
from hessian_service.engine.linalg import off_gauge
from hessian_service.engine.records import StopReason
from hessian_service.engine.solvers.run import end_point
from native_support import BACKENDS
from problems import CATALOGUE, random_problem

F64 = torch.float64


def _softmax(rng, l2: float, intercept: bool, rows: int = 120, features: int = 4, k: int = 3):
    x = rng.normal(size=(rows, features))
    labels = rng.integers(0, k, size=rows)
    data = {"X": torch.tensor(x), "labels": torch.tensor(labels)}
    options = {"num_classes": k, "l2": l2, "fit_intercept": intercept}
    return make_objective("softmax_regression", data, options)


def _gauge(objective) -> np.ndarray:
    """The gauge directions written out: a common shift over the classes of every row the
    penalty leaves free (the intercepts; every row without a penalty), unit vectors."""
    rows, k = objective.param_shape
    if objective.options["l2"] == 0:
        free = range(rows)
    else:
        free = range(rows - 1, rows) if objective.options["fit_intercept"] else range(0)
    out = []
    for r in free:
        v = np.zeros((rows, k))
        v[r] = 1.0 / np.sqrt(k)
        out.append(v.reshape(-1))
    return np.array(out).T.reshape(rows * k, len(out))


def eigenvalues_off(h: torch.Tensor, project, chunk: int = 256) -> torch.Tensor:
    """The eigenvalues of h off the gauge, as end_point takes them: off_gauge's matrix less
    its g largest (the gauge's)."""
    m, g = off_gauge(h, project, chunk)
    return torch.linalg.eigvalsh(m)[: h.shape[0] - g]


@pytest.mark.parametrize("chunk", [256, 5])
@pytest.mark.parametrize(
    ("l2", "intercept"), [(1e-2, True), (0.0, True), (1e-2, False), (0.0, False)]
)
def test_eigenvalues_off_the_gauge_match_an_explicit_complement(rng, l2, intercept, chunk):
    objective = _softmax(rng, l2, intercept)
    x = torch.tensor(rng.normal(size=objective.num_params))
    h = torch.func.hessian(objective.loss)(x)
    g = _gauge(objective)
    u = np.linalg.svd(g, full_matrices=True)[0] if g.shape[1] else np.eye(len(h))
    q = u[:, g.shape[1] :]  # an orthonormal basis of the complement
    want = np.linalg.eigvalsh(q.T @ h.numpy() @ q)
    got = eigenvalues_off(h, objective.project_step, chunk=chunk).numpy()
    assert got.shape == want.shape == (objective.num_params - g.shape[1],)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    if g.shape[1]:  # the full spectrum has the gauge's zeros; the restricted one does not
        assert np.abs(np.linalg.eigvalsh(h.numpy())).min() < 1e-12
        assert want.min() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("l2", "intercept"), [(1e-3, True), (0.0, True), (1e-3, False)])
def test_a_converged_softmax_run_ends_at_a_minimum(rng, backend, l2, intercept):
    objective = _softmax(rng, l2, intercept)
    run = Run(objective, torch.zeros(objective.num_params, dtype=F64),
              MethodOptions(method="newton", backend=backend),
              StopCriteria(gradient_tolerance=1e-9))  # fmt: skip
    records = run.run_to_end()
    assert run.converged, run.message
    assert records[-1].end_point == "minimum" and records[-1].negative_eigenvalues == 0


def test_eigenvalues_off_the_gauge_in_float32(rng):
    """float32: the same restricted spectrum as in float64, to float32's resolution."""
    objective = _softmax(rng, 1e-2, True)
    x = torch.tensor(rng.normal(size=objective.num_params))
    h = torch.func.hessian(objective.loss)(x)
    want = eigenvalues_off(h, objective.project_step).numpy()
    got = eigenvalues_off(h.float(), objective.project_step).numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _verdict_from_eigenvalues(h: torch.Tensor) -> tuple[str, int]:
    """The end-point test written out from every eigenvalue (no Cholesky shortcut)."""
    evals = torch.linalg.eigvalsh((h + h.T) / 2)
    scale = float(evals.abs().max())
    tol = h.shape[0] * torch.finfo(h.dtype).eps * scale
    lowest, highest = float(evals[0]), float(evals[-1])
    if scale == 0:
        verdict = "flat"
    elif lowest > tol:
        verdict = "minimum"
    elif highest < -tol:
        verdict = "maximum"
    elif lowest < -tol and highest > tol:
        verdict = "saddle"
    else:
        verdict = "flat"
    return verdict, int((evals < -tol).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 31, 100])
def test_the_end_point_verdict_is_the_eigenvalues_verdict_at_the_rounding_boundary(rng, n, dtype):
    # lambda_min placed at multiples of the n eps max|lambda| bar, where a shortcut that
    # trusted a factorisation too easily would call a semi-definite point a minimum
    eps = torch.finfo(dtype).eps
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    for multiple in (-8, -1, -0.5, 0, 0.5, 0.9, 1.1, 2, 4, 6, 16, 1e3, 1e6):
        spectrum = rng.uniform(0.5, 2.0, size=n) * rng.choice([1.0, 1e-3], size=n)
        spectrum[0] = multiple * n * eps * spectrum.max()
        h = torch.tensor((q * spectrum) @ q.T, dtype=dtype)
        want = _verdict_from_eigenvalues(h)
        assert end_point(h) == want, (multiple, spectrum[0], want)


@pytest.mark.parametrize("name", CATALOGUE)
def test_objectives_declared_convex_have_positive_semi_definite_hessians(name):
    # the declaration lets end_point read negative eigenvalues as rounding: it must hold
    # at random points far from any minimum, and the non-convex ones must not declare it
    objective = random_problem(name)
    lowest = []
    for _ in range(5):
        params = 3.0 * torch.randn(objective.num_params, dtype=F64)
        evals = torch.linalg.eigvalsh(hessian(objective, params))
        lowest.append(float(evals[0]) / max(float(evals.abs().max()), 1e-300))
    if objective.convex:
        assert min(lowest) > -1e-12, lowest
    elif name != "quadratic":  # random_problem's A is positive definite; others may not be
        assert min(lowest) < -1e-6, lowest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton", "saddle_free"])
def test_a_convex_run_near_its_separable_limit_is_not_called_a_saddle(backend, method):
    # one row, no penalty: the minimum is at infinity and the softmax Hessian's entries
    # cancel to 1e-10 with rounding of 1e-16, which counted as negative eigenvalues
    data = {"X": torch.tensor([[0.3, -1.2, 0.8]], dtype=F64), "labels": torch.tensor([1])}
    objective = make_objective("softmax_regression", data, {"num_classes": 3})
    run = Run(
        objective,
        torch.full((12,), 0.1, dtype=F64),
        MethodOptions(method=method, backend=backend),
        StopCriteria(max_iterations=500),
    )
    last = run.run_to_end()[-1]
    assert run.stop_reason == StopReason.GRADIENT_TOLERANCE and run.converged, run.message
    assert last.end_point in ("minimum", "flat") and last.negative_eigenvalues == 0


def test_end_point_reads_negative_eigenvalues_of_a_convex_objective_as_rounding(rng):
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    spectrum = np.array([-1.5e-16, 1e-19, 3e-12, 7e-11, 2e-10, 5e-10])
    h = torch.tensor((q * spectrum) @ q.T)
    assert end_point(h) == ("saddle", 1)
    assert end_point(h, convex=True) == ("flat", 0)
    spectrum[0] = 1e-11  # clearly positive definite: the same verdict either way
    h = torch.tensor((q * spectrum) @ q.T)
    assert end_point(h) == end_point(h, convex=True) == ("minimum", 0)


def _softmax_loss(
    w: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean cross-entropy of [x, 1] w (w: (d + 1, k)) + 0.5 l2 ||w[:d]||^2, written out."""
    z = x @ w[:-1] + w[-1]
    ce = torch.logsumexp(z, dim=1) - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    return ce.mean() + 0.5 * l2 * (w[:-1] ** 2).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_newton_on_a_gauge_needs_no_damping(rng, backend, dtype):
    """Softmax regression with intercepts (their class mean is a gauge: H is singular there)
    and a small l2 on nearly separable data. Every step's Cholesky failed on the gauge and
    took the damping floor (sqrt(eps) max(max|H_ii|, 1), far above H's scale here): float64
    runs damped every step, float32 ones crawled 200 damped steps to max_iterations at +56%
    loss. The gauge is now filled in before the solve. Against a float64 reference
    gradient of the written-out loss at the end point."""
    x = rng.standard_normal((300, 4))
    labels = (x @ (3.0 * rng.standard_normal((4, 3)))).argmax(axis=1)
    xt, lt = torch.tensor(x, dtype=dtype), torch.tensor(labels)
    l2 = 1e-7
    objective = make_objective(
        "softmax_regression", {"X": xt, "labels": lt}, {"num_classes": 3, "l2": l2}
    )
    run = Run(
        objective,
        torch.zeros(objective.num_params, dtype=dtype),
        MethodOptions(method="newton", backend=backend),
        StopCriteria(max_iterations=60),
    )
    records = list(run)
    w = run.params.double().reshape(5, 3).requires_grad_()
    (grad,) = torch.autograd.grad(_softmax_loss(w, xt.double(), lt, l2), w)
    if dtype == torch.float64:
        assert run.stop_reason == StopReason.GRADIENT_TOLERANCE, run.message
        assert not any(r.step_damped for r in records)
        assert float(grad.abs().max()) <= 1e-9
    else:
        assert len(records) <= 40, run.message
        assert float(grad.abs().max()) <= 1e-6, run.message
