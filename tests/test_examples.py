"""Every script in examples/ runs as a user would run it (a subprocess, $HESSIAN_ADDRESS set)
against a real server on loopback; what it prints is checked against independent float64
references (scipy minimisers, closed forms) where there is one. The minimize_*.py and
least_squares_curve_fit.py scripts are checked against scipy.optimize solving the same
problem."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import OptimizeResult, least_squares, minimize, rosen, rosen_der, rosen_hess

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, address: str) -> str:
    env = dict(os.environ, HESSIAN_ADDRESS=address)
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def logistic_minimum(X: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """argmin mean(softplus(z) - y z) + 0.5 l2 ||w||^2, z = X w + b (scipy, float64)."""

    def f(p):
        z = X @ p[:-1] + p[-1]
        r = 1.0 / (1.0 + np.exp(-z))
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * p[:-1] @ p[:-1]
        g = np.append(X.T @ (r - y) / len(y) + l2 * p[:-1], np.mean(r - y))
        return loss, g

    return minimize(f, np.zeros(X.shape[1] + 1), jac=True, method="BFGS", tol=1e-12).x


def numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def test_tour(address):
    out = run_example("tour.py", address)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 5))
    y = (X @ [1.5, -2.0, 0.5, 0.0, 1.0] + 0.5 * rng.normal(size=500) > 0).astype(np.float64)
    want = logistic_minimum(X, y, 1e-3)
    final = re.search(r"FINISHED \w+ \[(.*)\]", out, re.S)
    assert final, out
    np.testing.assert_allclose(numbers(final[1]), want, atol=1.5e-3)


def test_logistic_fit_predict(address):
    out = run_example("logistic_fit_predict.py", address)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 4))
    y = (X @ [2.0, -1.0, 0.5, 0.0] + 0.3 + rng.normal(size=600) > 0).astype(int)
    want = logistic_minimum(X[:400], y[:400].astype(np.float64), 1e-2)
    coef = re.search(r"coef \[(.*)\] intercept (\S+)", out)
    np.testing.assert_allclose([*numbers(coef[1]), float(coef[2])], want, atol=1e-4)
    accuracy = np.mean(((X[400:] @ want[:-1] + want[-1]) > 0).astype(int) == y[400:])
    assert f"test accuracy {accuracy:.3f}" in out


def test_mlp_digits(address):
    pytest.importorskip("sklearn")
    out = run_example("mlp_digits.py", address)
    accuracy = float(re.search(r"test accuracy (\S+)", out)[1])
    assert accuracy >= 0.9, out
    predicted = re.search(r"first predicted classes \[(.*)\]", out)[1].split(",")
    assert len(predicted) == 10 and all(0 <= int(c) <= 9 for c in predicted)
    assert "layer shapes [(32, 64), (10, 32)]" in out


def test_watch_from_another_process(address):
    out = run_example("watch_from_another_process.py", address)
    assert "final status FINISHED" in out
    assert "same records as this process: True" in out


def test_async_usage(address):
    out = run_example("async_usage.py", address)
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(200, 8)), rng.normal(size=200)
    w = np.linalg.solve(X.T @ X / 200 + 0.1 * np.eye(8), X.T @ y / 200)
    minimum = 0.5 * np.mean((X @ w - y) ** 2) + 0.05 * w @ w
    for method in ("newton", "newton_cg"):
        loss = float(re.search(rf"^{method}\s+final loss (\S+)", out, re.M)[1])
        assert abs(loss - minimum) <= 1e-9, (method, loss, minimum)
    assert re.search(r"^gradient_descent\s+final loss", out, re.M)


def test_exported_curve_fit_matches_scipy_least_squares(address):
    """The exported damped-oscillation fit (Gauss-Newton / LM on the server) reaches the
    minimiser scipy.optimize.least_squares finds on the same samples (numpy model, float64)."""
    out = run_example("exported_curve_fit.py", address)
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 10.0, 200)

    def model(p):
        return p[0] * np.exp(-p[1] * t) * np.cos(p[2] * t + p[3])

    y = model((2.0, 0.3, 3.0, 0.5)) + 0.02 * rng.normal(size=t.size)
    ref = least_squares(lambda p: model(p) - y, [1.5, 0.2, 2.9, 0.3], xtol=1e-15, ftol=1e-15)
    fitted = np.array(numbers(out.split("fitted:")[1].splitlines()[0]))
    np.testing.assert_allclose(fitted, ref.x, rtol=1e-6)
    loss = numbers(out.split("loss:")[1])[0]
    assert loss == pytest.approx(np.mean(ref.fun**2), rel=1e-8)


def test_exported_conv1d_digits_learns_and_server_loss_is_the_eager_loss(address):
    """The conv net trained by newton_cg on the server classifies held-out digits (>85%),
    and the loss the server reports equals eager torch's cross-entropy at the final params."""
    out = run_example("exported_conv1d_digits.py", address)
    server = numbers(out.split("server loss:")[1])[0]
    local = numbers(out.split("local loss:")[1])[0]
    assert server == pytest.approx(local, rel=1e-9)
    assert server < 0.5 * numbers(out.split("start loss:")[1])[0]
    assert numbers(out.split("test accuracy:")[1])[0] > 0.85


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


def curve_fit_reference() -> OptimizeResult:
    """scipy least_squares on the curve-fit examples' data, rebuilt independently."""
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 4.0, 200)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.01 * rng.standard_normal(t.size)
    return least_squares(
        lambda p: p[0] * np.exp(-p[1] * t) + p[2] - y, [1.0, 1.0, 0.0], xtol=1e-15, ftol=1e-15
    )


def test_curve_fit_example_matches_scipy_least_squares(address):
    ref = curve_fit_reference()
    out = run_example("minimize_curve_fit.py", address)
    a, b, c, loss = (float(v) for v in re.search(
        r"a=(\S+) b=(\S+) c=(\S+) loss=(\S+)", out).groups())  # fmt: skip
    np.testing.assert_allclose([a, b, c], ref.x, atol=2e-6)  # printed to 6 decimals
    assert loss == pytest.approx(ref.cost, rel=1e-9)
    assert "success=True" in out


def test_least_squares_example_matches_scipy_least_squares(address):
    ref = curve_fit_reference()
    out = run_example("least_squares_curve_fit.py", address)
    a, b, c, cost = (float(v) for v in re.search(
        r"a=(\S+) b=(\S+) c=(\S+) cost=(\S+)", out).groups())  # fmt: skip
    np.testing.assert_allclose([a, b, c], ref.x, atol=2e-6)  # printed to 6 decimals
    assert abs(cost - ref.cost) <= 1e-10
    assert "success=True" in out
