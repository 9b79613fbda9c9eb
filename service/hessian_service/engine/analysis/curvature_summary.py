"""Dense curvature at a point and the facts of its spectrum (for ComputeHessian).

One call: loss, gradient and the dense Hessian or Gauss-Newton matrix from the backend
the options resolve to, then eigvalsh of the symmetrised matrix for the extreme
eigenvalues, the negative count and the condition number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.selector import resolve
from ..budget import check_dense_budget
from ..cancel import CancelToken, check, scope
from ..errors import ValidationError
from ..linalg import all_finite, count_negative, negative_tolerance, symmetrise
from ..objectives.base import Objective
from ..options import MethodOptions
from ..validation import decomposable


@dataclass(frozen=True)
class SpectrumSummary:
    """Extreme eigenvalues, how many are negative, |lambda|max / |lambda|min, trace.

    negative_eigenvalues counts those below -negative_tolerance (max(n, log2(rows)) eps
    max|lambda|, eps of the matrix's dtype, rows the data rows its entries sum over: smaller
    magnitudes are rounding); positive_definite means the
    smallest is above +negative_tolerance; condition_number is +inf when some |lambda| is
    within negative_tolerance of 0 (singular to rounding).
    """

    min_eigenvalue: float
    max_eigenvalue: float
    negative_eigenvalues: int
    condition_number: float
    positive_definite: bool
    trace: float
    negative_tolerance: float = 0.0


@dataclass(frozen=True)
class DenseCurvature:
    """The loss, gradient and dense curvature matrix at a point, and which backend built it."""

    loss: float
    gradient: torch.Tensor
    matrix: torch.Tensor
    summary: SpectrumSummary
    backend: str


def spectrum_summary(matrix: torch.Tensor, rows: int = 0, psd: bool = False) -> SpectrumSummary:
    """Summarise the spectrum of a symmetric matrix (symmetrised first; eigvalsh in float64).

    Signs are judged against the rounding of the matrix's own dtype and of its entries' sums
    over `rows` data rows (`negative_tolerance`). `psd`: the matrix is positive
    semi-definite by construction (a convex objective's Hessian, a Gauss-Newton matrix), so
    its negative eigenvalues are rounding and none is counted (the smallest is reported as
    computed).
    """
    evals = torch.linalg.eigvalsh(symmetrise(matrix.to(torch.float64)))
    if evals.numel() == 0:
        return SpectrumSummary(0.0, 0.0, 0, math.nan, False, 0.0)
    magnitudes = evals.abs()
    smallest = float(magnitudes.min())
    tol = negative_tolerance(evals, matrix.dtype, rows)
    # singular to rounding (an eigenvalue within tol of 0, numpy.linalg.matrix_rank's test)
    condition = math.inf if smallest <= tol else float(magnitudes.max()) / smallest
    return SpectrumSummary(
        min_eigenvalue=float(evals[0]),
        max_eigenvalue=float(evals[-1]),
        negative_eigenvalues=0 if psd else count_negative(evals, matrix.dtype, rows),
        condition_number=condition,
        positive_definite=bool(evals[0] > tol),
        trace=float(evals.sum()),
        negative_tolerance=tol,
    )


def dense_curvature(
    objective: Objective,
    params: torch.Tensor,
    options: MethodOptions,
    cancel: CancelToken | None = None,
    prefix: str = "options.",
) -> DenseCurvature:
    """Dense curvature (options.curvature) at `params`, within options.dense_budget_bytes.

    A curvature the objective cannot form, or a matrix over the budget, is refused naming the
    option behind `prefix` (the server's request holds them at its top level). `cancel`:
    checked between row chunks of the autograd assembly and before the eigendecomposition
    (raises cancel.Cancelled).
    """
    with scope(cancel):
        return _dense_curvature(objective, params, options, prefix)


def _dense_curvature(
    objective: Objective, params: torch.Tensor, options: MethodOptions, prefix: str
) -> DenseCurvature:
    options = options.validated()
    objective.require_curvature(options.curvature, f"{prefix}curvature")
    x = objective.check_params(params)
    check_dense_budget(
        x.numel(), options.dense_budget_bytes, x.dtype, f"{prefix}dense_budget_bytes"
    )
    backend = resolve(options.backend, objective, x, options.curvature)
    loss, grad, matrix = backend.system.newton_system(
        objective, x, options.curvature, options.dense_budget_bytes
    )
    check("before the eigendecomposition")
    if not all_finite(matrix):  # LAPACK's refusal would say only that it failed to converge
        bad = int((~torch.isfinite(matrix)).sum())
        dtype = str(matrix.dtype).removeprefix("torch.")
        raise ValidationError(
            "params",
            "a point where the curvature matrix is finite",
            f"{bad} non-finite entries (values beyond {dtype}'s range?)",
        )
    if not (math.isfinite(float(loss)) and all_finite(grad)):  # NewtonStep refuses it too
        raise ValidationError(
            "params",
            "a point where the loss and its gradient are finite",
            f"loss {float(loss):g}" + ("" if all_finite(grad) else ", a non-finite gradient"),
        )
    with decomposable("params"):
        psd = objective.convex or options.curvature == "gauss_newton"
        summary = spectrum_summary(matrix, objective.num_rows, psd)
    return DenseCurvature(
        loss=float(loss),
        gradient=grad,
        matrix=matrix,
        summary=summary,
        backend=backend.system.name,
    )
