"""Hessian-free Newton: truncated CG on curvature-vector products, never a dense n x n matrix.

`newton_cg` solves (B + lambda I) d = -g with B the Hessian (Hessian-vector products,
torch.func or a retained autograd graph) and `gauss_newton_cg` with B the generalised
Gauss-Newton matrix J^T H_out J + H_reg (products through J v, an output-space Hessian
product and a vjp). No product uses forward-mode AD, whose state torch keeps
process-global (see curvature/autograd.py): J v is a double vjp. The inner solver is Steihaug-Toint
CG: it stops at the trust-region boundary, on negative curvature (following that
direction, a descent direction for the model), or when the residual meets the
Eisenstat-Walker forcing term. The trust radius follows the gain ratio rho (Nocedal &
Wright, Alg. 4.1) and lambda follows Martens' (2010) Levenberg-Marquardt rule. Curvature
products may use a seeded random sub-sample of the data rows (`curvature_fraction`), as
Martens' Hessian-free does, and the gradient a mini-batch (`gradient_fraction`, drawn
afresh each step; the curvature sample is then drawn from within that batch, as Martens
does, so that CG minimises one mini-batch's model). The gain ratio always compares against
the full-data loss, so an accepted step decreases the objective the run reports; that loss
is a forward pass alone, so with a mini-batch no pass of a step runs backward through all
rows. Under backend auto/native the objectives backends/native/products.py covers take its
closed-form native products instead (same rows, same matrix).
Memory is O(n) plus one forward/backward graph: a handful of n-vectors in CG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import cancel
from ..backends.selector import curvature_products
from ..curvature.autograd import Product, loss_and_grad, loss_value
from ..errors import EvaluationError, ValidationError
from ..linalg import below_rounding, loss_rounding, vector_norm
from ..objectives.base import Objective
from ..options import MethodOptions

ETA_MAX = 0.5  # the largest forcing term (Eisenstat & Walker 1996, choice 2 safeguards)
EW_GAMMA = 0.9
EW_ALPHA = 2.0
MAX_TRUST_RADIUS = 1e10
ACCEPT_RATIO = 0.0  # accept a step when rho > this
SHRINK_RATIO = 0.25  # rho below: shrink the radius, raise lambda
GROW_RATIO = 0.75  # rho above: grow the radius (if the step hit it), lower lambda
MARTENS_DECREASE = 2.0 / 3.0
MARTENS_INCREASE = 1.5


def curvature_objective(
    objective: Objective, fraction: float, generator: torch.Generator | None
) -> Objective:
    """The objective the curvature products use: all rows, or a random `fraction` of them."""
    if fraction >= 1.0:
        return objective
    if not objective.row_fields:
        raise _no_rows(objective, "curvature_fraction", fraction)
    rows = objective.num_rows
    keep = max(1, round(fraction * rows))
    picked = torch.randperm(rows, generator=generator)[:keep].sort().values
    return objective.subsample(picked.to(objective.device))


@dataclass(frozen=True)
class CGResult:
    """A truncated-CG direction and how the inner solve ended.

    residual is ||b - A d|| / ||g|| for A = B + lambda I (exact for the returned d, tracked
    by the recurrence). predicted_decrease is -(g.d + d.B d / 2) under the undamped model.
    gradient_batch_size: the rows of the mini-batch g came from (0: g is the full gradient);
    batch that mini-batch (None: the full gradient).
    partial: CG met a forcing tolerance looser than cg_tolerance, inside the radius along
    positive curvature: a partial solve of the model, whose length says nothing about the
    model's minimiser (a badly scaled problem's first CG iteration moves along its stiff
    direction only).
    """

    direction: torch.Tensor
    iterations: int
    residual: float
    negative_curvature: bool
    on_boundary: bool
    predicted_decrease: float
    gradient_batch_size: int = 0
    partial: bool = False
    batch: GradientSample | None = None


def _to_boundary(d: torch.Tensor, p: torch.Tensor, radius: float) -> float:
    """The tau >= 0 with ||d + tau p|| = radius (d inside the ball), solved for the unit
    vector along p with d in units of the radius: radius^2 overflowed past 1e154, and a
    trust_radius of 1e200 gave an infinite step. In float64 whatever the dtype (a float32
    radius below 7e-46 rounds to 0, and d / 0 to NaN)."""
    length = vector_norm(p)
    unit, inside = p.double() / length, d.double() / radius
    along = float(inside @ unit)
    disc = max(along * along + 1.0 - float(inside @ inside), 0.0)
    return radius * (math.sqrt(disc) - along) / length


def steihaug_cg(
    product: Product,
    grad: torch.Tensor,
    *,
    damping: float = 0.0,
    radius: float = math.inf,
    tolerance: float = 1e-6,
    max_iterations: int = 100,
) -> CGResult:
    """Steihaug-Toint CG on (B + damping I) d = -grad inside ||d|| <= radius.

    Stops when ||r|| <= tolerance ||grad||, at the boundary, after max_iterations, or on
    direction p with p.A p <= 0: then it moves along p (a descent direction for the model,
    since r.p > 0) to the boundary, or with no boundary by rr / |p.A p| (where p.A p is 0,
    no curvature to size the move, the first iteration's d is -grad, a later one's stays).
    A tolerance below the dtype's eps is taken as eps: past it the residual is rounding
    noise, and steps rr / p.A p along it blew a float32 solve (cg_tolerance 1e-10) up to
    1e6 times the Newton step.

    The solve runs on grad scaled by a power of two to unit size, since the products of a
    small gradient underflowed (a float32 problem of scale 1e-20 had p.A p round to 0, taken
    for negative curvature, and a step of 1e266 x p) and those of a huge one overflowed (an
    l2 of 1e200), with its dot products in float64 (_dot). The scaling is exact: a float64
    solve keeps its bits wherever nothing under- or overflows.
    """
    scale = _unit_scale(grad)
    if 0.0 < radius < math.inf and not 0.0 < radius * scale < math.inf:
        scale = 1.0  # a radius that scaling would round to 0 or inf: as it is
    result = _steihaug_scaled(
        product,
        grad * scale,
        damping=damping,
        radius=radius * scale,
        tolerance=tolerance,
        max_iterations=max_iterations,
    )
    return replace(
        result,
        direction=result.direction / scale,
        predicted_decrease=result.predicted_decrease / scale / scale,  # (scale^2 may be 0)
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """a . b in float64: on a float32 problem of curvature 1e-20 the unit-scaled gradient's
    step is 1e20, whose square overflowed float32 (a NaN predicted decrease, every trial
    rejected)."""
    return float(a.double() @ b.double())


def _unit_scale(grad: torch.Tensor) -> float:
    """The power of two that brings grad's norm near 1 (1 for a zero or non-finite norm)."""
    norm = float(vector_norm(grad))
    if norm == 0.0 or not math.isfinite(norm):
        return 1.0
    return math.ldexp(1.0, -math.frexp(norm)[1])


def _steihaug_scaled(
    product: Product,
    grad: torch.Tensor,
    *,
    damping: float,
    radius: float,
    tolerance: float,
    max_iterations: int,
) -> CGResult:
    """steihaug_cg's iteration on a gradient of about unit size (its result not yet scaled
    back)."""
    d = torch.zeros_like(grad)
    r = -grad
    p = r.clone()
    rr = _dot(r, r)
    gnorm = math.sqrt(rr)
    negative = boundary = False
    iterations = 0
    if gnorm > 0.0:
        target = max(tolerance, torch.finfo(grad.dtype).eps) * gnorm
        for iterations in range(1, max_iterations + 1):
            cancel.check(f"in CG iteration {iterations}")
            ap = product(p)
            if damping:
                ap = ap + damping * p
            pap = _dot(p, ap)
            if not math.isfinite(pap):
                raise FloatingPointError(
                    f"a non-finite curvature product in CG iteration {iterations}"
                )
            if pap <= 0.0:
                negative = True
                if math.isfinite(radius):
                    tau = _to_boundary(d, p, radius)
                    boundary = True
                elif pap < 0.0:
                    tau = rr / -pap
                else:
                    tau = 1.0 if iterations == 1 else 0.0
                d = d + tau * p
                r = r - tau * ap
                break
            alpha = rr / pap
            d_next = d + alpha * p
            if vector_norm(d_next) >= radius:
                tau = _to_boundary(d, p, radius)
                d = d + tau * p
                r = r - tau * ap
                boundary = True
                break
            d = d_next
            r = r - alpha * ap
            rr_next = _dot(r, r)
            if math.sqrt(rr_next) <= target:
                break
            p = r + (rr_next / rr) * p
            rr = rr_next
    gd, rd, dd = _dot(grad, d), _dot(r, d), _dot(d, d)
    # With A d = -g - r: g.d + d.A d / 2 = (g.d - r.d) / 2, and d.B d = d.A d - lambda d.d.
    predicted = -0.5 * (gd - rd) + 0.5 * damping * dd
    residual = float(r.norm()) / gnorm if gnorm > 0.0 else 0.0
    return CGResult(d, iterations, residual, negative, boundary, predicted)


def rounding_scale(loss: float, start: float) -> float:
    """The magnitude whose 16 eps the trust region takes as the rounding of `loss`, the run
    having started at loss `start`: |loss| + sqrt(|loss| start), at most max(|loss|, 1).

    A loss near 0 that is a sum of squares r^2 carries its residuals' rounding, eps times
    their terms' size (sqrt(start), as they started): 2 |r| eps sqrt(start), above its own
    eps |loss| (a float32 exact fit's loss is noise of its own size). An absolute 16 eps
    (the bound alone) took a float32 mlp's loss of 6e-7 up fourfold as "rounding" (gain
    ratio 1), a float64 one's up 1e5 eps again and again, to max_iterations; the relative
    16 eps |loss| alone kept a float32 mlp from its gradient tolerance.
    """
    size = abs(loss)
    return min(size + math.sqrt(size * abs(start)), max(size, 1.0))


def _hidden(trial: float, loss: float, predicted: float, dtype: torch.dtype) -> float:
    """sqrt(eps) |loss| where a step's predicted decrease and its loss's change are both
    within it (else 0): a loss summed from terms far larger than itself (least squares on
    data of 1e6) carries their rounding, far past 16 eps of itself, and may hide a step's
    progress there that its gradient shows (Hager & Zhang's approximate Wolfe test trusts
    the gradients within 1e-6 |f|): a Newton step along such a fit's stiff column rose its
    loss by noise, the radius collapsed, and the run ended "no progress" at 13x its minimum."""
    zone = math.sqrt(torch.finfo(dtype).eps) * abs(loss)
    return zone if 0.0 < predicted <= zone and abs(trial - loss) <= zone else 0.0


def initial_state(options: MethodOptions) -> dict[str, float]:
    """The adaptive state a Hessian-free run carries (floats, so checkpoints hold it)."""
    return {
        "damping": options.damping,
        "trust_radius": options.trust_radius,
        "radius_high": options.trust_radius,  # the largest radius so far
        "forcing": math.nan,
        "forcing_grad_norm": math.nan,
        "curvature_draws": 0.0,
        "gradient_draws": 0.0,
        # 1: the next solve takes cg_tolerance (a partial solve's step looked stalled)
        "cg_tight": 0.0,
        # |loss| at the run's first step: the scale of its terms (rounding_scale)
        "loss_scale": math.nan,
    }


def forcing_term(options: MethodOptions, state: dict[str, float], grad_norm: float) -> float:
    """The inner CG tolerance eta_k (Eisenstat-Walker choice 2, or the fixed cg_tolerance).

    eta_k = 0.9 (||g_k|| / ||g_{k-1}||)^2, safeguarded by 0.9 eta_{k-1}^2 when that exceeds
    0.1, clipped to [cg_tolerance, 0.5]; a repeated point (rejected step) keeps eta. The
    state's cg_tight asks for cg_tolerance once (Run's stall test on a partial solve).
    """
    if state.get("cg_tight", 0.0):
        state["cg_tight"] = 0.0
        if options.cg_forcing != "fixed":
            state["forcing"], state["forcing_grad_norm"] = options.cg_tolerance, grad_norm
        return options.cg_tolerance
    if options.cg_forcing == "fixed":
        return options.cg_tolerance
    previous_norm, previous_eta = state["forcing_grad_norm"], state["forcing"]
    if math.isnan(previous_eta):
        eta = ETA_MAX
    elif grad_norm == previous_norm:
        eta = previous_eta
    else:
        eta = EW_GAMMA * (grad_norm / previous_norm) ** EW_ALPHA
        safeguard = EW_GAMMA * previous_eta**EW_ALPHA
        if safeguard > 0.1:
            eta = max(eta, safeguard)
    eta = min(max(eta, options.cg_tolerance), ETA_MAX)
    state["forcing"], state["forcing_grad_norm"] = eta, grad_norm
    return eta


def _generator(options: MethodOptions, state: dict[str, float]) -> torch.Generator | None:
    """A generator seeded by (seed, draw index), so runs and resumed runs draw alike."""
    if options.curvature_fraction >= 1.0:
        return None
    draw = int(state["curvature_draws"])
    state["curvature_draws"] = float(draw + 1)
    return _seeded(options, draw)


def _seeded(options: MethodOptions, draw: int, stream: int = 0) -> torch.Generator:
    """The generator of draw `draw` in the run's stream `stream` (0: curvature rows,
    1: gradient mini-batches), a function of the seed alone."""
    return torch.Generator().manual_seed((options.seed * 1_000_003 + draw + stream * 2**62) % 2**63)


@dataclass(frozen=True)
class GradientSample:
    """The gradient a step uses: of `rows` of the data (sorted indices), or all rows (None).

    objective is the one the gradient is of (the mini-batch's); generator continues the
    step's draw, for the curvature sample taken from within the batch; draw is the batch's
    index in the run's sequence of draws (-1 for the full gradient); loss the batch's loss
    at the point (NaN for the full gradient).
    """

    grad: torch.Tensor
    rows: torch.Tensor | None
    objective: Objective
    generator: torch.Generator | None
    draw: int = -1
    loss: float = math.nan


def batch_gradient(
    objective: Objective, x: torch.Tensor, options: MethodOptions, state: dict[str, float]
) -> GradientSample:
    """The gradient at x of the mini-batch the next step uses (state's gradient_draws).

    The batch is round(gradient_fraction x rows) rows (at least 1) drawn without replacement
    by a generator seeded by (seed, draw index). The index is not advanced here (the step
    that uses the batch advances it), so evaluating a point, or resuming at it, draws the
    same batch. Only the batch's rows go through the backward pass.
    """
    draw = int(state["gradient_draws"])
    gen = _seeded(options, draw, stream=1)
    total = objective.num_rows
    keep = max(1, round(options.gradient_fraction * total))
    rows = torch.randperm(total, generator=gen)[:keep].sort().values
    batch = objective.subsample(rows.to(objective.device))
    loss, grad = loss_and_grad(batch, x)
    return GradientSample(grad, rows, batch, gen, draw, float(loss))


def _copy_generator(gen: torch.Generator) -> torch.Generator:
    """An independent generator in `gen`'s state (a drawn sample stays reusable)."""
    copy = torch.Generator()
    copy.set_state(gen.get_state())
    return copy


def gradient_sample(
    objective: Objective,
    x: torch.Tensor,
    grad: torch.Tensor,
    options: MethodOptions,
    state: dict[str, float],
    drawn: GradientSample | None = None,
) -> GradientSample:
    """The full gradient `grad`, or with gradient_fraction < 1 that of this step's mini-batch.

    The step's batch is `drawn` (a `batch_gradient` at x, as Stepper.evaluate takes with the
    point, so its gradient is not computed twice) when it is the batch of the current draw
    index, else it is drawn here. Either way gradient_draws advances: each step, a rejected
    trust-region trial included, uses a new batch, and a resumed run draws alike.
    """
    if options.gradient_fraction >= 1.0:
        return GradientSample(grad, None, objective, None)
    draw = int(state["gradient_draws"])
    if drawn is None or drawn.rows is None or drawn.draw != draw:
        drawn = batch_gradient(objective, x, options, state)
    state["gradient_draws"] = float(draw + 1)
    return replace(drawn, generator=_copy_generator(drawn.generator))


def cg_direction(
    objective: Objective,
    x: torch.Tensor,
    grad: torch.Tensor,
    options: MethodOptions,
    state: dict[str, float],
    radius: float = math.inf,
    drawn: GradientSample | None = None,
) -> CGResult:
    """The truncated-CG direction at x under the options' curvature, damping and forcing.

    With gradient_fraction < 1 the gradient is a mini-batch's (`drawn` when it is this
    step's, see gradient_sample) and the curvature sample is curvature_fraction /
    gradient_fraction of that batch (all of it when that is >= 1).
    """
    sample = gradient_sample(objective, x, grad, options, state, drawn)
    if sample.rows is None:
        fraction, generator = options.curvature_fraction, _generator(options, state)
    else:
        fraction = min(1.0, options.curvature_fraction / options.gradient_fraction)
        generator = sample.generator
    sub = curvature_objective(sample.objective, fraction, generator)
    product = curvature_products(sub, x, options.backend, options.curvature).vector(
        options.hvp_mode
    )
    rhs = sample.grad
    if objective.has_gauge:
        # CG on P B P with P g: every iterate stays off the gauge directions, along which
        # B is singular and rounding alone would give a "negative curvature" (float32)
        product, rhs = _projected(product, objective.project_step), objective.project_step(rhs)
    tolerance = forcing_term(options, state, float(sample.grad.norm()))
    cg = steihaug_cg(
        product,
        rhs,
        damping=state["damping"],
        radius=radius,
        tolerance=tolerance,
        max_iterations=options.cg_max_iterations,
    )
    # stopped by a forcing tolerance looser than cg_tolerance: a solve to cg_tolerance may
    # go further (not after cg_max_iterations, the boundary or negative curvature: it would
    # stop there again)
    met = cg.iterations < options.cg_max_iterations or cg.residual <= tolerance
    partial = (
        not (cg.on_boundary or cg.negative_curvature) and options.cg_tolerance < tolerance and met
    )
    return replace(
        cg,
        partial=partial,
        gradient_batch_size=0 if sample.rows is None else sample.rows.numel(),
        batch=None if sample.rows is None else sample,
    )


def _projected(product: Product, project: Callable[[torch.Tensor], torch.Tensor]) -> Product:
    """v -> P B P v for the orthogonal projector P off an objective's gauge directions."""
    return lambda v: project(product(project(v)))


@dataclass(frozen=True)
class TrustRegionStep:
    """One trust-region Newton-CG trial: the candidate, its gain ratio and acceptance."""

    x_new: torch.Tensor
    cg: CGResult
    damping: float
    trust_radius: float
    gain_ratio: float
    accepted: bool
    # the loss change taken as noise in judging it (0: the loss judged it alone)
    loss_noise: float = 0.0
    # the radius grew past every one the run had before
    let_go: bool = False


def newton_cg(
    objective: Objective,
    x: torch.Tensor,
    loss: float,
    grad: torch.Tensor,
    options: MethodOptions,
    state: dict[str, float],
    loss_at: Callable[[torch.Tensor], float],
    drawn: GradientSample | None = None,
    judge: Callable[[torch.Tensor, bool], bool | None] | None = None,
) -> TrustRegionStep:
    """One Steihaug-Toint trust-region step with Martens damping; updates `state` in place.

    `drawn`: the point's mini-batch gradient when gradient_fraction < 1 (see gradient_sample).
    `judge(x_new, trapezoid)`: whether the trial's gradient shows progress (its max-norm
    halves, or with `trapezoid` the trapezoid test passes; None: nothing can tell), asked
    where the loss's changes are within 16 eps max(|f|, 1) but not within its tighter
    rounding (rounding_scale), and (halving alone) within sqrt(eps) |f| (_hidden).

    rho = (f(x) - f(x + d)) / (model decrease), taken as 1 when both are within rounding of
    f, or within sqrt(eps) |f| where `judge` finds progress (_hidden); the step is accepted
    when rho > 0. A mini-batch step's radius and lambda follow its gain ratio on its own
    batch (_batch_gain). The radius shrinks to ||d|| / 4 (a partial solve's: radius / 4)
    when rho < 1/4 and doubles when rho > 3/4 on the boundary; lambda grows by 3/2 when
    rho < 1/4 and shrinks by 2/3 when rho > 3/4 (lambda = 0 switches the damping off and
    leaves the trust region alone to safeguard).
    """
    radius, lam = state["trust_radius"], state["damping"]
    let_go = False
    cg = cg_direction(objective, x, grad, options, state, radius, drawn)
    x_new = x + cg.direction
    trial = loss_at(x_new)
    predicted = cg.predicted_decrease
    rho = (loss - trial) / predicted if predicted > 0 and math.isfinite(trial) else -math.inf
    # both changes below the loss's rounding: rho is noise, trust the model. Within 16 eps
    # max(|f|, 1) but past the tighter rounding_scale the terms' size is unknown (a float32
    # mlp's loss rose fourfold there, a least-squares fit on data of 1e6 approached its
    # minimum there): the trial's gradient decides, as the line search's does
    if math.isnan(state.get("loss_scale", math.nan)):
        state["loss_scale"] = abs(loss)
    noise = 0.0
    if predicted > 0 and below_rounding(trial, loss, 1.0, -predicted, x.dtype, floor=1.0):
        floor = rounding_scale(loss, state["loss_scale"])
        tight = below_rounding(trial, loss, 1.0, -predicted, x.dtype, floor=floor)
        if tight or judge is None or judge(x_new, True) is not False:
            rho, noise = 1.0, loss_rounding(loss, x.dtype, floor=1.0)
    elif (
        rho < SHRINK_RATIO
        and judge is not None
        and (zone := _hidden(trial, loss, predicted, x.dtype))
        and judge(x_new, False)  # the max-norm halving alone: the trapezoid test passes noise
    ):
        rho, noise = 1.0, zone
    # at an exactly zero gradient the step 0 is the model's minimiser: taken (the stall test
    # then judges it), where its rejection (rho -inf) collapsed the radius run after run
    zero = drawn is None and not bool(grad.any())  # (a mini-batch's 0 is not the point's)
    accepted = rho > ACCEPT_RATIO or zero
    step_norm = vector_norm(cg.direction)
    if zero:  # nothing was learned of the model: the radius and lambda stay
        return TrustRegionStep(x_new, cg, lam, radius, math.nan, accepted)
    # a mini-batch step is taken on the full loss's decrease, and the radius follows how well
    # the model predicted its own batch's loss: the full loss's smaller decrease (the batch's
    # noise) shrank the radius on accepted steps to 1e-8, and the run stalled 18% above its
    # minimum
    fit = _batch_gain(cg.batch, x_new, predicted, x.dtype) if accepted and cg.batch else rho
    if math.isnan(fit):
        fit = rho
    if fit < SHRINK_RATIO:
        # a partial solve's length says nothing of the model's minimiser: the radius shrinks
        # from itself, and a rejected one is solved to cg_tolerance next (a one-iteration
        # step of 5e-15 along a stiff column took the radius from 8 to 1e-15 for good)
        basis = radius if cg.partial else min(step_norm, radius)
        state["trust_radius"] = max(SHRINK_RATIO * basis, 1e-300)
        state["damping"] = lam * MARTENS_INCREASE
        if cg.partial and not accepted:
            state["cg_tight"] = 1.0
    elif fit > GROW_RATIO:
        if cg.on_boundary:
            state["trust_radius"] = min(2.0 * radius, MAX_TRUST_RADIUS)
            # past every radius the run had: a cautious start letting go (Step.held_back),
            # not a radius that rounding noise shrinks and grows again
            high = state.get("radius_high", radius)
            let_go = state["trust_radius"] > high
            state["radius_high"] = max(high, state["trust_radius"])
        state["damping"] = lam * MARTENS_DECREASE
    return TrustRegionStep(
        x_new, cg, lam, radius, rho if math.isfinite(rho) else math.nan, accepted, noise, let_go
    )


def _batch_gain(
    batch: GradientSample, x_new: torch.Tensor, predicted: float, dtype: torch.dtype
) -> float:
    """A mini-batch step's gain ratio on its batch's loss (1 within its rounding; NaN where
    the batch cannot be evaluated at x_new)."""
    try:
        trial = float(loss_value(batch.objective, x_new))
    except EvaluationError:
        return math.nan
    if below_rounding(trial, batch.loss, 1.0, -predicted, dtype, floor=1.0):
        return 1.0
    return (batch.loss - trial) / predicted


def gauss_newton_cg(
    objective: Objective,
    x: torch.Tensor,
    loss: float,
    grad: torch.Tensor,
    options: MethodOptions,
    state: dict[str, float],
    loss_at: Callable[[torch.Tensor], float],
    drawn: GradientSample | None = None,
) -> TrustRegionStep:
    """`newton_cg` with Gauss-Newton-vector products (positive semi-definite curvature)."""
    options = replace(options, curvature="gauss_newton")
    return newton_cg(objective, x, loss, grad, options, state, loss_at, drawn)


def check_supported(objective: Objective, options: MethodOptions) -> None:
    """Refuse, naming the field, row sub-sampling on an objective without data rows (the
    curvature kind is refused once, by methods.check_supported)."""
    for name in ("curvature_fraction", "gradient_fraction"):
        if getattr(options, name) < 1.0 and not objective.row_fields:
            raise _no_rows(objective, name, getattr(options, name))


def _no_rows(objective: Objective, name: str, fraction: float) -> ValidationError:
    """The refusal of row sub-sampling (option `name` below 1) on an objective without
    data rows."""
    return ValidationError(
        f"options.{name}",
        f"1 for {objective.described_as}, which has no data rows to sub-sample",
        fraction,
    )
