"""The caller evaluates (Optimize / minimize) against scipy.optimize.minimize in process.

Rosenbrock (scipy.optimize.rosen and its derivatives, float64) from a seeded start in the
global minimum's basin: evaluation counts of each server method next to SciPy's
trust-exact, Newton-CG and trust-krylov; then, for n = 10, the time per accepted step and
the loopback round trips (evaluation requests) per accepted step. An in-process server on
127.0.0.1; HESSIAN_BENCH_QUICK=1 times one run of each instead of the best of five.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

import numpy as np
from common import format_seconds, markdown_table
from hessian_client import Client, least_squares, minimize
from hessian_service.server import ServerConfig, build_server
from scipy.optimize import least_squares as scipy_least_squares
from scipy.optimize import minimize as scipy_minimize
from scipy.optimize import rosen, rosen_der, rosen_hess, rosen_hess_prod

TITLE = "The caller evaluates: minimize() over Optimize vs scipy.optimize.minimize"
QUICK = os.environ.get("HESSIAN_BENCH_QUICK", "") not in ("", "0")
OURS = {
    "newton": {"hess": rosen_hess},
    "levenberg_marquardt": {"hess": rosen_hess},
    "saddle_free": {"hess": rosen_hess},
    "newton_cg": {"hessp": rosen_hess_prod},
}
SCIPY = {"trust-exact": {"hess": rosen_hess}, "Newton-CG": {"hessp": rosen_hess_prod},
         "trust-krylov": {"hessp": rosen_hess_prod}}  # fmt: skip


def start(n: int) -> np.ndarray:
    return np.random.default_rng(n).uniform(0.2, 1.8, n)


def accepted_steps(address: str, run_id: str) -> int:
    with Client(address) as client:
        return sum(bool(r.step_accepted) for r in client.run(run_id).records())


def counts_table(address: str, sizes: tuple[int, ...]) -> str:
    rows = []
    for n in sizes:
        x0 = start(n)
        for method, curvature in OURS.items():
            r = minimize(rosen, x0, jac=rosen_der, method=method, address=address, **curvature)
            rows.append([str(n), f"server {method}", str(r.nit), str(r.nfev), str(r.njev),
                         str(r.nhev), f"{r.fun:.2e}"])  # fmt: skip
        for method, curvature in SCIPY.items():
            s = scipy_minimize(rosen, x0, jac=rosen_der, method=method, **curvature)
            nhev = s.get("nhev", 0)
            rows.append([str(n), f"scipy {method}", str(s.nit), str(s.nfev), str(s.njev),
                         str(nhev), f"{s.fun:.2e}"])  # fmt: skip
    header = ["n", "solver", "nit", "nfev", "njev", "nhev (Hessians or HVPs)", "final loss"]
    return markdown_table(header, rows)


def rosen_residuals(x: np.ndarray) -> np.ndarray:
    """Rosenbrock as residuals (0.5 ||r||^2 = rosen / 2) and below, their Jacobian."""
    return np.concatenate([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])


def rosen_jacobian(x: np.ndarray) -> np.ndarray:
    n, i = x.size, np.arange(x.size - 1)
    j = np.zeros((2 * (n - 1), n))
    j[i, i], j[i, i + 1], j[n - 1 + i, i] = -20.0 * x[:-1], 10.0, -1.0
    return j


def least_squares_table(address: str, sizes: tuple[int, ...]) -> str:
    """least_squares' counts (Gauss-Newton products over the stream) next to SciPy's."""
    rows = []
    for n in sizes:
        x0 = start(n)
        for method in ("levenberg_marquardt", "gauss_newton", "gauss_newton_cg"):
            r = least_squares(rosen_residuals, x0, rosen_jacobian, method=method, gtol=1e-10,
                              xtol=1e-15, max_iterations=1000, address=address)  # fmt: skip
            rows.append([str(n), f"server {method}", str(r.nfev), str(r.njev),
                         str(r.round_trips), f"{r.cost:.2e}"])  # fmt: skip
        for method in ("trf", "lm"):
            s = scipy_least_squares(rosen_residuals, x0, jac=rosen_jacobian, method=method,
                                    xtol=1e-15, ftol=1e-15, gtol=1e-15)  # fmt: skip
            rows.append([str(n), f"scipy {method}", str(s.nfev), str(s.njev), "0",
                         f"{s.cost:.2e}"])  # fmt: skip
    header = ["n", "solver", "nfev (residuals)", "njev (Jacobians)", "round trips", "cost"]
    return markdown_table(header, rows)


def step_table(address: str, repeats: int) -> str:
    x0 = start(10)
    rows = []
    for (method, curvature), speculative in itertools.product(OURS.items(), (True, False)):
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = minimize(rosen, x0, jac=rosen_der, method=method, address=address,
                              options={"speculative": speculative}, **curvature)  # fmt: skip
            times.append(time.perf_counter() - t0)
        steps = max(accepted_steps(address, result.run_id), 1)
        label = f"server {method}" + ("" if speculative else " speculative=False")
        rows.append([label, str(steps), format_seconds(min(times) / steps),
                     f"{result.round_trips / steps:.2f}"])  # fmt: skip
    for method, curvature in (("trust-exact", {"hess": rosen_hess}),
                              ("trust-krylov", {"hessp": rosen_hess_prod})):  # fmt: skip
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = scipy_minimize(rosen, x0, jac=rosen_der, method=method, **curvature)
            times.append(time.perf_counter() - t0)
        rows.append([f"scipy {method}", str(s.nit), format_seconds(min(times) / s.nit), "0"])
    header = ["solver (n = 10)", "accepted steps", "time per accepted step (best of runs)",
              "round trips per accepted step"]  # fmt: skip
    return markdown_table(header, rows)


def run() -> str:
    with tempfile.TemporaryDirectory() as data:
        server = build_server(ServerConfig(address="127.0.0.1:0", data_dir=data))
        try:
            counts = counts_table(server.address, (2, 10, 100))
            steps = step_table(server.address, 1 if QUICK else 5)
            lsq = least_squares_table(server.address, (2, 10, 50))
        finally:
            server.stop(grace=1.0)
    return (
        "Evaluation counts (server: the caller's function / gradient / Hessian or HVP "
        "calls; nit counts rejected trust-region and Levenberg-Marquardt trials too):\n\n"
        f"{counts}\n\nTime and loopback round trips per accepted step (a round trip is one "
        "evaluation request answered; by default each step's first trial asks everything a "
        "new point needs, so 1 is the floor; with speculative=False trials ask the loss "
        "alone and 2 is):\n\n"
        f"{steps}\n\nleast_squares on Rosenbrock as residuals (the server sees 0.5 ||r||^2, "
        "J^T r and J^T J v; the caller computes r and J once per point) vs "
        f"scipy.optimize.least_squares:\n\n{lsq}\n"
    )


if __name__ == "__main__":
    print(run())
