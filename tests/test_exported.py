"""Exported programs in the engine: parity with the catalogue, Gauss-Newton, evaluation limits."""

from __future__ import annotations

import pytest
import torch
from exported_programs import exported_twin, from_problem
from hessian_client import problems
from hessian_service.engine import MethodOptions, Run, StopCriteria
from hessian_service.engine.curvature import gauss_newton, hessian, hvp, loss_and_grad
from problems import CATALOGUE, random_params, random_problem

F64 = torch.float64
REL = 1e-12


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """|a - b| <= rel * max|b| elementwise (relative to the reference's scale)."""
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) <= rel * scale


@pytest.mark.parametrize("name", CATALOGUE)
def test_exported_twin_matches_catalogue_loss_gradient_hessian(name: str) -> None:
    """Loss, gradient and dense Hessian of the exported twin equal the catalogue's (1e-12)."""
    objective = random_problem(name)
    x = random_params(objective)
    twin = exported_twin(objective, x.reshape(objective.param_shape))
    loss, grad = loss_and_grad(twin, x)
    ref_loss, ref_grad = loss_and_grad(objective, x)
    assert close(loss, ref_loss) and close(grad, ref_grad)
    assert close(hessian(twin, x), hessian(objective, x))
    v = torch.randn_like(x)
    assert close(hvp(twin, x, v), hessian(objective, x) @ v, 1e-10)


@pytest.mark.parametrize("name", ["least_squares", "mlp", "quadratic"])
def test_exported_twin_run_records_match_catalogue(name: str) -> None:
    """A few Newton iterations of the twin give the catalogue run's records."""
    objective = random_problem(name)
    x = random_params(objective)
    twin = exported_twin(objective, x.reshape(objective.param_shape))
    options = MethodOptions(method="newton", backend="autograd")
    stop = StopCriteria(max_iterations=4)
    ours = Run(twin, x, options, stop).run_to_end()
    ref = Run(objective, x, options, stop).run_to_end()
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-10, abs=1e-14)
        assert a.gradient_max_norm == pytest.approx(b.gradient_max_norm, rel=1e-8, abs=1e-12)


def test_gauss_newton_of_exported_outputs_matches_float64_reference() -> None:
    """outputs(params, X) with loss='mse': GGN = 2/N J^T J, J of the plain (unexported) fn."""
    n, d = 12, 3
    X = torch.randn(n, d, dtype=F64)
    y = torch.randn(n, dtype=F64)
    x = torch.randn(d + 1, dtype=F64)

    def curve(params, X):
        return torch.exp(-params[0] * X[:, 0]) * params[1] + X[:, 1:] @ params[2:]

    objective = from_problem(problems.exported(curve, x, {"X": X, "y": y}, loss="mse"))
    jac = torch.autograd.functional.jacobian(lambda p: curve(p, X), x)
    _, _, ggn = gauss_newton(objective, x)
    assert close(ggn, 2.0 / n * jac.T @ jac)
    r = curve(x, X) - y
    assert close(objective.loss(x), torch.mean(r * r))
