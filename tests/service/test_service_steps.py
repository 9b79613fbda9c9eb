"""Unary calls through a real server equal the engine's own results, and a float64 reference.

The engine reference is `take_step` called in this process on the same inputs (so the
server must add nothing and lose nothing: exact equality); the independent reference is
a Newton or gradient step from torch.func on float64-upcast inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hessian_client import problems
from hessian_client.seed import seed_losses as client_seed_losses
from hessian_service.engine import MethodOptions, make_objective, take_step
from hessian_service.seed import seed_losses as engine_seed_losses

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {"float32": 2e-4, "float64": 1e-10}


def _problem(name: str, dtype: torch.dtype):
    """(wire problem, engine objective, initial params) on fresh random data."""
    n, d = 23, 4
    x = torch.randn(n, d, dtype=dtype)
    if name == "mse":
        data, opts = {"target": torch.randn(3, 4, dtype=dtype)}, {}
        wire = problems.mse(data["target"].numpy())
    elif name == "least_squares":
        data, opts = {"X": x, "y": torch.randn(n, dtype=dtype)}, {"l2": 0.1}
        wire = problems.least_squares(x.numpy(), data["y"].numpy(), l2=0.1)
    elif name == "logistic_regression":
        y = (torch.rand(n) < 0.5).to(dtype)
        data, opts = {"X": x, "y": y}, {"l2": 0.05, "fit_intercept": True}
        wire = problems.logistic_regression(x.numpy(), y.numpy(), l2=0.05)
    else:
        labels = torch.randint(0, 3, (n,))
        # no intercept: with one, the softmax Hessian is singular (shifting it changes nothing)
        data = {"X": x, "labels": labels}
        opts = {"num_classes": 3, "l2": 0.1, "fit_intercept": False}
        wire = problems.softmax_regression(
            x.numpy(), labels.numpy(), num_classes=3, l2=0.1, fit_intercept=False
        )
    objective = make_objective(name, data, opts)
    params = 0.3 * torch.randn(objective.num_params, dtype=dtype)
    return wire, objective, params


def _reference_step(objective, params: torch.Tensor, method: str, lr: float) -> np.ndarray:
    """One fixed step from torch.func on float64-upcast data and parameters."""
    up = {k: (v.double() if v.is_floating_point() else v) for k, v in objective.data.items()}
    ref = make_objective(objective.name, up, objective.options)
    x = params.double()
    g = torch.func.grad(ref.loss)(x)
    if method == "gradient_descent":
        return (x - lr * g).numpy()
    h = torch.func.hessian(ref.loss)(x)
    return (x - lr * torch.linalg.solve(h, g)).numpy()


def test_seed_comparison_through_the_client_equals_the_engine_exactly(client):
    assert client_seed_losses(client) == engine_seed_losses()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(
    "name", ["mse", "least_squares", "logistic_regression", "softmax_regression"]
)
@pytest.mark.parametrize("method", ["gradient_descent", "newton"])
def test_steps_equal_the_engine_and_a_float64_reference(client, name, dtype, method):
    wire, objective, params = _problem(name, DTYPES[dtype])
    lr = 0.7
    engine = take_step(objective, params, MethodOptions(method=method, learning_rate=lr))
    shaped = params.numpy().reshape(objective.param_shape)
    if method == "gradient_descent":
        got = client.gradient_step(wire, shaped, learning_rate=lr)
    else:
        got = client.newton_step(wire, shaped, learning_rate=lr)
    assert got.params.dtype == np.dtype(dtype)
    assert got.params.shape == shaped.shape
    np.testing.assert_array_equal(got.params.reshape(-1), engine.params.numpy())
    assert got.record.loss == engine.record.loss
    assert got.record.gradient_norm == engine.record.gradient_norm
    assert got.record.step_norm == engine.record.step_norm
    reference = _reference_step(objective, params, method, lr)
    np.testing.assert_allclose(got.params.reshape(-1), reference, rtol=TOL[dtype], atol=TOL[dtype])


def test_step_by_problem_id_equals_inline(client):
    wire, _, params = _problem("least_squares", torch.float64)
    pid = client.create_problem(wire)
    assert pid == client.create_problem(wire), "content address must be stable"
    by_id = client.newton_step(pid, params.numpy())
    inline = client.newton_step(wire, params.numpy())
    np.testing.assert_array_equal(by_id.params, inline.params)


def test_torch_tensors_in_torch_tensors_out(client):
    wire, objective, params = _problem("mse", torch.float64)
    got = client.newton_step(wire, params.reshape(objective.param_shape), learning_rate=1.0)
    assert isinstance(got.params, torch.Tensor)
    torch.testing.assert_close(got.params.reshape(-1), objective.data["target"].reshape(-1))


def test_compute_hessian_matches_torch_func_and_numpy_spectrum(client):
    wire, objective, params = _problem("logistic_regression", torch.float64)
    result = client.compute_hessian(wire, params.numpy())
    reference = torch.func.hessian(objective.loss)(params).numpy()
    np.testing.assert_allclose(result.matrix, reference, rtol=1e-10, atol=1e-12)
    evals = np.linalg.eigvalsh(reference)
    s = result.summary
    assert s.min_eigenvalue == pytest.approx(evals[0], rel=1e-9)
    assert s.max_eigenvalue == pytest.approx(evals[-1], rel=1e-9)
    assert s.negative_eigenvalues == int((evals < 0).sum())
    assert s.condition_number == pytest.approx(abs(evals).max() / abs(evals).min(), rel=1e-7)
    assert result.loss == pytest.approx(float(objective.loss(params)), rel=1e-12)


def test_compute_hessian_counts_negative_eigenvalues_of_an_indefinite_quadratic(client):
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    evals = torch.tensor([-3.0, -1.0, 0.5, 2.0, 4.0, 8.0], dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.T
    a = (a + a.T) / 2
    wire = problems.quadratic(a.numpy(), torch.randn(6, dtype=torch.float64).numpy())
    result = client.compute_hessian(wire, np.zeros(6), omit_matrix=True)
    assert result.matrix is None
    assert result.summary.negative_eigenvalues == 2
    assert result.summary.min_eigenvalue == pytest.approx(-3.0, rel=1e-9)
    assert result.summary.max_eigenvalue == pytest.approx(8.0, rel=1e-9)
    assert not result.summary.positive_definite


def test_sample_tensors_reproduce_torch_rand_draws(client):
    a, b = client.sample(7, [(3, 4), (5,)], dtype="float64")
    gen = torch.Generator().manual_seed(7)
    np.testing.assert_array_equal(a, torch.rand(3, 4, generator=gen, dtype=torch.float64).numpy())
    np.testing.assert_array_equal(b, torch.rand(5, generator=gen, dtype=torch.float64).numpy())
