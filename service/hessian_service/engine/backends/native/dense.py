"""The native curvature backend: analytic assembly and solves from `hessian_service._C`.

Importing this module imports the extension (through `native.ops`), so a missing or broken
build raises here and `selector._load_native` logs the real exception and falls back.
Assembly is analytic for the objectives that declare the "system" kernel (`native_kernels`:
today mse, quadratic, least_squares, logistic_regression and softmax_regression, whose
Gauss-Newton matrix is their Hessian: linear models with convex output losses); each op is
hessian::<name>_system called with the objective's `native_args()`. The mlp has its
closed-form assembly (`curvature.mlp`, chosen in `selector`), every other objective the
autograd one, and both still get the native solves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ... import linalg
from ...budget import check_dense_budget
from ...objectives.base import Objective
from .ops import declared_op, ops

_DTYPES = (torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda") if torch.version.cuda else ("cpu",)


def _placed(t: torch.Tensor) -> bool:
    return t.dtype in _DTYPES and t.device.type in _DEVICES


class NativeBackend:
    """Curvature and solves from the compiled extension (torch.ops.hessian)."""

    name = "native"

    def supports_system(self, objective: Objective, params: torch.Tensor, kind: str) -> bool:
        declared = "system" in objective.native_kernels
        return declared and _placed(params) and objective.has_curvature(kind)

    def supports_solve(self, h: torch.Tensor) -> bool:
        return _placed(h)

    def newton_system(
        self, objective: Objective, params: torch.Tensor, kind: str, budget_bytes: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_dense_budget(params.numel(), budget_bytes, params.dtype)
        op = declared_op(type(objective), "system", f"{objective.name}_system")
        return op(params, *objective.native_args())

    def solve(self, h: torch.Tensor, g: torch.Tensor, damping: float) -> linalg.SolveResult:
        d, lam, attempts = ops.damped_cholesky(h, g, float(damping), linalg.MAX_DAMPING_ATTEMPTS)
        attempts = int(attempts)
        if attempts == 0:
            raise FloatingPointError(
                f"the damped Cholesky solve found no positive-definite H + lambda I within "
                f"{linalg.MAX_DAMPING_ATTEMPTS} attempts (last lambda {float(lam):.3g})"
            )
        return linalg.SolveResult(d, float(lam), attempts)

    def saddle_free(
        self, h: torch.Tensor, g: torch.Tensor, floor: float, rows: int = 0
    ) -> linalg.SolveResult:
        """The native direction and negative count (the op counts against
        `linalg.negative_tolerance`, as the autograd path does)."""
        factor = linalg.rounding_factor(h.shape[0], rows)
        d, negative = ops.saddle_free(h, g, float(floor), factor)
        return linalg.SolveResult(d, 0.0, 1, int(negative))

    def fused_entry(self, objective: Objective) -> tuple[Callable[..., Any], tuple] | None:
        """(fused-step function, data/option arguments) for a supported objective, else None.

        The function is the direct binding of the hessian::*_newton_step op:
        fn(x, *args, lr, damping, max_attempts) -> (x_new, (loss, |g|, max|g|, step norm,
        damping, attempts, finite, slope g.d)); see csrc/fused_steps.h.
        """
        if "newton_step" not in objective.native_kernels or objective.dtype not in _DTYPES:
            return None
        name = f"{objective.name}_newton_step"
        fn = declared_op(type(objective), "newton_step", name, direct=True)
        return fn, objective.native_args()
