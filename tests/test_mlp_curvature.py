"""The mlp's closed-form loss, gradient, Hessian and Gauss-Newton matrix (engine/mlp_curvature).

Every case draws fresh random data and parameters and compares with torch.func on float64
copies: the exact Hessian with torch.func.hessian, the GGN with J^T H_out J built from
torch.func.jacrev, so the reference shares no code with the closed form.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hessian_service.engine import ResourceLimitError, make_objective
from hessian_service.engine.backends import selector as backends
from hessian_service.engine.curvature.mlp import mlp_newton_system

F64_TOL = 1e-12
F32_TOL = 1e-5

SHAPES = ([3, 1], [4, 6, 2], [5, 7, 4, 3], [3, 4, 4, 4, 2])


def _problem(sizes, activation, loss, rows=23, l2=0.05, dtype=torch.float64):
    x = torch.randn(rows, sizes[0], dtype=dtype)
    if loss == "mse":
        y = torch.randn(rows, sizes[-1], dtype=dtype)
    else:
        y = torch.randint(0, sizes[-1], (rows,))
    options = {"layer_sizes": sizes, "activation": activation, "loss": loss, "l2": l2}
    obj = make_objective("mlp", {"X": x, "y": y}, options)
    return obj, obj.init_params() + 0.3 * torch.randn(obj.num_params, dtype=dtype)


def _upcast(obj, params):
    data = {k: (v.double() if v.is_floating_point() else v) for k, v in obj.data.items()}
    return make_objective("mlp", data, obj.options), params.double()


def _reference_ggn(obj, params):
    """J^T H_out J + l2 I from torch.func.jacrev and torch.func.hessian of the output loss."""
    out = obj.outputs(params)
    jac = torch.func.jacrev(obj.outputs)(params).reshape(out.numel(), -1)
    h_out = torch.func.hessian(lambda o: obj.output_loss(o.reshape(out.shape)))(out.reshape(-1))
    ggn = jac.T @ h_out @ jac
    return ggn + obj.options["l2"] * torch.eye(params.numel(), dtype=params.dtype)


def _rel(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _cases():
    for sizes in SHAPES:
        for activation in ("tanh", "relu", "gelu"):
            for loss in ("mse", "cross_entropy"):
                if loss == "cross_entropy" and sizes[-1] < 2:
                    continue
                yield pytest.param(sizes, activation, loss, id=f"{sizes}-{activation}-{loss}")


@pytest.mark.parametrize(("sizes", "activation", "loss"), list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_loss_gradient_and_hessian_match_torch_func(sizes, activation, loss, dtype):
    obj, p = _problem(sizes, activation, loss, dtype=dtype)
    ref_obj, ref_p = _upcast(obj, p)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    value, grad, hess = mlp_newton_system(obj, p)
    assert hess.dtype == dtype and hess.shape == (obj.num_params, obj.num_params)
    assert _rel(value, ref_obj.loss(ref_p)) <= tol
    assert _rel(grad, torch.func.grad(ref_obj.loss)(ref_p)) <= tol
    assert _rel(hess, torch.func.hessian(ref_obj.loss)(ref_p)) <= tol
    assert _rel(hess, hess.T.double()) <= tol


@pytest.mark.parametrize(("sizes", "activation", "loss"), list(_cases()))
def test_gauss_newton_matches_jacobian_product(sizes, activation, loss):
    obj, p = _problem(sizes, activation, loss)
    _, _, ggn = mlp_newton_system(obj, p, "gauss_newton")
    assert _rel(ggn, _reference_ggn(obj, p)) <= F64_TOL
    assert torch.linalg.eigvalsh(ggn).min() >= -1e-12 * ggn.abs().max()  # PSD, unlike H


def test_single_linear_layer_hessian_is_its_gauss_newton():
    obj, p = _problem([6, 3], "tanh", "cross_entropy")
    _, _, hess = mlp_newton_system(obj, p)
    _, _, ggn = mlp_newton_system(obj, p, "gauss_newton")
    assert _rel(hess, ggn) <= F64_TOL


@pytest.mark.parametrize("chunk_bytes", [1, 4096])
def test_sample_chunks_sum_to_the_whole_batch(chunk_bytes):
    obj, p = _problem([4, 8, 5, 3], "gelu", "cross_entropy", rows=37)
    whole = mlp_newton_system(obj, p)
    for got, want in zip(mlp_newton_system(obj, p, chunk_bytes=chunk_bytes), whole, strict=True):
        assert _rel(got, want) <= F64_TOL


def test_one_row_and_no_regulariser():
    obj, p = _problem([2, 3, 1], "tanh", "mse", rows=1, l2=0.0)
    ref_obj, ref_p = _upcast(obj, p)
    assert _rel(mlp_newton_system(obj, p)[2], torch.func.hessian(ref_obj.loss)(ref_p)) <= F64_TOL


def test_backend_refuses_a_hessian_over_the_dense_budget_before_assembling():
    obj, p = _problem([10, 20, 3], "tanh", "mse")
    with pytest.raises(ResourceLimitError) as err:
        backends.CLOSED_FORM.newton_system(obj, p, "hessian", 1024)
    assert err.value.field == "params" and "dense Hessian" in str(err.value)


def test_closed_form_serves_only_the_mlp():
    obj = make_objective("rosenbrock", {}, {})
    p = torch.zeros(obj.num_params, dtype=torch.float64)
    assert not backends.CLOSED_FORM.supports_system(obj, p, "hessian")
    mlp, q = _problem([3, 4, 2], "tanh", "mse")
    assert backends.CLOSED_FORM.supports_system(mlp, q, "gauss_newton")


DEEP_STEP = """
import resource, sys, torch
from hessian_service.engine import MethodOptions, make_objective
from hessian_service.engine.solvers.methods import Stepper
depth = int(sys.argv[1])
X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
objective = make_objective("mlp", {"X": X, "y": y}, {"layer_sizes": [3] + [2] * depth + [1]})
params = objective.init_params(torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
options = MethodOptions(method="newton_cg", backend="autograd", cg_max_iterations=3)
stepper = Stepper(objective, options.validated(), params)
stepper.step(stepper.evaluate(params))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_deep_narrow_network_steps_in_memory_linear_in_its_depth():
    """A Hessian-free step on [3] + [2] x 3000 + [1] (18,005 parameters): each layer's
    slice of the flat parameters made its own full-length derivative in the Hessian product,
    depth x parameters (0.9 GB here; 9 GB at 10,000 layers, from a request of kilobytes).
    Measured in a fresh process (peak resident memory)."""
    result = subprocess.run(
        [sys.executable, "-c", DEEP_STEP, "3000"], capture_output=True, text=True, check=True
    )
    grown = int(result.stdout.split()[-1])
    assert grown < 300 * 1024**2, grown
