"""Step computation for each method and step policy, on top of a curvature backend.

A `Stepper` evaluates points (loss, gradient and, for second-order methods, the curvature
matrix) and turns a point into a step: gradient descent (d = -g), Newton (damped
Cholesky), saddle-free Newton (|H|), each with a fixed step, Armijo backtracking, or for
Newton the Levenberg-Marquardt damping update of Nielsen (1999). The Hessian-free methods
(newton_cg, gauss_newton_cg) take their direction from truncated CG in hessian_free.py and
never form the curvature matrix.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from . import backends, curvature, hessian_free, native_products
from .errors import EvaluationError
from .linalg import SolveResult, negative_eigenvalues
from .objectives.base import Objective
from .options import HESSIAN_FREE_METHODS, MethodOptions, resolve_method

LM_INITIAL_TAU = 1e-3


class LineSearchFailed(Exception):
    """Armijo backtracking found no acceptable step."""


class NoProgress(Exception):
    """No step can lower the loss at this precision (Levenberg-Marquardt's damping cap)."""


def lm_damping_cap(h: torch.Tensor) -> float:
    """The largest Levenberg-Marquardt lambda: max(max|diag H|, 1) / eps(dtype).

    Beyond it H + lambda I is lambda I in floating point and the step, g / lambda, is
    below the rounding of x: more damping cannot produce a different trial.
    """
    scale = float(h.diagonal().abs().max()) if h.numel() else 1.0
    return max(scale, 1.0) / torch.finfo(h.dtype).eps


def check_supported(objective: Objective, options: MethodOptions) -> None:
    """Refuse, naming the field, method options `objective` cannot serve.

    The checks every entry runs before any work: NewtonStep (through Stepper), StartRun
    and ResumeRun. `options` are validated, with method auto resolved.
    """
    field = "options.method" if options.method == "gauss_newton_cg" else "options.curvature"
    objective.require_curvature(options.curvature, field)
    if options.method in HESSIAN_FREE_METHODS:
        hessian_free.check_supported(objective, options)


@dataclass
class Point:
    """An evaluated iterate.

    With a Hessian-free mini-batch gradient (gradient_fraction < 1) grad is that batch's
    gradient (`sample`, which the step from this point uses) and loss the full-data loss.
    """

    x: torch.Tensor
    loss: float
    grad: torch.Tensor
    curvature: torch.Tensor | None = None
    sample: hessian_free.GradientSample | None = None

    @functools.cached_property
    def grad_norms(self) -> tuple[float, float]:
        """(2-norm, max-norm) of grad, computed once for the record, the stopping test and
        is_finite (the max-norm is finite exactly when every entry is)."""
        if not self.grad.numel():
            return 0.0, 0.0
        g = self.grad
        return torch.linalg.vector_norm(g).item(), torch.linalg.vector_norm(g, math.inf).item()

    def is_finite(self) -> bool:
        finite = math.isfinite(self.loss) and math.isfinite(self.grad_norms[1])
        if finite and self.curvature is not None:
            finite = bool(torch.isfinite(self.curvature).all())
        return finite


@dataclass
class Step:
    """A step proposed (and possibly accepted) from a point."""

    x_new: torch.Tensor
    step_norm: float
    step_size: float
    damping: float
    gain_ratio: float
    accepted: bool
    negative_eigenvalues: int
    solver_attempts: int
    function_evaluations: int
    cg_iterations: int = 0
    cg_residual: float = math.nan
    negative_curvature: bool = False
    trust_radius: float = math.nan
    gradient_batch_size: int = 0
    step_damped: bool = False


class Stepper:
    """Evaluates points and computes steps for one objective and one set of method options.

    Holds the adaptive state (the Levenberg-Marquardt lambda and its growth factor nu) in
    `state`, a dict of floats, so a checkpoint can carry it. Method auto is resolved here
    (by parameter count); `method_note` says what it chose and why.
    """

    def __init__(self, objective: Objective, options: MethodOptions, params: torch.Tensor) -> None:
        self.objective = objective
        options, self.method_note = resolve_method(options, params.numel(), params.dtype)
        self.options = options
        self.hessian_free = options.method in HESSIAN_FREE_METHODS
        self.second_order = options.method != "gradient_descent" and not self.hessian_free
        self.minibatch = self.hessian_free and options.gradient_fraction < 1.0
        self._last_trial: tuple[torch.Tensor, float] | None = None
        check_supported(objective, options)
        if self.hessian_free:
            self.backend_label = native_products.select_backend(
                objective, params, options.backend, options.curvature
            )
        elif self.second_order:
            self.backend = backends.resolve(options.backend, objective, params, options.curvature)
            self.backend_label = self.backend.label
        else:
            self.backend_label = "autograd"
        self.state: dict[str, float] = {"damping": options.damping, "nu": 2.0}
        if self.hessian_free:
            self.state.update(hessian_free.initial_state(options))

    def evaluate(self, x: torch.Tensor) -> Point:
        """Loss, gradient and (dense second-order methods) the curvature matrix at x.

        With a mini-batch gradient: the full loss from a forward pass alone (reused when x
        is the trial point loss_at just took) and the gradient of the batch the next step
        uses, so no backward pass runs through all rows.
        """
        if self.minibatch:
            trial = self._last_trial
            loss = trial[1] if trial is not None and trial[0] is x else self.loss_at(x)
            sample = hessian_free.batch_gradient(self.objective, x, self.options, self.state)
            return Point(x, loss, sample.grad, sample=sample)
        if not self.second_order:
            loss, grad = curvature.loss_and_grad(self.objective, x)
            return Point(x, float(loss), grad)
        loss, grad, h = self.backend.system.newton_system(
            self.objective, x, self.options.curvature, self.options.dense_budget_bytes
        )
        return Point(x, float(loss), grad, h)

    def loss_at(self, x: torch.Tensor) -> float:
        """The loss alone (line-search and Levenberg-Marquardt trials); NaN, a rejected trial,
        where the objective raises (an exported program indexing out of range there)."""
        try:
            loss = float(curvature.loss_value(self.objective, x))
        except EvaluationError:
            loss = math.nan
        if self.minibatch:
            self._last_trial = (x, loss)
        return loss

    def revisit(self, point: Point) -> Point:
        """`point` for the step after a rejected one from it.

        With a mini-batch gradient that step draws a new batch: the point then carries that
        batch's gradient (the loss is kept), so its record and the stopping test describe
        the gradient the step uses. Otherwise the point itself.
        """
        if point.sample is None or point.sample.draw == int(self.state["gradient_draws"]):
            return point
        sample = hessian_free.batch_gradient(self.objective, point.x, self.options, self.state)
        return Point(point.x, point.loss, sample.grad, sample=sample)

    def _direction(self, point: Point) -> SolveResult:
        """The direction from `point`; a dense one without its gauge component.

        A Newton solve that had to raise the damping to factorise counts the matrix's
        negative eigenvalues (here, so every backend reports the same); an undamped one
        proved there are none.
        """
        opts = self.options
        if opts.method == "gradient_descent":
            return SolveResult(-point.grad, 0.0, 0)
        solver = self.backend.solver
        h = point.curvature
        if opts.method == "saddle_free":
            res = solver.saddle_free(h, point.grad, opts.eigenvalue_floor)
        else:
            requested = opts.damping
            if opts.step_policy == "levenberg_marquardt":
                if self.state["damping"] <= 0:
                    scale = float(h.diagonal().abs().max()) if point.grad.numel() else 1.0
                    self.state["damping"] = LM_INITIAL_TAU * max(scale, 1e-12)
                lam = self.state["damping"]
                if not math.isfinite(lam) or lam > lm_damping_cap(h):
                    raise NoProgress(
                        "no further progress possible at machine precision: every "
                        "Levenberg-Marquardt trial was rejected until the damping "
                        f"{lam:.3g} passed max(max|diag H|, 1) / eps "
                        f"= {lm_damping_cap(h):.3g}"
                    )
                requested = lam
            res = solver.solve(h, point.grad, requested)
            if res.damping > requested:
                res = replace(res, negative_eigenvalues=negative_eigenvalues(h), damped=True)
            elif requested == 0:
                res = replace(res, negative_eigenvalues=0)
        return replace(res, direction=self.objective.project_step(res.direction))

    def step(self, point: Point) -> Step:
        """The step from `point` under the configured policy (LineSearchFailed, NoProgress)."""
        if self.hessian_free:
            return self._hessian_free_step(point)
        res = self._direction(point)
        d = res.direction
        if self.options.step_policy == "levenberg_marquardt":
            return self._levenberg_marquardt(point, res)
        alpha, evaluations = self._step_length(point, d)
        gradient_descent = self.options.method == "gradient_descent"  # d = -g: |d| is known
        d_norm = point.grad_norms[0] if gradient_descent else torch.linalg.vector_norm(d).item()
        return Step(
            x_new=point.x + alpha * d,
            step_norm=alpha * d_norm,
            step_size=alpha,
            damping=res.damping,
            gain_ratio=math.nan,
            accepted=True,
            negative_eigenvalues=res.negative_eigenvalues,
            solver_attempts=res.attempts,
            function_evaluations=evaluations,
            step_damped=res.damped,
        )

    def _step_length(self, point: Point, d: torch.Tensor) -> tuple[float, int]:
        """The fixed step size, or Armijo backtracking from it; and the loss evaluations used."""
        policy = self.options.step_policy
        alpha = self.options.learning_rate
        evaluations = 0
        if policy == "line_search":
            slope = float(point.grad @ d)
            c1, shrink = self.options.armijo, self.options.backtrack
            for _ in range(self.options.max_backtracks):
                trial = self.loss_at(point.x + alpha * d)
                evaluations += 1
                if math.isfinite(trial) and trial <= point.loss + c1 * alpha * slope:
                    break
                alpha *= shrink
            else:
                raise LineSearchFailed(
                    f"no step satisfied the Armijo condition in {evaluations} backtracks"
                )
        return alpha, evaluations

    def _hessian_free_step(self, point: Point) -> Step:
        """A Newton-CG step: Steihaug trust region, or the CG direction with fixed/line search.

        With a mini-batch gradient the line search's Armijo slope is g.d for the point's
        batch gradient g (the one CG used); the losses it compares are the full ones.
        """
        opts, state = self.options, self.state
        if opts.step_policy == "trust_region":
            tr = hessian_free.newton_cg(
                self.objective,
                point.x,
                point.loss,
                point.grad,
                opts,
                state,
                self.loss_at,
                point.sample,
            )
            cg, alpha, evaluations = tr.cg, 1.0, 1
            x_new, damping, rho, accepted = tr.x_new, tr.damping, tr.gain_ratio, tr.accepted
            radius = tr.trust_radius
        else:
            damping = state["damping"]
            cg = hessian_free.cg_direction(
                self.objective, point.x, point.grad, opts, state, drawn=point.sample
            )
            alpha, evaluations = self._step_length(point, cg.direction)
            x_new, rho, accepted = point.x + alpha * cg.direction, math.nan, True
            radius = math.nan
        return Step(
            x_new=x_new,
            step_norm=alpha * float(cg.direction.norm()),
            step_size=alpha,
            damping=damping,
            gain_ratio=rho,
            accepted=accepted,
            negative_eigenvalues=-1,
            solver_attempts=1,
            function_evaluations=evaluations,
            cg_iterations=cg.iterations,
            cg_residual=cg.residual,
            negative_curvature=cg.negative_curvature,
            trust_radius=radius,
            gradient_batch_size=cg.gradient_batch_size,
        )

    def _levenberg_marquardt(self, point: Point, res: SolveResult) -> Step:
        d, h, g = res.direction, point.curvature, point.grad
        predicted = -float(g @ d + 0.5 * (d @ (h @ d)))
        x_new = point.x + d
        trial = self.loss_at(x_new)
        actual = point.loss - trial
        rho = actual / predicted if predicted > 0 else -math.inf
        accepted = math.isfinite(trial) and rho > 0
        lam = res.damping
        if accepted:
            self.state["damping"] = lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            self.state["nu"] = 2.0
        else:
            self.state["damping"] = lam * self.state["nu"]
            self.state["nu"] *= 2.0
        return Step(
            x_new=x_new,
            step_norm=float(d.norm()),
            step_size=1.0,
            damping=lam,
            gain_ratio=rho if math.isfinite(rho) else math.nan,
            accepted=accepted,
            negative_eigenvalues=res.negative_eigenvalues,
            solver_attempts=res.attempts,
            function_evaluations=1,
            step_damped=res.damped,
        )
