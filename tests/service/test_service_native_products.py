"""Native curvature products through a real server: NewtonStep (newton_cg) and AnalyzeCurvature.

The wire says which products ran (StepRecord.backend, AnalyzeCurvatureResponse.backend):
native for a covered objective under auto/native when the extension loaded, autograd when
asked or for an uncovered objective; the answers match the engine's to rounding.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hessian_client import problems
from hessian_client.proto import optimize_pb2, service_pb2
from hessian_client.tensors import encode
from hessian_service.engine import make_objective
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from hessian_service.engine.backends.selector import native_status

F64 = torch.float64
NATIVE = "native" if native_status()[0] else "autograd"  # what auto serves linear models with
SPECTRUM = {"top_k": 2, "bottom_k": 2, "trace_samples": 6, "density_probes": 0, "seed": 5}


def _logistic(rows: int = 80, d: int = 6):
    x = torch.randn(rows, d, dtype=F64)
    y = torch.randint(0, 2, (rows,)).to(F64)
    wire = problems.logistic_regression(x.numpy(), y.numpy(), l2=0.05)
    obj = make_objective("logistic_regression", {"X": x, "y": y}, {"l2": 0.05})
    return wire, obj


def _mlp():
    x, y = torch.randn(30, 4, dtype=F64), torch.randn(30, 1, dtype=F64)
    return problems.mlp(x.numpy(), y.numpy(), layer_sizes=[4, 8, 1])


def test_analyze_curvature_reports_the_backend_and_matches_the_engine(client):
    wire, obj = _logistic()
    params = 0.2 * torch.randn(obj.num_params, dtype=F64)
    auto = client.analyze_curvature(wire, params.numpy(), **SPECTRUM)
    plain = client.analyze_curvature(wire, params.numpy(), backend="autograd", **SPECTRUM)
    assert (auto.backend, plain.backend) == (NATIVE, "autograd")
    want = analyze_curvature(obj, params, SpectrumOptions(backend="auto", **SPECTRUM))
    assert auto.top_eigenvalues == want.top_eigenvalues and auto.products == want.products
    exact = torch.linalg.eigvalsh(torch.func.hessian(obj.loss)(params))
    for got in (auto, plain):
        np.testing.assert_allclose(got.top_eigenvalues, exact[-2:].flip(0).numpy(), rtol=1e-8)
        np.testing.assert_allclose(got.bottom_eigenvalues, exact[:2].numpy(), rtol=1e-8)


def test_newton_cg_step_record_says_which_products_ran(client):
    wire, obj = _logistic()
    params = np.zeros(obj.num_params)
    opts = {"method": "newton_cg", "cg_forcing": "fixed", "cg_tolerance": 1e-12}
    auto = client.newton_step(wire, params, **opts)
    plain = client.newton_step(wire, params, backend="autograd", **opts)
    assert (auto.record.backend, plain.record.backend) == (NATIVE, "autograd")
    assert auto.record.cg_iterations == plain.record.cg_iterations > 0
    np.testing.assert_allclose(auto.params, plain.params, rtol=1e-9, atol=1e-12)


def test_native_on_an_mlp_falls_back_and_says_autograd(client):
    wire = _mlp()
    params = np.full(4 * 8 + 8 + 8 + 1, 0.1)
    step = client.newton_step(wire, params, method="newton_cg", backend="native")
    assert step.record.backend == "autograd" and step.record.cg_iterations > 0
    report = client.analyze_curvature(wire, params, backend="native", **SPECTRUM)
    assert report.backend == "autograd"


def test_an_unknown_spectrum_backend_is_invalid_argument_naming_the_field(stub):
    wire, obj = _logistic()
    request = service_pb2.AnalyzeCurvatureRequest(
        problem=wire,
        params=encode(np.zeros(obj.num_params)),
        options=optimize_pb2.SpectrumOptions(backend=9),
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.AnalyzeCurvature(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.backend" in err.value.details()
