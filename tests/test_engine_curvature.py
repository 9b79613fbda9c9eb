"""The autograd curvature path against torch.func references in float64."""

from __future__ import annotations

import pytest
import torch
from hessian_service.engine import (
    MethodOptions,
    ResourceLimitError,
    check_dense_budget,
    gauss_newton,
    hessian,
    hvp,
    loss_and_grad,
    make_objective,
)
from hessian_service.engine.curvature import autograd as curvature
from hessian_service.engine.errors import ValidationError
from problems import CATALOGUE, random_params, random_problem

REL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", CATALOGUE)
def test_hessian_matches_torch_func(name):
    obj = random_problem(name)
    x = random_params(obj)
    expected = torch.func.hessian(obj.loss)(x)
    loss, grad, h = curvature.newton_system(obj, x)
    assert rel_err(h, expected) <= REL
    assert rel_err(grad, torch.func.grad(obj.loss)(x)) <= REL
    assert float(loss) == pytest.approx(float(obj.loss(x)), rel=1e-14)


@pytest.mark.parametrize("budget", [1, 4096, 10**9])
def test_chunked_hessian_equals_full(budget):
    """One row at a time, a few rows, all rows: the same matrix."""
    obj = random_problem("mlp")
    x = random_params(obj)
    expected = torch.func.hessian(obj.loss)(x)
    assert rel_err(hessian(obj, x, batch_budget_bytes=budget), expected) <= REL


def test_float32_hessian_close_to_float64_reference():
    obj64 = random_problem("logistic_regression")
    obj32 = type(obj64)({k: v.float() for k, v in obj64.data.items()}, obj64.options)
    x = random_params(obj64)
    expected = torch.func.hessian(obj64.loss)(x)
    got = hessian(obj32, x.float())
    assert got.dtype == torch.float32
    assert rel_err(got.double(), expected) <= 1e-5


@pytest.mark.parametrize(
    "name", ["mse", "least_squares", "logistic_regression", "softmax_regression", "mlp"]
)
def test_gauss_newton_matches_jacobian_formula(name):
    """GGN = J^T H_out J + H_reg, each factor from torch.func on its own."""
    obj = random_problem(name)
    x = random_params(obj)
    out = obj.outputs(x)
    jac = torch.func.jacrev(obj.outputs)(x).reshape(out.numel(), -1)
    h_out = torch.func.hessian(lambda o: obj.output_loss(o.reshape(out.shape)))(out.reshape(-1))
    expected = jac.T @ h_out @ jac + torch.func.hessian(obj.regulariser)(x)
    _, _, ggn = gauss_newton(obj, x)
    assert rel_err(ggn, expected) <= REL
    assert bool((torch.linalg.eigvalsh(ggn) > -1e-10).all()), "GGN must be PSD here"


def test_gauss_newton_equals_hessian_for_linear_least_squares():
    obj = random_problem("least_squares")
    x = random_params(obj)
    assert rel_err(gauss_newton(obj, x)[2], torch.func.hessian(obj.loss)(x)) <= REL


def test_gauss_newton_refuses_objectives_without_outputs():
    obj = random_problem("rosenbrock")
    with pytest.raises(ValidationError, match="rosenbrock"):
        gauss_newton(obj, random_params(obj))


@pytest.mark.parametrize("name", CATALOGUE)
def test_hvp_matches_dense_product(name):
    obj = random_problem(name)
    x = random_params(obj)
    v = torch.randn_like(x)
    expected = torch.func.hessian(obj.loss)(x) @ v
    assert rel_err(hvp(obj, x, v), expected) <= REL


def test_loss_and_grad_float64():
    obj = random_problem("softmax_regression")
    x = random_params(obj)
    loss, grad = loss_and_grad(obj, x)
    assert rel_err(grad, torch.func.grad(obj.loss)(x)) <= 1e-12
    assert float(loss) == pytest.approx(float(obj.loss(x)), rel=1e-14)


def test_dense_budget_refused_before_allocating():
    with pytest.raises(ResourceLimitError) as info:
        check_dense_budget(100_000, budget_bytes=2**30)
    assert "80000000000" not in str(info.value)
    assert "76293.9 MiB" in str(info.value) and "budget of 1024.0 MiB" in str(info.value)
    obj = random_problem("quadratic", size=40)
    with pytest.raises(ResourceLimitError, match="dense Hessian of 40 parameters"):
        hessian(obj, random_params(obj), budget_bytes=40 * 40 * 8 - 1)
    check_dense_budget(40, budget_bytes=40 * 40 * 8)
    # a small refusal says bytes, not "0.0 MiB" (a review finding)
    with pytest.raises(ResourceLimitError) as info:
        check_dense_budget(3, budget_bytes=8)
    assert "needs 72 bytes (3x3 float64)" in str(info.value)
    assert "budget of 8 bytes" in str(info.value) and "0.0 MiB" not in str(info.value)


@pytest.mark.parametrize("name", ["mlp", "softmax_regression", "least_squares"])
def test_jacobian_product_without_forward_ad_matches_the_dense_jacobian(name):
    """J v by the double vjp and J^T u, single and vmap'd, against jacrev's dense J."""
    obj = random_problem(name)
    x = random_params(obj)
    out, forward, transposed = curvature.jacobian_product(obj.outputs, x)
    jac = torch.func.jacrev(obj.outputs)(x).reshape(out.numel(), -1)
    v, u = torch.randn(x.numel(), 3, dtype=x.dtype), torch.randn(out.numel(), dtype=x.dtype)
    assert rel_err(forward(v[:, 0]).reshape(-1), jac @ v[:, 0]) <= REL
    batched = torch.func.vmap(forward, in_dims=1, out_dims=-1)(v)
    assert rel_err(batched.reshape(out.numel(), 3), jac @ v) <= REL
    assert rel_err(transposed(u.reshape(out.shape)), jac.T @ u) <= REL


def test_gradient_product_vmapped_matches_the_dense_hessian():
    obj = random_problem("mlp")
    x = random_params(obj)
    v = torch.randn(x.numel(), 4, dtype=x.dtype)
    product = curvature.gradient_product(torch.func.grad(obj.loss), x)
    got = torch.func.vmap(product, in_dims=1, out_dims=1)(v)
    assert rel_err(got, torch.func.hessian(obj.loss)(x) @ v) <= REL


def test_a_float32_curvature_that_overflows_is_refused_naming_params():
    """ComputeHessian on float32 data whose Hessian overflows float32: LAPACK's refusal of
    the inf matrix was quoted ("the algorithm failed to converge ... float64 can
    decompose"); it is now named for what it is."""
    from hessian_service.engine.analysis.curvature_summary import dense_curvature

    x = torch.full((40, 3), 3e38, dtype=torch.float32) * torch.randn(40, 3).sign()
    y = (x[:, 0] > 0).to(torch.float32)
    objective = make_objective("logistic_regression", {"X": x, "y": y})
    with pytest.raises(ValidationError) as err:
        dense_curvature(objective, torch.zeros(4), MethodOptions(method="newton"))
    assert err.value.field == "params"
    assert "curvature matrix is finite" in str(err.value) and "float32" in str(err.value)


@pytest.mark.parametrize("backend", ["native", "autograd"])
def test_the_curvature_at_a_point_where_the_loss_is_not_finite_is_refused(backend):
    """It answered: loss NaN, gradient NaN and an all-zero matrix summarised as
    min = max = 0; NewtonStep and AnalyzeCurvature refuse that point."""
    from hessian_service.engine.analysis.curvature_summary import dense_curvature

    obj = make_objective("mse", {"target": torch.zeros(3, dtype=torch.float64)}, {})
    params = torch.tensor([1e160, 1.0, 0.5], dtype=torch.float64)  # finite; its square is not
    with pytest.raises(ValidationError, match="the loss and its gradient are finite, got loss inf"):
        dense_curvature(obj, params, MethodOptions(method="newton", backend=backend))
    fine = dense_curvature(obj, params / 1e150, MethodOptions(method="newton", backend=backend))
    assert torch.allclose(fine.matrix, torch.eye(3, dtype=torch.float64) * 2 / 3, rtol=1e-15)
