"""The unary Newton step as one native call, for `run.take_step` (fixed or line search).

When the native backend serves the objective, loss, gradient, Hessian and the damped solve
run in one fused C++ call and this module only checks the inputs and builds the record, so
a seed-sized step costs microseconds. Under the line search the op's slope g.d and one loss
at x + d give the Armijo test of the first trial (alpha = 1); if it passes, the record is the
general path's. Anything unusual (a dtype or device to convert, a non-finite point, a failed
or damped solve, a dense budget exceeded, a rejected first trial, an objective with a gauge)
returns None and the general path runs, which raises exactly what it always raised.
Validated options and per-objective call plans are memoised by object identity (objectives
and options are immutable).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from ...curvature.autograd import loss_value
from ...linalg import MAX_DAMPING_ATTEMPTS, sufficient_decrease
from ...objectives.base import Objective
from ...options import BACKEND_ENV, MethodOptions, check_dtype_range
from ...records import StepRecord, StepResult
from .. import selector

_MAX_CACHED = 256


# id(options) -> (options, env value, validated options, fused policy or None)
_OPTIONS: dict[int, tuple[MethodOptions | None, object, MethodOptions, str | None]] = {}
# An objective's fused-step plan (or None: no fused step) is kept on the objective itself, so
# it goes with the objective (a global table would keep deleted problems' tensors alive), with
# the data dict it was made from: a copy on other rows (`rows`, Predict) has its own data dict
# and makes its own plan.
# plan = (fn, args, dtype, n, itemsize, flat)
_PLAN_ATTR = "_fused_step_plan"


def _fused_policy(options: MethodOptions) -> str | None:
    """The step policy the fused op serves for these options, or None.

    The line search only from a first trial of 1, as it was measured and tested (the op's
    x.add(d, lr) and the general path's torch.add(x, d, alpha) are the same one-rounding
    add, so other first trials would agree too).
    """
    if (
        options.method != "newton"
        or options.curvature != "hessian"
        or options.backend == "autograd"
    ):
        return None
    if options.step_policy == "fixed":
        return "fixed"
    if options.step_policy == "line_search" and options.learning_rate == 1.0:
        return "line_search"
    return None


def _options_entry(options: MethodOptions | None) -> tuple[MethodOptions, str | None]:
    env = os.environ.get(BACKEND_ENV)
    hit = _OPTIONS.get(id(options))
    if hit is not None and hit[0] is options and hit[1] == env:
        return hit[2], hit[3]
    result = (options or MethodOptions()).validated()
    policy = _fused_policy(result)
    if len(_OPTIONS) >= _MAX_CACHED:
        _OPTIONS.clear()
    _OPTIONS[id(options)] = (options, env, result, policy)  # holds `options`: ids stay unique
    return result, policy


def validated_options(options: MethodOptions | None) -> MethodOptions:
    """`options.validated()`, memoised per options object and $HESSIAN_BACKEND value."""
    return _options_entry(options)[0]


def _plan(objective: Objective) -> tuple[Any, ...] | None:
    hit = objective.__dict__.get(_PLAN_ATTR)
    if hit is not None and hit[0] is objective.data:
        return hit[1]
    plan = None
    # an objective with a gauge takes the general path, which fills the gauge in before
    # its solve (methods._newton) and projects the step
    entry = None if objective.has_gauge else selector.fused_entry(objective)
    if entry is not None:
        fn, args = entry
        itemsize = torch.empty((), dtype=objective.dtype).element_size()
        n, flat = objective.num_params, not objective.native_step_any_shape
        plan = (fn, args, objective.dtype, n, itemsize, flat)
    # the same plan whichever thread computes it first
    objective.__dict__[_PLAN_ATTR] = (objective.data, plan)
    return plan


def fused_newton_step(
    objective: Objective, params: torch.Tensor, options: MethodOptions | None
) -> StepResult | None:
    """The Newton step (fixed, or the line search's accepted first trial) through the fused
    native op, or None where it does not apply."""
    options, policy = _options_entry(options)
    if policy is None or type(params) is not torch.Tensor:
        return None
    plan = _plan(objective)
    if plan is None:
        return None
    fn, args, dtype, n, itemsize, flat = plan
    search = policy == "line_search"
    if search and options.learning_rate > 1.0:
        return None  # a first trial past 1 is compared with the full step (_line_search)
    budget = options.dense_budget_bytes
    if (
        params.dtype is not dtype
        or not params.is_cpu
        or params.numel() != n
        or (budget is not None and n * n * itemsize > budget)
    ):
        return None
    check_dtype_range(options, dtype)
    if params.requires_grad:
        params = params.detach()
    if params.dim() != 1:
        if not objective.accepts_shape(tuple(params.shape)):
            return None  # the general path refuses it, naming params
        if flat or not params.is_contiguous():
            params = params.reshape(-1)
    lr = options.learning_rate
    start = time.perf_counter()
    x_new, (loss, gnorm, gmax, step_norm, damping, attempts, finite, slope) = fn(
        params, *args, lr, options.damping, MAX_DAMPING_ATTEMPTS
    )
    if not finite or attempts != 1 or (gmax > 0.0 and not 0.0 < gnorm < math.inf):
        # a failed or damped solve, or a 2-norm that over- or underflowed (float32 past
        # 1e19 or below 1e-19): the general path says what it found, its norms rescaled
        return None
    if search:
        # methods._line_search's first Armijo test, the same function on the same numbers
        trial = float(loss_value(objective, x_new))
        if not sufficient_decrease(trial, loss, lr, slope, options.armijo):
            return None  # a backtrack is needed: the general path recomputes and searches
    seconds = time.perf_counter() - start
    record = StepRecord(
        iteration=0,
        loss=loss,
        gradient_norm=gnorm,
        gradient_max_norm=gmax,
        step_norm=step_norm,
        step_size=lr,
        damping=damping,
        gain_ratio=math.nan,
        step_accepted=True,
        negative_eigenvalues=0 if options.damping == 0 else -1,  # Cholesky of H proved PD
        solver_attempts=int(attempts),
        function_evaluations=int(search),
        backend="native",
        iteration_seconds=seconds,
        cumulative_seconds=seconds,
    )
    return StepResult(x_new, record, "newton", "")
