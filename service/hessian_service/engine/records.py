"""Step records and run outcomes, after Ceres Solver's IterationSummary and termination types."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class StopReason(enum.StrEnum):
    """Why a run ended (declared once: the wire enum is matched to these by name).

    Only GRADIENT_TOLERANCE (the first-order condition max|g| <= tol) is convergence (and
    not at a point whose Hessian has a negative eigenvalue: Run.converged).
    FUNCTION_STALLED / PARAMETERS_STALLED: the loss or parameter change fell below its
    tolerance while the gradient test was not met. NO_PROGRESS: no step can lower the loss
    at this precision (Levenberg-Marquardt's damping reached its cap, every trial rejected;
    or a line search failed with its first trial's changes within the loss's rounding).
    """

    GRADIENT_TOLERANCE = "gradient_tolerance"
    FUNCTION_STALLED = "function_stalled"
    PARAMETERS_STALLED = "parameters_stalled"
    NO_PROGRESS = "no_progress"
    MAX_ITERATIONS = "max_iterations"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    NON_FINITE = "non_finite"
    LINE_SEARCH_FAILED = "line_search_failed"
    SOLVER_FAILED = "solver_failed"
    # Never returned by the engine: the run manager's ends (the server stopped; an error
    # the run did not survive), and what earlier servers stored for the stalled tests.
    SHUTDOWN = "shutdown"
    ERROR = "error"
    FUNCTION_TOLERANCE = "function_tolerance"
    PARAMETER_TOLERANCE = "parameter_tolerance"

    @property
    def converged(self) -> bool:
        """The first-order condition was met; every other stop is not convergence."""
        return self is StopReason.GRADIENT_TOLERANCE


@dataclass
class StepRecord:
    """One iteration: the iterate x_k and the step taken from it.

    loss and gradient norms are at x_k; loss_change is f(x_{k-1}) - f(x_k) (0 for the
    first record). loss is always the full-data loss; with a Hessian-free mini-batch
    gradient (gradient_fraction < 1) gradient_norm and gradient_max_norm are of the
    mini-batch gradient the step from x_k uses (no full gradient is computed). The step
    fields describe the step from x_k (all zero on the final record, where the run
    stopped instead of stepping). gain_ratio is the actual over the
    predicted decrease (NaN when the method did not compute it). negative_eigenvalues
    counts the curvature matrix's eigenvalues below -linalg.negative_tolerance at x_k
    (max(n, log2(rows)) eps max|lambda|; none for a convex objective): saddle-free
    steps and damped Newton steps count them, an undamped Cholesky proves 0; -1 when
    unknown. step_damped: the Newton solve had to raise the damping above the requested
    one to factorise (the matrix was not positive definite). end_point, on the final
    record of a dense-Hessian run (newton, saddle_free): minimum | saddle | maximum | flat,
    the second-order test at the point the run ended on ("" elsewhere), off the objective's
    gauge directions (where the loss is invariant: Objective.project_step), as is that
    record's negative_eigenvalues. cg_iterations,
    cg_residual (||r|| / ||g||), negative_curvature and
    trust_radius (the radius the step was computed in; NaN without a trust region) describe
    the Hessian-free methods' inner solve; gradient_batch_size is the rows of the mini-batch
    whose gradient it used (gradient_fraction < 1; 0: the full gradient). A rejected
    Levenberg-Marquardt or trust-region trial has step_accepted False and the next record
    repeats x_k with larger damping (or a smaller radius; with a mini-batch gradient, the
    gradient of the new batch its step draws).
    """

    iteration: int
    loss: float
    loss_change: float = 0.0
    gradient_norm: float = 0.0
    gradient_max_norm: float = 0.0
    step_norm: float = 0.0
    step_size: float = 0.0
    damping: float = 0.0
    gain_ratio: float = math.nan
    step_accepted: bool = False
    negative_eigenvalues: int = -1
    solver_attempts: int = 0
    function_evaluations: int = 0
    cg_iterations: int = 0
    cg_residual: float = math.nan
    negative_curvature: bool = False
    trust_radius: float = math.nan
    gradient_batch_size: int = 0
    step_damped: bool = False
    end_point: str = ""
    backend: str = ""
    iteration_seconds: float = 0.0
    cumulative_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-friendly apart from NaN)."""
        return asdict(self)


@dataclass
class StepResult:
    """A unary step: the new parameters and the record of the step from the input.

    method is the method that ran (method auto resolved); method_note says why auto chose it.
    """

    params: torch.Tensor
    record: StepRecord
    method: str = ""
    method_note: str = ""


@dataclass
class Checkpoint:
    """Everything needed to continue a run deterministically from record `iteration`."""

    iteration: int
    params: torch.Tensor
    state: dict[str, float] = field(default_factory=dict)
