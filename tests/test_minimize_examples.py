"""examples/minimize_*.py and least_squares_curve_fit.py run as a user runs them (a
subprocess, $HESSIAN_ADDRESS set); what they print is checked against scipy.optimize
(float64) solving the same problem."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hessian_service.server import ServerConfig, build_server
from scipy.optimize import least_squares, minimize, rosen, rosen_der, rosen_hess

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    server = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path_factory.mktemp("mex")))
    )
    yield server.address
    server.stop(grace=1.0)


def run_example(name: str, address: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HESSIAN_ADDRESS=address),
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_rosenbrock_example_reaches_scipys_minimum(address):
    x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2, 0.4, 1.6, 0.9, 1.1, 0.5])  # the example's
    ref = minimize(rosen, x0, jac=rosen_der, hess=rosen_hess, method="trust-exact").fun
    lines = run_example("minimize_rosenbrock.py", address).splitlines()
    methods = [line.split(":")[0] for line in lines]
    assert methods == ["newton", "levenberg_marquardt", "saddle_free", "newton_cg"]
    for line in lines:
        fun = float(re.search(r"fun=(\S+)", line).group(1))
        assert abs(fun - ref) <= 1e-10, line
        assert "success=True" in line


def test_curve_fit_example_matches_scipy_least_squares(address):
    rng = np.random.default_rng(0)  # the example's data, rebuilt independently
    t = np.linspace(0.0, 4.0, 200)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.01 * rng.standard_normal(t.size)
    ref = least_squares(
        lambda p: p[0] * np.exp(-p[1] * t) + p[2] - y, [1.0, 1.0, 0.0], xtol=1e-15, ftol=1e-15
    )
    out = run_example("minimize_curve_fit.py", address)
    a, b, c, loss = (float(v) for v in re.search(
        r"a=(\S+) b=(\S+) c=(\S+) loss=(\S+)", out).groups())  # fmt: skip
    np.testing.assert_allclose([a, b, c], ref.x, atol=2e-6)  # printed to 6 decimals
    assert loss == pytest.approx(ref.cost, rel=1e-9)
    assert "success=True" in out


def test_least_squares_example_matches_scipy_least_squares(address):
    rng = np.random.default_rng(0)  # the example's data, rebuilt independently
    t = np.linspace(0.0, 4.0, 200)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.01 * rng.standard_normal(t.size)
    ref = least_squares(
        lambda p: p[0] * np.exp(-p[1] * t) + p[2] - y, [1.0, 1.0, 0.0], xtol=1e-15, ftol=1e-15
    )
    out = run_example("least_squares_curve_fit.py", address)
    a, b, c, cost = (float(v) for v in re.search(
        r"a=(\S+) b=(\S+) c=(\S+) cost=(\S+)", out).groups())  # fmt: skip
    np.testing.assert_allclose([a, b, c], ref.x, atol=2e-6)  # printed to 6 decimals
    assert abs(cost - ref.cost) <= 1e-10
    assert "success=True" in out
