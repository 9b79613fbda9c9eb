"""Curvature that overflows float64 (an l2 of 1e200 or more) is the caller's input, not a bug:
a dense decomposition refuses it as INVALID_ARGUMENT naming params, where LAPACK's refusal
used to escape as INTERNAL (found by the hostile-input suite); Newton-CG, whose products
run on the unit-scaled gradient, answers the step."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hessian_client import InvalidArgument, problems
from hessian_client.proto import service_pb2
from hessian_client.tensors import encode

X = np.array([[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6], [0.7, 0.8], [0.2, -0.9], [1.0, 0.1]])
LABELS = np.array([0, 1, 2, 0, 1, 2])
PARAMS = np.linspace(-0.1, 0.1, 9)


def _softmax(l2: float):
    return problems.softmax_regression(X, LABELS, num_classes=3, l2=l2)


def test_compute_hessian_of_an_overflowing_curvature_names_params(client):
    with pytest.raises(InvalidArgument) as info:
        client.compute_hessian(_softmax(1e308), PARAMS, backend="autograd")
    assert info.value.message.startswith(
        "params: expected a point whose curvature matrix float64 can decompose"
    )


@pytest.mark.parametrize("l2", [1e200, 1e308])
@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_newton_cg_step_at_an_overflowing_scale_is_answered(client, method, l2):
    # its CG products (p.A p of a gradient of 1e200 or more) overflowed and the step was
    # refused naming params; on the unit-scaled gradient the solve works: the l2 term
    # dominates every weight's curvature and gradient, so its Newton step takes the
    # weights to 0 (the intercepts' O(1) gradient is below CG's relative tolerance)
    step = client.newton_step(_softmax(l2), PARAMS, method=method, backend="autograd")
    new = step.params
    assert step.record.step_accepted and np.all(np.isfinite(new))
    assert np.abs(new[:6]).max() <= 1e-12 * np.abs(PARAMS[:6]).max(), new
    assert np.array_equal(new[6:], PARAMS[6:])


def test_the_same_calls_at_a_sane_scale_are_answered(client):
    hessian = client.compute_hessian(_softmax(0.1), PARAMS, backend="autograd")
    assert np.isfinite(hessian.summary.max_eigenvalue)
    for method in ("newton_cg", "gauss_newton_cg"):
        step = client.newton_step(_softmax(0.1), PARAMS, method=method, backend="autograd")
        assert step.record.loss < 2.0


@pytest.mark.parametrize("budget", [0, -1, -(2**63)])
def test_compute_hessian_names_its_own_dense_budget_field(stub, budget):
    request = service_pb2.ComputeHessianRequest(
        problem=_softmax(0.1), params=encode(PARAMS), dense_budget_bytes=budget
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeHessian(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"dense_budget_bytes: expected a positive integer, got {budget}"


@pytest.mark.parametrize("backend", ["autograd", "native"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compute_hessian_over_its_dense_budget_names_that_field(stub, backend, dtype):
    # 9 parameters: 324 bytes in float32, 648 in float64 (the data's dtype); one byte short
    need = 81 * np.dtype(dtype).itemsize
    problem = problems.softmax_regression(X.astype(dtype), LABELS, num_classes=3, l2=0.1)
    request = service_pb2.ComputeHessianRequest(
        problem=problem,
        params=encode(PARAMS.astype(dtype)),
        backend=f"BACKEND_{backend.upper()}",
        dense_budget_bytes=need - 1,
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeHessian(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details().startswith(
        f"dense_budget_bytes: a dense Hessian of 9 parameters needs {need} bytes (9x9 {dtype})"
    )
    request.dense_budget_bytes = need
    answer = stub.ComputeHessian(request, timeout=30)
    assert list(answer.matrix.shape) == [9, 9]


@pytest.mark.parametrize("backend", ["autograd", "native"])
def test_analyze_curvature_of_an_overflowing_curvature_names_params(client, backend):
    # found by the mutation fuzz: Lanczos' products overflow, and the SVD/eigh of the
    # tridiagonal escaped as INTERNAL (LinAlgError on non-finite values)
    with pytest.raises(InvalidArgument) as info:
        client.analyze_curvature(_softmax(1e308), PARAMS, backend=backend, seed=0)
    assert info.value.message.startswith("params: expected a point")
