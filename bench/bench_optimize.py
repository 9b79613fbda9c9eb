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
from hessian_client import Client, minimize
from hessian_service.server import ServerConfig, build_server
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
        finally:
            server.stop(grace=1.0)
    return (
        "Evaluation counts (server: the caller's function / gradient / Hessian or HVP "
        "calls; nit counts rejected trust-region and Levenberg-Marquardt trials too):\n\n"
        f"{counts}\n\nTime and loopback round trips per accepted step (a round trip is one "
        "evaluation request answered; by default each step's first trial asks everything a "
        "new point needs, so 1 is the floor; with speculative=False trials ask the loss "
        "alone and 2 is):\n\n"
        f"{steps}\n"
    )


if __name__ == "__main__":
    print(run())
