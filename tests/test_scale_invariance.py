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
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
from hessian_service.engine.linalg import damping_floor
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
