"""The native curvature backend: analytic assembly and solves from `hessian_service._C`.

Importing this module imports the extension (through `native.ops`), so a missing or broken
build raises here and `selector._load_native` logs the real exception and falls back.
Assembly is analytic for mse, quadratic, least_squares, logistic_regression and
softmax_regression (their Gauss-Newton matrix is their Hessian: linear models with convex
output losses); the mlp has its closed-form assembly (`curvature.mlp`, selected in
`backends`), every other objective the autograd one, and both still get the native solves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ... import linalg
from ...budget import check_dense_budget
from ...objectives.base import Objective
from .ops import ops

_DTYPES = (torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda") if torch.version.cuda else ("cpu",)


def _linear_args(objective: Objective) -> tuple[Any, ...]:
    o = objective.options
    return objective.data["X"], objective.data["y"], o["l2"], o["fit_intercept"]


def _softmax_args(objective: Objective) -> tuple[Any, ...]:
    o = objective.options
    return (
        objective.data["X"],
        objective.data["labels"],
        o["num_classes"],
        o["l2"],
        o["fit_intercept"],
    )


# objective name -> (system op, fused-step op (direct binding), data/option arguments)
ArgsFn = Callable[[Objective], tuple[Any, ...]]
_SYSTEMS: dict[str, tuple[Any, str, ArgsFn]] = {
    "mse": (ops.mse_system, "mse_newton_step", lambda o: (o.data["target"],)),
    "quadratic": (
        ops.quadratic_system,
        "quadratic_newton_step",
        lambda o: (o.data["A"], o.data["b"]),
    ),
    "least_squares": (ops.least_squares_system, "least_squares_newton_step", _linear_args),
    "logistic_regression": (
        ops.logistic_regression_system,
        "logistic_regression_newton_step",
        _linear_args,
    ),
    "softmax_regression": (
        ops.softmax_regression_system,
        "softmax_regression_newton_step",
        _softmax_args,
    ),
}


def _placed(t: torch.Tensor) -> bool:
    return t.dtype in _DTYPES and t.device.type in _DEVICES


class NativeBackend:
    """Curvature and solves from the compiled extension (torch.ops.hessian)."""

    name = "native"

    def __init__(self) -> None:
        from .... import _C

        self._fused = {name: getattr(_C, entry[1]) for name, entry in _SYSTEMS.items()}

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        if not _placed(params):
            return False
        if objective.name in _SYSTEMS:
            return kind == "hessian" or objective.supports_ggn
        return False

    def supports_solve(self, h: torch.Tensor) -> bool:
        return _placed(h)

    def newton_system(
        self, objective: Objective, params: torch.Tensor, kind: str, budget_bytes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_dense_budget(params.numel(), budget_bytes, params.dtype)
        op, _, args = _SYSTEMS[objective.name]
        return op(params, *args(objective))

    def solve(self, h: torch.Tensor, g: torch.Tensor, damping: float) -> linalg.SolveResult:
        d, lam, attempts = ops.damped_cholesky(h, g, float(damping), linalg.MAX_DAMPING_ATTEMPTS)
        attempts = int(attempts)
        if attempts == 0:
            raise FloatingPointError(
                f"the damped Cholesky solve found no positive-definite H + lambda I within "
                f"{linalg.MAX_DAMPING_ATTEMPTS} attempts (last lambda {float(lam):.3g})"
            )
        return linalg.SolveResult(d, float(lam), attempts)

    def saddle_free(self, h: torch.Tensor, g: torch.Tensor, floor: float) -> linalg.SolveResult:
        """The native direction; the negative count is `linalg.negative_eigenvalues`' (the op
        counts eigenvalues below 0 with no rounding tolerance), as the autograd path's."""
        d, _ = ops.saddle_free(h, g, float(floor))
        return linalg.SolveResult(d, 0.0, 1, linalg.negative_eigenvalues(h))

    def fused_entry(self, objective: Objective) -> tuple[Callable[..., Any], tuple] | None:
        """(fused-step function, data/option arguments) for a supported objective, else None.

        The function is the direct binding of the hessian::*_newton_step op:
        fn(x, *args, lr, damping, max_attempts) -> (x_new, (loss, |g|, max|g|, step norm,
        damping, attempts, finite)); see csrc/fused.cpp.
        """
        fn = self._fused.get(objective.name)
        if fn is None or objective.dtype not in _DTYPES:
            return None
        return fn, _SYSTEMS[objective.name][2](objective)
