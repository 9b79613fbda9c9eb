"""Newton's damping floor and saddle-free Newton's eigenvalue floor are relative to the
matrix: rescaling a feature column (the problem's units) must not turn a Newton step into a
gradient step. Both floors were absolute (sqrt(eps) x max(1, max|H_ii|), and 1e-8): a
singular least squares of scale 1e-12 ran 1,000 damped steps to 500 times its minimum, and
saddle-free Newton took 200 steps of a hundredth of Newton's on a definite H of scale 1e-10.
References: numpy's lstsq minimum of the same data, float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective, take_step
from hessian_service.engine.linalg import damped_cholesky_solve, damping_floor
from native_support import BACKENDS


def _least_squares(X: np.ndarray, y: np.ndarray, dtype: torch.dtype):
    data = {"X": torch.tensor(X, dtype=dtype), "y": torch.tensor(y, dtype=dtype)}
    return make_objective("least_squares", data, {"fit_intercept": False})


def _minimum(X: np.ndarray, y: np.ndarray) -> float:
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    return float(0.5 * np.mean((X @ w - y) ** 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "scale", "rel"),
    [(torch.float64, 1.0, 1e-12), (torch.float64, 1e-6, 1e-12), (torch.float32, 1e-3, 1e-5)],
)
def test_newton_on_a_singular_problem_reaches_its_minimum_in_any_units(
    rng, backend, dtype, scale, rel
):
    x = rng.normal(size=(50, 2))
    X = np.c_[x, x[:, 0]] * scale  # a duplicated column: H is singular (semi-definite)
    y = x @ np.array([1.0, -2.0]) + 0.1 * rng.normal(size=50)
    objective = _least_squares(X, y, dtype)
    options = MethodOptions(method="newton", backend=backend)
    # the gradient test off (it is absolute: in these units 1e-6 is met early in float32)
    stopping = StopCriteria(max_iterations=50, gradient_tolerance=0.0)
    records = Run(objective, torch.zeros(3, dtype=dtype), options, stopping).run_to_end()
    best = _minimum(X, y)
    # Newton's few steps, not a gradient crawl: at the minimum by the third
    assert len(records) > 3 and abs(records[3].loss - best) <= rel * best, records[3].loss
    assert abs(records[-1].loss - best) <= rel * best
    # the damping, where one was needed, is a rounding-level share of the curvature
    h_scale = float((X * X).mean(0).max())
    assert all(r.damping <= 1e-3 * h_scale for r in records[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 1e-5])
def test_saddle_free_newton_on_a_definite_problem_is_newton_in_any_units(rng, backend, scale):
    X = rng.normal(size=(50, 3)) * scale  # eigenvalues of H ~ 1e-10 at 1e-5
    y = X @ np.array([1.0, -2.0, 0.5]) / scale + 0.1 * rng.normal(size=50)
    objective = _least_squares(X, y, torch.float64)
    run = Run(objective, torch.zeros(3, dtype=torch.float64),
              MethodOptions(method="saddle_free", backend=backend),
              StopCriteria(max_iterations=50))  # fmt: skip
    records = run.run_to_end()
    best = _minimum(X, y)
    assert abs(records[-1].loss - best) <= 1e-12 * best, (run.message, records[-1].loss)
    assert len(records) <= 4 and run.converged, run.message


def test_the_damping_floor_scales_with_the_matrix(rng):
    a = torch.tensor(rng.normal(size=(6, 4)))
    h = a @ a.T  # semi-definite, rank 4
    for s in (1e-12, 1.0, 1e6):
        assert damping_floor(h * s) == pytest.approx(damping_floor(h) * s, rel=1e-12)
    assert (
        damping_floor(torch.zeros(3, 3, dtype=torch.float64))
        == torch.finfo(torch.float64).eps ** 0.5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("condition", [1e9, 1e12])
def test_saddle_free_newton_on_an_ill_conditioned_definite_problem_is_newton(backend, condition):
    # a floor of 1e-8 max|lambda| clamped the small eigenvalue: 154 steps to an error of
    # 9e-8 at condition 1e9, and an error of 0.98 after 200 at 1e12 (Newton: one step)
    A = torch.diag(torch.tensor([condition, 1.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0], dtype=torch.float64)
    objective = make_objective("quadratic", {"A": A, "b": b})
    run = Run(objective, torch.zeros(2, dtype=torch.float64),
              MethodOptions(method="saddle_free", backend=backend),
              StopCriteria(max_iterations=20))  # fmt: skip
    run.run_to_end()
    want = torch.tensor([1.0 / condition, 1.0], dtype=torch.float64)
    assert float(((run.params - want) / want).abs().max()) <= 1e-12, run.message
    assert run.converged and run.last_record.iteration <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_saddle_free_in_float32_resolves_what_float32_resolves(rng, backend):
    # n = 50, eigenvalues log-spaced over 1e5: floored at n eps32 max|lambda| it stalled at
    # an error of 0.28 where Newton reached 6e-8
    n = 50
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(n, n))))
    evals = torch.logspace(0, 5, n, dtype=torch.float64)
    A, b = (q * evals) @ q.T, torch.tensor(rng.normal(size=n))
    want = torch.linalg.solve(A, b)
    data = {"A": A.float(), "b": b.float()}
    objective = make_objective("quadratic", data)
    for method in ("newton", "saddle_free"):
        run = Run(objective, torch.zeros(n), MethodOptions(method=method, backend=backend),
                  StopCriteria(max_iterations=30))  # fmt: skip
        run.run_to_end()
        error = float((run.params.double() - want).norm() / want.norm())
        assert error <= 1e-2, (method, error, run.message)  # cond 1e5 x eps32 ~ 1e-2 at most


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [0.0, 1e-30, 1e-300])
def test_the_damping_escalation_is_short_for_a_tiny_diagonal_and_large_off_diagonal(backend, d):
    # the floor from the diagonal alone: 40 attempts at d = 1e-30, none within 60 at 1e-300
    h = torch.tensor([[d, 1.0], [1.0, d]], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    if backend == "native":
        _, lam, attempts = torch.ops.hessian.damped_cholesky(h, g, 0.0, 60)
        lam, attempts = float(lam), int(attempts)
    else:
        res = damped_cholesky_solve(h, g)
        lam, attempts = res.damping, res.attempts
    assert 1 <= attempts <= 12
    assert 1.0 < lam <= 10.0  # past -lambda_min = 1 - d, within one x10 of it


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("method", "policy"),
    [("newton", "line_search"), ("newton", "levenberg_marquardt"), ("saddle_free", "fixed"),
     ("newton_cg", "trust_region")],
)  # fmt: skip
@pytest.mark.parametrize("scale", [1e15, 1e-30])
def test_float32_gradient_norms_are_recorded_past_the_square_of_its_range(
    rng, backend, method, policy, scale
):
    """A float32 record's gradient_norm was inf for a gradient of 3.6e28 and 0 (below its own
    max-norm) for one of 3e-32 with a dense Hessian: torch's float32 2-norm squares the
    entries. Reference: the float64 gradient's norms at the same parameters (rel 1e-4: the
    float32 residual cancels ~3 digits of y's)."""
    x = rng.normal(size=(30, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)
    X, Y = (x * scale).astype(np.float32), (y * scale).astype(np.float32)
    data = {"X": torch.tensor(X), "y": torch.tensor(Y)}
    objective = make_objective("least_squares", data, {"fit_intercept": True})
    w = torch.tensor([1.1, -1.9, 0.6, 0.0], dtype=torch.float32)  # a moderate gradient
    options = MethodOptions(method=method, step_policy=policy, backend=backend)
    record = take_step(objective, w, options).record
    A = np.c_[X.astype(np.float64), np.ones(len(Y))]
    g = A.T @ (A @ w.double().numpy() - Y) / len(Y)  # of 0.5 mean(residual^2)
    assert record.gradient_max_norm == pytest.approx(np.abs(g).max(), rel=1e-4, abs=0.0)
    assert record.gradient_norm == pytest.approx(np.linalg.norm(g), rel=1e-4, abs=0.0)
