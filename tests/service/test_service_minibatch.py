"""gradient_fraction and block_size through a real server (issue 7's mini-batch and block Lanczos).

The reference is the engine called in this process on the same inputs: the server must add
nothing and lose nothing, so steps, records and reports are compared exactly; the block
Lanczos multiplicities are also checked against eigvalsh of the dense float64 matrix.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch
from conftest import health_status
from grpc_health.v1 import health_pb2
from hessian_client import problems
from hessian_client.cli import main
from hessian_client.proto import optimize_pb2, service_pb2
from hessian_client.tensors import encode
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective, take_step
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature

F64 = torch.float64
LS_OPTS = {"l2": 0.05, "fit_intercept": True}


def _least_squares(rows=80, d=6):
    x = torch.randn(rows, d, dtype=F64)
    y = x @ torch.randn(d, dtype=F64) + 0.3 * torch.randn(rows, dtype=F64)
    wire = problems.least_squares(x.numpy(), y.numpy(), **LS_OPTS)
    return wire, make_objective("least_squares", {"X": x, "y": y}, LS_OPTS)


def test_a_minibatch_newton_cg_step_equals_the_engine_step(client):
    wire, obj = _least_squares()
    params = torch.randn(obj.num_params, dtype=F64)
    options = {"method": "newton_cg", "gradient_fraction": 0.25, "seed": 3}
    engine = take_step(obj, params, MethodOptions(**options))
    got = client.newton_step(wire, params.numpy(), **options)
    assert got.record.gradient_batch_size == engine.record.gradient_batch_size == 20
    assert np.array_equal(got.params, engine.params.numpy())
    assert got.record.loss == engine.record.loss
    assert got.record.step_norm == engine.record.step_norm
    full = client.newton_step(wire, params.numpy(), method="newton_cg", seed=3)
    assert full.record.gradient_batch_size == 0  # the default: the full gradient
    # (not step_norm: both steps often end on the trust radius, so their norms are equal)
    assert not np.array_equal(full.params, got.params)


def test_a_minibatch_run_streams_its_batch_sizes_and_keeps_its_options(client):
    wire, obj = _least_squares(rows=120)
    params = torch.zeros(obj.num_params, dtype=F64)
    options = {"method": "gauss_newton_cg", "gradient_fraction": 0.5}
    stopping = {"max_iterations": 5, "function_tolerance": 0.0}
    run = client.start_run(wire, params.numpy(), stopping=stopping, curvature_seed=8, **options)
    records = list(run.stream())
    assert run.final.options.gradient_fraction == 0.5 and run.final.options.seed == 8
    engine = Run(obj, params, MethodOptions(seed=8, **options), StopCriteria(**stopping))
    expected = list(engine)
    assert [r.loss for r in records] == [r.loss for r in expected]
    assert [r.gradient_batch_size for r in records] == [60] * 5 + [0]
    assert records[-1].loss < records[0].loss


def test_analyze_curvature_returns_multiplicities_with_a_block_size(client):
    eigenvalues = [6.0, 6.0, 6.0, *np.linspace(1.0, 4.0, 30).tolist(), -2.0, -2.0]
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T
    a = (a + a.T) / 2
    wire = problems.quadratic(a.numpy(), np.zeros(n))
    obj = make_objective("quadratic", {"A": a, "b": torch.zeros(n, dtype=F64)})
    options = {
        "top_k": 3,
        "bottom_k": 2,
        "block_size": 3,
        "max_lanczos_iterations": n,
        "trace_samples": 0,
        "density_probes": 0,
    }
    params = torch.zeros(n, dtype=F64)
    want = analyze_curvature(obj, params, SpectrumOptions(**options))
    got = client.analyze_curvature(wire, params.numpy(), **options)
    assert got.top_eigenvalues == want.top_eigenvalues
    assert got.bottom_eigenvalues == want.bottom_eigenvalues
    assert got.products == want.products and got.lanczos_iterations == want.lanczos_iterations
    np.testing.assert_allclose(got.top_eigenvalues, [6.0] * 3, rtol=1e-6)
    np.testing.assert_allclose(got.bottom_eigenvalues, [-2.0] * 2, rtol=1e-6)
    assert got.verdict == "saddle"


def test_cli_flags_carry_gradient_fraction_and_block_size(server, client, capsys, tmp_path):
    _, obj = _least_squares(rows=40, d=3)
    data = tmp_path / "ls.npz"
    np.savez(data, X=obj.data["X"].numpy(), y=obj.data["y"].numpy())
    args = ["--address", server.address, "run", "--objective", "least_squares"]
    args += ["--data", str(data), "--option", "l2=0.05", "--option", "fit_intercept=true"]
    args += ["--params", str(tmp_path / "x0.npy"), "--method", "newton_cg"]
    np.save(tmp_path / "x0.npy", np.zeros(obj.num_params))
    assert main([*args, "--gradient-fraction", "0.25", "--max-iterations", "3", "--detach"]) == 0
    run_id = capsys.readouterr().out.strip()
    records = list(client.run(run_id).stream())
    assert [r.gradient_batch_size for r in records] == [10, 10, 10, 0]

    a = torch.diag(torch.tensor([5.0, 5.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=F64))
    np.savez(tmp_path / "q.npz", A=a.numpy(), b=np.zeros(7))
    np.save(tmp_path / "p.npy", np.zeros(7))
    args = ["--address", server.address, "curvature", "--objective", "quadratic"]
    args += ["--data", str(tmp_path / "q.npz"), "--params", str(tmp_path / "p.npy")]
    args += ["--top-k", "3", "--block-size", "3", "--trace-samples", "0"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top_eigenvalues"] == pytest.approx([5.0, 5.0, 5.0], rel=1e-9)
    assert main([*args, "--json", "--backend", "autograd"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "autograd"
    assert main([*args, "--backend", "autograd"]) == 0
    assert "backend autograd" in capsys.readouterr().out


def _step(**options):
    return service_pb2.StepRequest(
        problem=problems.mse(np.arange(6.0).reshape(2, 3)),
        params=encode(np.zeros(6)),
        options=optimize_pb2.MethodOptions(**options),
    )


CG = optimize_pb2.METHOD_NEWTON_CG


@pytest.mark.parametrize(
    "method,request_,field",
    [
        ("NewtonStep", _step(method=CG, gradient_fraction=0.0), "options.gradient_fraction"),
        ("NewtonStep", _step(method=CG, gradient_fraction=1.5), "options.gradient_fraction"),
        (
            "NewtonStep",
            _step(method=optimize_pb2.METHOD_NEWTON, gradient_fraction=0.5),
            "options.gradient_fraction",
        ),
        (
            "AnalyzeCurvature",
            service_pb2.AnalyzeCurvatureRequest(
                problem=problems.mse(np.arange(6.0).reshape(2, 3)),
                params=encode(np.zeros(6)),
                options=optimize_pb2.SpectrumOptions(block_size=0),
            ),
            "options.block_size",
        ),
    ],
    ids=["gradient_fraction 0", "gradient_fraction 1.5", "newton", "block_size 0"],
)
def test_bad_minibatch_and_block_options_name_the_field(server, stub, method, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details(), err.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
