"""The server's settings for exported programs: --exported-compile and
--exported-evaluation-seconds reach the objectives a real server builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import start_server
from hessian_client import Client, ResourceExhausted, problems
from hessian_service.engine.objectives import export_compile
from hessian_service.server import ServerConfig

F64 = torch.float64
N, D = 6, 3


def least_squares(params, X, y):
    r = X @ params.reshape(D, 1) - y.reshape(-1, 1)
    return 0.5 * torch.mean(r * r) + 0.05 * torch.sum(params * params)


def data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "X": torch.randn(N, D, generator=gen, dtype=F64),
        "y": torch.randn(N, generator=gen, dtype=F64),
    }


def test_exported_flags_parse_from_flags_and_environment():
    config = ServerConfig.from_args(
        ["--exported-compile"], {"HESSIAN_EXPORTED_EVALUATION_SECONDS": "2.5"}
    )
    assert config.exported_compile is True and config.exported_evaluation_seconds == 2.5
    assert ServerConfig().exported_compile is False
    assert ServerConfig().exported_evaluation_seconds == 60.0
    with pytest.raises(ValueError, match="--exported-evaluation-seconds must be > 0"):
        ServerConfig.from_args(["--exported-evaluation-seconds", "0"], {})


def test_evaluation_limit_flag_reaches_exported_objectives(tmp_path):
    """A limit no evaluation can meet (1e-300 s) refuses the exported problem with
    RESOURCE_EXHAUSTED naming it; the same server still runs catalogue problems."""
    handle = start_server(tmp_path, exported_evaluation_seconds=1e-300)
    try:
        with Client(handle.address, timeout=60) as client:
            problem = problems.exported(least_squares, torch.zeros(D, dtype=F64), data())
            with pytest.raises(ResourceExhausted, match="limit of 1e-300 s"):
                client.newton_step(problem, np.zeros(D))
            tensors = data()
            catalogue = problems.least_squares(tensors["X"], tensors["y"], l2=0.1)
            assert client.newton_step(catalogue, np.zeros(D)).params.shape == (D,)
    finally:
        handle.stop(grace=1.0)


def test_compile_flag_evaluates_compiled_and_matches_the_catalogue(tmp_path, monkeypatch):
    """With --exported-compile the server's objective evaluates through the compiled graph
    (counted), and its Newton step equals the catalogue least_squares one to 1e-12."""
    calls = []
    original = export_compile.CompiledProgram._call

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(export_compile.CompiledProgram, "_call", counted)
    handle = start_server(tmp_path, exported_compile=True)
    try:
        with Client(handle.address, timeout=120) as client:
            tensors = data()
            twin = problems.exported(least_squares, torch.zeros(D, dtype=F64), tensors)
            catalogue = problems.least_squares(tensors["X"], tensors["y"], l2=0.1)
            x = np.random.default_rng(5).normal(size=D)
            ours = client.newton_step(twin, x, backend="autograd")
            ref = client.newton_step(catalogue, x, backend="autograd")
            np.testing.assert_allclose(ours.params, ref.params, rtol=1e-12, atol=1e-14)
            assert calls, "the compiled graph was not used"
    finally:
        handle.stop(grace=1.0)
