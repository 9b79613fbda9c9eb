"""Shared helpers of the native-extension tests: the skip-or-fail gate and random inputs.

If `hessian_service._C` did not build or load, the native test modules skip with the real
import error in the reason (visible under `pytest -ra`); with HESSIAN_REQUIRE_NATIVE=1
(CI after `make install`) they fail instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from hessian_service.engine import make_objective
from hessian_service.engine.backends.selector import native_status

F32, F64 = torch.float32, torch.float64
SIZES = (1, 2, 25, 64, 65, 300)
TOL = {F64: 1e-12, F32: 1e-5}
# the backends this build runs: a test over both compares them where the extension loaded
BACKENDS = ["autograd"] + (["native"] if native_status()[0] else [])


def require_native() -> None:
    """Skip the calling module (or fail, under HESSIAN_REQUIRE_NATIVE=1) without _C."""
    available, reason = native_status()
    if available:
        return
    if os.environ.get("HESSIAN_REQUIRE_NATIVE") == "1":
        pytest.fail(f"HESSIAN_REQUIRE_NATIVE=1 but {reason}", pytrace=False)
    pytest.skip(f"native extension unavailable: {reason}", allow_module_level=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (absolute when ref is zero)."""
    got, ref = got.detach().double(), ref.detach().double()
    scale = float(ref.norm())
    return float((got - ref).norm()) / (scale if scale > 0 else 1.0)


def spd(n: int, dtype: torch.dtype = F64, lo: float = 1.0, hi: float = 10.0) -> torch.Tensor:
    """A random symmetric positive-definite matrix with eigenvalues in [lo, hi]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    evals = lo + (hi - lo) * torch.rand(n, dtype=F64)
    return ((q * evals) @ q.T).to(dtype)


def damped_at_rounding(
    n: int, dtype: torch.dtype, ulps: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(H, g, lambda): H has -mu (random) at a random diagonal position and a random SPD
    block elsewhere, lambda is `ulps` float64 ulps above mu: H + lambda I's pivot there is
    exactly -mu + lambda, rounding noise a damped Cholesky must not accept."""
    mu = float(torch.empty(()).uniform_(1.0, 500.0).to(dtype))
    lam = torch.tensor(mu, dtype=F64)
    for _ in range(ulps):
        lam = torch.nextafter(lam, torch.tensor(float("inf"), dtype=F64))
    h = torch.zeros(n, n, dtype=F64)
    h[1:, 1:] = spd(n - 1)
    h[0, 0] = -mu
    perm = torch.randperm(n)
    return h[perm][:, perm].to(dtype), torch.randn(n, dtype=F64).to(dtype), float(lam)


def symmetric_with(evals: torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    """Q diag(evals) Q^T for a random orthogonal Q."""
    n = evals.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    return ((q * evals.to(F64)) @ q.T).to(dtype)


def objective_of_size(name: str, n: int, dtype: torch.dtype = F64, **opts):
    """A random `name` problem with exactly n parameters (None where n is impossible)."""
    if name == "mse":
        return make_objective("mse", {"target": torch.rand(n, dtype=dtype)})
    if name == "quadratic":
        a = spd(n, dtype)
        return make_objective("quadratic", {"A": a, "b": torch.randn(n, dtype=dtype)})
    if name in ("least_squares", "logistic_regression"):
        fit = n > 1
        d = n - int(fit)
        samples = max(2 * n, 20)
        x = torch.randn(samples, d, dtype=dtype) / max(1.0, d**0.5)
        y = torch.randn(samples, dtype=dtype)
        if name == "logistic_regression":
            y = torch.randint(0, 2, (samples,)).to(dtype)
        options = {"l2": 0.1, "fit_intercept": fit, **opts}
        return make_objective(name, {"X": x, "y": y}, options)
    if name == "softmax_regression":
        shapes = {
            2: (1, 2, False),
            25: (4, 5, True),
            64: (15, 4, True),
            65: (13, 5, False),
            300: (29, 10, True),
        }
        if n not in shapes:
            return None
        d, k, fit = shapes[n]
        samples = max(2 * n, 20)
        x = torch.randn(samples, d, dtype=dtype) / max(1.0, d**0.5)
        labels = torch.randint(0, k, (samples,))
        options = {"num_classes": k, "l2": 0.05, "fit_intercept": fit, **opts}
        return make_objective(name, {"X": x, "labels": labels}, options)
    raise AssertionError(name)


def upcast(objective):
    """The same problem in float64 (the reference's precision)."""
    data = {k: (v.double() if v.is_floating_point() else v) for k, v in objective.data.items()}
    return make_objective(objective.name, data, dict(objective.options))
