"""Step computation for each method and step policy, on top of a curvature backend.

A `Stepper` evaluates points (loss, gradient and, for second-order methods, the curvature
matrix) and turns a point into a step. As in optimistix, a method is a descent (how the
direction is found: gradient d = -g, Newton by damped Cholesky, saddle-free Newton |H|,
or truncated CG in hessian_free.py, which never forms the curvature matrix) run under a
search (how far along it and whether to take it: a fixed step, Armijo backtracking,
Nielsen's (1999) Levenberg-Marquardt damping update, or the Steihaug trust region). Each
is one small function in DESCENTS or SEARCHES; options.py says which pairs a method takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .. import cancel
from ..backends import selector as backends
from ..cancel import CancelToken
from ..curvature import autograd as curvature
from ..errors import EvaluationError, ValidationError
from ..linalg import (
    SolveResult,
    all_finite,
    below_rounding,
    gauge_fixed,
    loss_rounding,
    negative_eigenvalues,
    sufficient_decrease,
    vector_norm,
)
from ..objectives.base import Objective
from ..options import (
    DENSE_METHODS,
    HESSIAN_FREE_METHODS,
    MethodOptions,
    check_dtype_range,
    check_method_budget,
    lm_damping_cap,
    lm_damping_expected,
    resolve_method,
)
from . import hessian_free

# a line search longer than a default one (MethodOptions.max_backtracks) may be stopped
# between trials by its call's deadline or its run's cancel
LONG_SEARCH = MethodOptions.max_backtracks

LM_INITIAL_TAU = 1e-3
# a mini-batch line search that fails is a rejected step (the next draws another batch)
# until this many fail in a row
MINIBATCH_SEARCHES = 8
# A dense method's first line-search trial is evaluated whole only up to this many
# parameters: there the curvature matrix costs about what the loss does, so a rejected
# whole trial wastes little; past it the matrix costs ~n losses and the saving is ~1/n.
WHOLE_TRIAL_MAX_PARAMS = 64
# first-order gradients up to this size get their norms from Python floats (one copy out,
# no kernels): measured faster than two torch reductions below about 64 entries on the CPU
PYTHON_NORMS_MAX_PARAMS = 64


class LineSearchFailed(Exception):
    """Armijo backtracking found no acceptable step; `overflowed`: every trial's loss was
    not finite (the learning rate, not the direction, is what failed)."""

    def __init__(self, message: str, overflowed: bool = False) -> None:
        self.overflowed = overflowed
        super().__init__(message)


class RoundingStall(Exception):
    """A line search that failed at machine precision (`_at_rounding`): no step can be
    judged at this precision. `step` is the step not taken (x unchanged)."""

    def __init__(self, evaluations: int, step: Step) -> None:
        self.step = step
        super().__init__(
            "no further progress possible at machine precision: no step satisfied the Armijo "
            f"condition in {evaluations} backtracks, and both the first trial and the last, "
            "tiny one changed the loss, as predicted, within its rounding"
        )


class NoProgress(Exception):
    """No step can lower the loss at this precision. `damping`: the damping a run's last
    record reports (None: the step's own); `refusal()`: a unary step's answer, naming the
    option that got there."""

    damping: float | None = None

    def refusal(self) -> ValidationError:
        raise NotImplementedError


class DampingCap(NoProgress):
    """Levenberg-Marquardt's damping is past its cap (lm_damping_cap)."""

    def __init__(self, damping: float, cap: float) -> None:
        self.damping, self.cap = damping, cap
        super().__init__(
            "no further progress possible at machine precision: the Levenberg-Marquardt "
            f"damping {damping:.3g} (of diag H) is past its cap {cap:.3g} (max(|S^-1 H S^-1|, "
            "1) / eps, S^2 = diag H), where a damped step is below the rounding of the "
            "parameters (any trial would be rejected)"
        )

    def refusal(self) -> ValidationError:
        return ValidationError(
            "options.damping", lm_damping_expected(self.cap), f"{self.damping:.3g}"
        )


class RadiusUnderflow(NoProgress):
    """A trust-region step of exactly 0 from a nonzero gradient: the radius is so small that
    the step underflows, and a rejection only shrinks it further."""

    def __init__(self, radius: float) -> None:
        self.radius = radius
        super().__init__(
            f"no further progress possible at machine precision: the trust radius "
            f"{radius:.3g} gives a step of exactly 0 from a nonzero gradient (any trial would "
            "be rejected, and the radius only shrinks)",
        )

    def refusal(self) -> ValidationError:
        return ValidationError(
            "options.trust_radius",
            "a radius whose step from params is not 0 (it underflowed)",
            f"{self.radius:.3g}",
        )


def marquardt_scale(h: torch.Tensor) -> torch.Tensor:
    """s with s^2 = |diag H| floored at sqrt(eps) x its largest (all 1 when H's diagonal is
    0): Levenberg-Marquardt damps with lambda diag(s^2), each coordinate by its own
    curvature (Marquardt's scaling; the floor keeps D positive where H's diagonal is 0 or
    tiny, as Ceres' min_lm_diagonal does)."""
    d = h.diagonal().abs()
    top = float(d.max()) if d.numel() else 0.0
    if not (top > 0 and math.isfinite(top)):
        return torch.ones_like(d)
    return d.clamp_min(math.sqrt(torch.finfo(h.dtype).eps) * top).sqrt()


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
    _norms: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def grad_norms(self) -> tuple[float, float]:
        """(2-norm, max-norm) of grad, computed once for the record, the stopping test and
        is_finite (the max-norm is finite exactly when every entry is). Cached by hand, not
        by functools.cached_property, whose lock (Python < 3.12) costs microseconds a step.

        A point with a dense curvature matrix takes torch's reductions, as the native fused
        Newton step does, so both paths' records agree bit for bit; a first-order point
        (no matrix: its iteration may take only microseconds) takes them from Python floats
        when it is small."""
        norms = self._norms
        if norms is None:
            g = self.grad
            norms = _torch_norms(g) if self.curvature is not None else _first_order_norms(g)
            self._norms = norms
        return norms

    def is_finite(self) -> bool:
        finite = math.isfinite(self.loss) and math.isfinite(self.grad_norms[1])
        if finite and self.curvature is not None:
            finite = all_finite(self.curvature)
        return finite


def _torch_norms(g: torch.Tensor) -> tuple[float, float]:
    """(2-norm, max-norm) of g from torch reductions (0, 0 when g is empty); the 2-norm
    rescaled where its sum of squares over- or underflows (linalg.vector_norm: a float32
    record said gradient_norm inf for a gradient of 3.6e28, and 0 below max|g| for 3e-32)."""
    if not g.numel():
        return 0.0, 0.0
    return vector_norm(g), torch.linalg.vector_norm(g, math.inf).item()


def _first_order_norms(g: torch.Tensor) -> tuple[float, float]:
    """(2-norm, max-norm) of g, in Python for a small flat CPU tensor: hypot is finite
    exactly when every entry is, and then the max over Python floats is exact; a NaN or inf
    entry goes to torch, whose max-norm propagates it (a Python max may skip a NaN). The
    2-norm is computed in double without overflow (torch's float32 norm rounds to float32
    and overflows to inf past its range); stopping tests use the max-norm, exact either way."""
    if g.numel() <= PYTHON_NORMS_MAX_PARAMS and g.dim() == 1 and g.is_cpu:
        values = g.tolist()
        two = math.hypot(*values)
        if math.isfinite(two):
            return two, max(map(abs, values), default=0.0)
    return _torch_norms(g)


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
    # an accepted step whose length the policy's state held back (a trust-region boundary,
    # a Levenberg-Marquardt damping above the curvature) and then let go (the radius grew,
    # the damping fell), or a mini-batch line search's backtracked step (one batch's
    # direction set its length): small because of that, not because the run stalled, so
    # the stall tests do not judge it (Run._stop_test)
    held_back: bool = False
    # a Hessian-free step from a partial solve of its model (CGResult.partial): short
    # perhaps only because CG stopped early, so a stall is confirmed by a full solve first
    partial_solve: bool = False
    # the loss change its policy took as noise in taking it (a trust-region step at
    # rounding, or one judged by its gradient within sqrt(eps) |f|): Run's flat-step count
    # takes changes within it as no measurable progress
    loss_noise: float = 0.0


class Stepper:
    """Evaluates points and computes steps for one objective and one set of method options.

    Holds the adaptive state (the Levenberg-Marquardt lambda and its growth factor nu) in
    `state`, a dict of floats, so a checkpoint can carry it. Method auto is resolved here
    (by parameter count); `method_note` says what it chose and why.
    """

    def __init__(
        self,
        objective: Objective,
        options: MethodOptions,
        params: torch.Tensor,
        reuse_trials: bool = False,
        cancel_token: CancelToken | None = None,
    ) -> None:
        self.objective = objective
        # a run's cancel, which a long line search checks between trials (a step in flight
        # otherwise completes: the run stops before its next iteration)
        self.cancel_token = cancel_token
        options, self.method_note = resolve_method(options, params.numel(), params.dtype)
        self.options = options
        self.hessian_free = options.method in HESSIAN_FREE_METHODS
        self.second_order = options.method in DENSE_METHODS
        self.first_order = options.method == "gradient_descent"
        self.minibatch = self.hessian_free and options.gradient_fraction < 1.0
        # a run's next point may be its last line-search trial (first-order evaluations,
        # or dense ones small enough that a wasted matrix costs little; a mini-batch run
        # keeps its trial's loss its own way, _last_trial)
        small = params.numel() <= WHOLE_TRIAL_MAX_PARAMS
        self.reuse_trials = reuse_trials and not self.minibatch and (not self.second_order or small)
        self._last_trial: tuple[torch.Tensor, float] | None = None
        self._trial_point: Point | None = None
        check_supported(objective, options)
        check_method_budget(options, params.numel(), params.dtype)  # as StartRun refuses
        check_dtype_range(options, params.dtype)
        self._search, self._descent = SEARCHES[options.step_policy], DESCENTS[options.method]
        if self.hessian_free:
            chosen = backends.resolve(options.backend, objective, params, options.curvature)
            self.backend_label = chosen.products
        elif self.second_order:
            self.backend = backends.resolve(options.backend, objective, params, options.curvature)
            self.backend_label = self.backend.label
        else:
            self.backend_label = "autograd"
        # "whole_trial": 1 while line searches take their first trial (then its whole
        # evaluation is the next point's); in the state so a resumed run decides the same
        self.state: dict[str, float] = {"damping": options.damping, "nu": 2.0, "whole_trial": 1.0}
        if self.hessian_free:
            self.state.update(hessian_free.initial_state(options))

    def evaluate(self, x: torch.Tensor) -> Point:
        """Loss, gradient and (dense second-order methods) the curvature matrix at x.

        With a mini-batch gradient: the full loss from a forward pass alone (reused when x
        is the trial point loss_at just took) and the gradient of the batch the next step
        uses, so no backward pass runs through all rows.
        """
        trial_point, self._trial_point = self._trial_point, None
        if trial_point is not None and trial_point.x is x:
            return trial_point
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
        self.drop_trial()  # a later trial: the first one was rejected
        try:
            loss = float(curvature.loss_value(self.objective, x))
        except EvaluationError:
            loss = math.nan
        if self.minibatch:
            self._last_trial = (x, loss)
        return loss

    def first_trial(self, x: torch.Tensor) -> float:
        """A line search's first trial: while first trials keep being taken, x is evaluated
        whole (the loss from that evaluation) and kept as the next point, so a taken step
        costs one evaluation, not a loss then an evaluation; otherwise the loss alone."""
        if not (self.reuse_trials and self.state["whole_trial"]):
            return self.loss_at(x)
        point = self.whole_trial(x)
        return math.nan if point is None else point.loss

    def gradient_judges(
        self, point: Point, x: torch.Tensor, trial: float, alpha: float, slope: float
    ) -> bool | None:
        """Whether the trial `x` is taken on its gradient's evidence; None when the loss can
        judge it. When the loss cannot (linalg.below_rounding: the change is rounding, and
        the point's loss and the trial's may come from different kernels a few ulps apart),
        it is taken if its gradient max-norm at most halves the point's (a Newton step's
        last, quadratic progress, which the loss no longer shows; a step driven by rounding
        noise in the gradient rarely halves it, so such steps cannot wander on). Never with
        a mini-batch gradient, whose norms are a batch's: the loss judges."""
        if self.minibatch or not below_rounding(trial, point.loss, alpha, slope, point.x.dtype):
            return None
        if self.first_order and torch.equal(x, point.x):
            return None  # the step is below x's rounding: no gradient can judge it
        return self.gradient_shows_progress(point, x, trapezoid=self.first_order)

    def gradient_shows_progress(self, point: Point, x: torch.Tensor, trapezoid: bool) -> bool:
        """The trial `x` evaluated whole: its gradient max-norm at most halves the point's,
        or (`trapezoid`) _gradients_show_decrease; False where it cannot be evaluated."""
        taken = self.whole_trial(x)
        if taken is None:
            return False
        if taken.grad_norms[1] <= 0.5 * point.grad_norms[1]:
            return True
        return trapezoid and _gradients_show_decrease(point, taken, self.options.armijo)

    def whole_trial(self, x: torch.Tensor) -> Point | None:
        """The trial `x` evaluated whole (its first evaluation when it was one, else now: at
        machine precision only), kept as the step's next point; None where the objective
        cannot evaluate it."""
        kept = self._trial_point
        if kept is None or kept.x is not x:
            try:
                kept = self.evaluate(x)
            except EvaluationError:
                return None
            self._trial_point = kept
        return kept

    def drop_trial(self) -> None:
        """Let a rejected whole trial (and its curvature matrix) go."""
        self._trial_point = None

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

    def step(self, point: Point) -> Step:
        """The step from `point`: the method's descent under the step policy's search
        (LineSearchFailed, NoProgress)."""
        return self._search(self, point, self._descent)


@dataclass
class Direction:
    """What a descent found: the direction d = scale x vector (gradient descent's -g is never
    materialised: its steps fold the sign into the step length), its norm, and the solve
    facts a record carries."""

    vector: torch.Tensor
    norm: float
    damping: float
    negative_eigenvalues: int
    solver_attempts: int
    damped: bool = False
    cg: hessian_free.CGResult | None = None
    scale: float = 1.0

    @property
    def direction(self) -> torch.Tensor:
        """d itself."""
        return self.vector if self.scale == 1.0 else self.scale * self.vector

    def advance(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """x + alpha d in one torch.add (fused, one rounding per entry, where ATen's CPU
        kernels have FMA; the same op as the native fused step's x.add(d, lr))."""
        return torch.add(x, self.vector, alpha=alpha * self.scale)


# A descent: how the direction is found from a point (`damping`: the lambda the search asks
# the dense Newton solve for). A search: how far along it, and whether the step is taken.
Descent = Callable[[Stepper, Point, float], Direction]
Search = Callable[[Stepper, Point, Descent], Step]


def _gradient(stepper: Stepper, point: Point, damping: float) -> Direction:
    """d = -g (its norm is the gradient's, known; only dense solves are gauge-projected)."""
    return Direction(point.grad, point.grad_norms[0], 0.0, -1, 0, scale=-1.0)


def _dense(stepper: Stepper, point: Point, res: SolveResult) -> Direction:
    d = stepper.objective.project_step(res.direction)
    norm = vector_norm(d)
    return Direction(d, norm, res.damping, res.negative_eigenvalues, res.attempts, res.damped)


def _newton(stepper: Stepper, point: Point, damping: float) -> Direction:
    """The damped Cholesky solve of (H + lambda I) d = -g, lambda >= `damping`, H's gauge
    directions filled in first (linalg.gauge_fixed) so they need no damping."""
    h, objective = point.curvature, stepper.objective
    fixed = gauge_fixed(h, objective.project_step) if objective.has_gauge else h
    return _dense(stepper, point, _newton_solve(stepper, fixed, point.grad, damping, h))


def _newton_solve(
    stepper: Stepper,
    h: torch.Tensor,
    g: torch.Tensor,
    damping: float,
    inertia_of: torch.Tensor | None = None,
) -> SolveResult:
    """Solve (H + lambda I) d = -g, lambda >= `damping`.

    A solve that had to raise the damping to factorise counts the negative eigenvalues of
    `inertia_of` (default H; Levenberg-Marquardt passes the unscaled H of its scaled
    system), here, so every backend reports the same; an undamped one proved there are none.
    """
    res = stepper.backend.solver.solve(h, g, damping)
    if res.damping > damping:
        objective = stepper.objective
        counted = h if inertia_of is None else inertia_of
        negative = 0 if objective.convex else negative_eigenvalues(counted, objective.num_rows)
        res = replace(res, negative_eigenvalues=negative, damped=True)
    elif damping == 0:
        res = replace(res, negative_eigenvalues=0)
    return res


def _saddle_free(stepper: Stepper, point: Point, damping: float) -> Direction:
    """d = -|H|^-1 g, counting H's negative eigenvalues (none for a convex objective: there
    any is rounding)."""
    objective, floor = stepper.objective, stepper.options.eigenvalue_floor
    if floor is None:
        floor = torch.finfo(point.curvature.dtype).eps
    solver = stepper.backend.solver
    res = solver.saddle_free(point.curvature, point.grad, floor, objective.num_rows)
    if objective.convex:
        res = replace(res, negative_eigenvalues=0)
    return _dense(stepper, point, res)


def _conjugate_gradient(stepper: Stepper, point: Point, damping: float) -> Direction:
    """Truncated CG on curvature-vector products (the state's Martens lambda damps it)."""
    lam = stepper.state["damping"]
    cg = hessian_free.cg_direction(
        stepper.objective, point.x, point.grad, stepper.options, stepper.state, drawn=point.sample
    )
    return Direction(cg.direction, vector_norm(cg.direction), lam, -1, 1, cg=cg)


DESCENTS: dict[str, Descent] = {
    "gradient_descent": _gradient,
    "newton": _newton,
    "saddle_free": _saddle_free,
    "newton_cg": _conjugate_gradient,
    "gauss_newton_cg": _conjugate_gradient,
}


def _taken(
    point: Point,
    found: Direction,
    alpha: float,
    evaluations: int,
    x_new: torch.Tensor | None = None,
) -> Step:
    """The step x + alpha d (`x_new` when the search has it), always accepted (fixed step or
    a satisfied line search)."""
    cg = found.cg
    return Step(
        x_new=found.advance(point.x, alpha) if x_new is None else x_new,
        step_norm=alpha * found.norm,
        step_size=alpha,
        damping=found.damping,
        gain_ratio=math.nan,
        accepted=True,
        negative_eigenvalues=found.negative_eigenvalues,
        solver_attempts=found.solver_attempts,
        function_evaluations=evaluations,
        cg_iterations=cg.iterations if cg else 0,
        cg_residual=cg.residual if cg else math.nan,
        negative_curvature=cg.negative_curvature if cg else False,
        gradient_batch_size=cg.gradient_batch_size if cg else 0,
        step_damped=found.damped,
        partial_solve=cg.partial if cg else False,
    )


def _fixed(stepper: Stepper, point: Point, descent: Descent) -> Step:
    """x + lr d, whatever the loss does."""
    found = descent(stepper, point, stepper.options.damping)
    return _taken(point, found, stepper.options.learning_rate, 0)


def _line_search(stepper: Stepper, point: Point, descent: Descent) -> Step:
    """Armijo backtracking from lr (with a mini-batch gradient the slope is g.d for the
    point's batch gradient, the one CG used; the losses compared are the full ones). At
    machine precision, where the loss cannot judge the first trial (gradient descent: any
    trial), its gradient does (Stepper.gradient_judges). A search past the default number
    of trials checks the call's deadline and the run's cancel between trials (a step in
    flight otherwise completes)."""
    opts = stepper.options
    found = descent(stepper, point, opts.damping)
    alpha, evaluations = opts.learning_rate, 0
    slope = found.scale * float(point.grad @ found.vector)
    first = trial = math.nan
    finite_trials = 0
    tried = alpha  # the last trial's step
    taken = False
    for _ in range(opts.max_backtracks):
        if evaluations >= LONG_SEARCH:  # past a default search: a deadline or cancel stops it
            where = f"after {evaluations} line-search trials"
            cancel.check(where)  # a unary step's deadline (the call's token in scope)
            if stepper.cancel_token is not None:
                stepper.cancel_token.check(where)
        x = found.advance(point.x, alpha)
        trial = stepper.first_trial(x) if not evaluations else stepper.loss_at(x)
        evaluations += 1
        finite_trials += math.isfinite(trial)
        decreased = sufficient_decrease(trial, point.loss, alpha, slope, opts.armijo)
        if decreased and stepper.minibatch and torch.equal(x, point.x):
            decreased = False  # no step, which Armijo's test passed once its term rounded away
        if stepper.first_order:
            # gradient descent's every trial the loss cannot judge goes to the gradient:
            # Armijo's test there passes a trial equal to the loss once its decrease term
            # rounds away
            judged = stepper.gradient_judges(point, x, trial, alpha, slope)
            taken = decreased if judged is None else judged
        else:
            taken = decreased or bool(
                (evaluations == 1 or alpha == 1.0)
                and stepper.gradient_judges(point, x, trial, alpha, slope)
            )
        if taken:
            break
        if evaluations == 1:
            first = trial
        tried, alpha = alpha, alpha * opts.backtrack
        if alpha < 1.0 < tried and not stepper.first_order:
            alpha = 1.0  # the second-order step's own length, from a first trial past it
    if not taken:
        stepper.drop_trial()
        failed = stepper.state.get("failed_searches", 0.0) + 1
        if stepper.minibatch and failed < MINIBATCH_SEARCHES:
            # one batch's direction need not lower the full loss: the next step draws
            # another (a run ended "line_search_failed" 0.1-10% above its minimum), solved to
            # cg_tolerance where this one was a partial solve
            stepper.state["failed_searches"] = failed
            if found.cg is not None and found.cg.partial:
                stepper.state["cg_tight"] = 1.0
            return _not_taken(point, found, evaluations)
        if _at_rounding(point, (first, trial), tried, slope, opts.learning_rate):
            raise RoundingStall(evaluations, _not_taken(point, found, evaluations))
        if not finite_trials:
            raise LineSearchFailed(
                f"every one of {evaluations} line-search trials, from learning_rate "
                f"{opts.learning_rate:.4g} down to {tried:.4g}, reached a "
                "non-finite loss: a smaller learning_rate",
                overflowed=True,
            )
        batches = f" (along each of the last {MINIBATCH_SEARCHES} mini-batches' directions)"
        raise LineSearchFailed(
            f"no step satisfied the Armijo condition in {evaluations} backtracks"
            + (batches if stepper.minibatch else "")
        )
    if alpha > 1.0 and not stepper.first_order:
        # a second-order step past its own length that Armijo took (any alpha below about
        # 2 passes on a quadratic): the full step 1 where it does at least as well, else the
        # run is linear near the minimum (lr 1.5: a least squares stalled at max|g| 6e-3)
        full = found.advance(point.x, 1.0)
        at_full = stepper.loss_at(full)
        evaluations += 1
        if at_full <= trial + loss_rounding(trial, point.x.dtype):
            alpha, x = 1.0, full
    stepper.state["whole_trial"] = float(evaluations == 1)
    step = _taken(point, found, alpha, evaluations, x)
    if stepper.minibatch:
        stepper.state["failed_searches"] = 0.0
        # a backtracked step's length is its batch direction's, no stall of the run (a
        # step of 1e-12 on one batch was called "parameters_stalled" far from the minimum)
        step.held_back = alpha < opts.learning_rate
    return step


def _not_taken(point: Point, found: Direction, evaluations: int) -> Step:
    """A line search's step that was not taken: x stays, after `evaluations` trials."""
    step = _taken(point, found, 0.0, evaluations, point.x)
    step.accepted = False
    return step


def _gradients_show_decrease(point: Point, trial: Point, armijo: float) -> bool:
    """A first-order step's evidence where the loss cannot judge it (its change is far below
    the loss's rounding long before the gradient's): Armijo's test on the trapezoid estimate
    of the change, (g + g_trial) . dx / 2 (exact on a quadratic), with the gradient's 2-norm
    falling (so steps driven by its rounding noise cannot wander on)."""
    dx = trial.x - point.x
    linear = float(point.grad @ dx)
    change = 0.5 * (linear + float(trial.grad @ dx))
    return linear < 0 and change <= armijo * linear and trial.grad_norms[0] < point.grad_norms[0]


def _at_rounding(
    point: Point, trials: tuple[float, float], alpha: float, slope: float, lr: float
) -> bool:
    """Whether an exhausted line search failed at machine precision: along a descent
    direction, its first trial (at lr) and its last (at `alpha`, tiny: <= sqrt(eps) lr,
    where a smooth loss must pass Armijo's test) each changed the loss, and predicted a
    change, within its rounding (absolute near 0, 16 eps max(|loss|, 1): a loss whose
    terms cancel, Rosenbrock's near its minimum, is not computed to its own precision).
    A first trial that predicted or made a real change (a wrong or mini-batch slope, an
    uphill step), or a search that gave up after a few long trials, failed."""
    dtype, (first, last) = point.x.dtype, trials
    if not (slope < 0 and alpha <= math.sqrt(torch.finfo(dtype).eps) * lr):
        return False
    return all(
        below_rounding(trial, point.loss, step, slope, dtype, floor=1.0)
        for trial, step in ((first, lr), (last, alpha))
    )


def _levenberg_marquardt(stepper: Stepper, point: Point, descent: Descent) -> Step:
    """Nielsen's (1999) damping update on Marquardt's scaling: the full step of
    (H + lambda D) d = -g, D = diag(H) (marquardt_scale), accepted when the gain ratio is
    positive; lambda shrinks after a good step and grows (x nu) after a bad one. Damping
    each coordinate by its own curvature, as MINPACK and Ceres do, moves parameters of
    very different units alike: lambda I held a parameter of size 1e6 to steps of 1e-3
    while a stiff one set the damping, until the parameter test called it a stall. The
    search owns its descent (Newton's system; only method newton takes it).

    At machine precision, where the loss cannot judge the step (its actual and predicted
    changes are rounding), its gradient does, as in the line search (Stepper.gradient_judges),
    whatever the sign of the gain ratio (there it is noise: the native backend's loss and the
    trial's may differ by ulps, and a ratio kept positive by that noise would shrink the
    damping for ever): the step is taken when its gradient max-norm at most halves, with the
    gain ratio taken as 1 (the model is trusted, as the trust region does); otherwise it is
    rejected and the damping grows towards its cap (DampingCap). A damping of at least 1
    that has not yet fallen below 1 (one the caller started with) holds steps back far
    from any minimum: there a trial the loss cannot judge is taken (gain ratio 1, so the
    damping falls) whatever its gradient shows (a start at damping 1e15, 0.2 of the cap,
    was rejected at once, grew to the cap and stopped "no progress" at 1,300x the minimum;
    in float32 at 4e6 the gradient did not change at all). A rejection grows the damping from
    at least eps (below it the damping changes no float) and at most to the cap, which is
    tried before the run gives up (nu doubling from 1e-300 in float32 jumped from no effect
    to 7,000x the cap in one rejection)."""
    state, h, g = stepper.state, point.curvature, point.grad
    # (S^-1 H S^-1 + lambda I) S d = -S^-1 g, S = diag(scale): H + lambda diag H, one solve
    scale = marquardt_scale(h)
    scaled = h / torch.outer(scale, scale)
    if state["damping"] <= 0:
        state["damping"] = LM_INITIAL_TAU
    # the scaled matrix's norm: an indefinite H's off-diagonal may pass its unit diagonal
    norm = float(scaled.abs().sum(dim=1).max()) if g.numel() else 1.0
    lam, cap = state["damping"], lm_damping_cap(h.dtype, norm)
    if not math.isfinite(lam) or lam > cap:
        raise DampingCap(lam, cap)
    if lam < 1.0:
        state["lm_let_go"] = 1.0
    res = _newton_solve(stepper, scaled, g / scale, lam, inertia_of=h)
    found = _dense(stepper, point, replace(res, direction=res.direction / scale))
    d = found.direction
    predicted = -float(g @ d + 0.5 * (d @ (h @ d)))
    x_new = point.x + d
    trial = stepper.loss_at(x_new)
    rho = (point.loss - trial) / predicted if predicted > 0 else -math.inf
    judged = stepper.gradient_judges(point, x_new, trial, 1.0, float(g @ d))
    if judged is False and lam >= 1.0 and not state.get("lm_let_go", 0.0):
        judged = True  # too small to show a change under a cautious start, not a bad step
    if judged is None:  # a trial at -inf: unbounded below (taken: the run stops NON_FINITE)
        accepted = (math.isfinite(trial) and rho > 0) or trial == -math.inf
    else:
        accepted = judged
        rho = 1.0 if judged else rho
    lam = found.damping
    if accepted:
        # (rho past 1 gives 1/3 too: min keeps a huge finite rho from overflowing the cube)
        state["damping"] = lam * max(1.0 / 3.0, 1.0 - (2.0 * min(rho, 1.0) - 1.0) ** 3)
        state["nu"] = 2.0
    else:
        grown = max(lam, torch.finfo(h.dtype).eps) * state["nu"]
        state["damping"] = grown if lam >= cap else min(grown, cap)  # the cap tried once
        state["nu"] *= 2.0
        stepper.drop_trial()  # a whole trial the gradient judged: its curvature goes
    # damping >= 1 outweighs the scaled curvature (diag 1): the step is held back by it
    held_back = accepted and lam >= 1.0 and state["damping"] < lam
    return Step(
        x_new=x_new,
        step_norm=vector_norm(d),
        step_size=1.0,
        damping=lam,
        gain_ratio=rho if math.isfinite(rho) else math.nan,
        accepted=accepted,
        negative_eigenvalues=found.negative_eigenvalues,
        solver_attempts=found.solver_attempts,
        function_evaluations=1,
        step_damped=found.damped,
        held_back=held_back,
    )


def _trust_region(stepper: Stepper, point: Point, descent: Descent) -> Step:
    """Steihaug-Toint: CG stops at the radius; the gain ratio moves radius and lambda."""

    def judge(x_new: torch.Tensor, trapezoid: bool) -> bool | None:
        """The trial's gradient evidence where its loss cannot tell, as the line search's at
        machine precision (`trapezoid`: the trapezoid test too); None with a mini-batch
        gradient."""
        if stepper.minibatch:
            return None
        return stepper.gradient_shows_progress(point, x_new, trapezoid=trapezoid)

    tr = hessian_free.newton_cg(
        stepper.objective,
        point.x,
        point.loss,
        point.grad,
        stepper.options,
        stepper.state,
        stepper.loss_at,
        point.sample,
        judge,
    )
    cg = tr.cg
    step_norm = vector_norm(cg.direction)
    if not tr.accepted and step_norm == 0 and point.grad_norms[1] > 0:
        raise RadiusUnderflow(tr.trust_radius)
    return Step(
        x_new=tr.x_new,
        step_norm=step_norm,
        step_size=1.0,
        damping=tr.damping,
        gain_ratio=tr.gain_ratio,
        accepted=tr.accepted,
        negative_eigenvalues=-1,
        solver_attempts=1,
        function_evaluations=1,
        cg_iterations=cg.iterations,
        cg_residual=cg.residual,
        negative_curvature=cg.negative_curvature,
        trust_radius=tr.trust_radius,
        gradient_batch_size=cg.gradient_batch_size,
        held_back=tr.accepted and cg.on_boundary and tr.let_go,
        partial_solve=cg.partial,
        loss_noise=tr.loss_noise,
    )


SEARCHES: dict[str, Search] = {
    "fixed": _fixed,
    "line_search": _line_search,
    "levenberg_marquardt": _levenberg_marquardt,
    "trust_region": _trust_region,
}
