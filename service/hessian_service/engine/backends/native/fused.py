"""The unary Newton step as one native call, for `run.take_step` with the fixed policy.

When the native backend serves the objective, loss, gradient, Hessian and the damped solve
run in one fused C++ call and this module only checks the inputs and builds the record, so
a seed-sized step costs microseconds. Anything unusual (a dtype or device to convert, a
non-finite point, a failed or damped solve, a dense budget exceeded) returns None and the general
path runs, which raises exactly what it always raised. Validated options and per-objective
call plans are memoised by object identity (objectives and options are immutable).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from ...linalg import MAX_DAMPING_ATTEMPTS
from ...objectives.base import Objective
from ...options import MethodOptions
from ...records import StepRecord, StepResult
from .. import selector

_MAX_CACHED = 256
_ENV_KEY = "HESSIAN_BACKEND"


# id(options) -> (options, env value, validated options, fusable)
_OPTIONS: dict[int, tuple[MethodOptions | None, object, MethodOptions, bool]] = {}
# id(objective) -> (objective, plan or None);
# plan = (fn, args, dtype, n, itemsize, flat, gauge: the objective projects its steps)
_PLANS: dict[int, tuple[Objective, tuple[Any, ...] | None]] = {}


def _options_entry(options: MethodOptions | None) -> tuple[MethodOptions, bool]:
    env = os.environ.get(_ENV_KEY)
    hit = _OPTIONS.get(id(options))
    if hit is not None and hit[0] is options and hit[1] == env:
        return hit[2], hit[3]
    result = (options or MethodOptions()).validated()
    fusable = (
        result.method == "newton"
        and result.step_policy == "fixed"
        and result.curvature == "hessian"
        and result.backend != "autograd"
    )
    if len(_OPTIONS) >= _MAX_CACHED:
        _OPTIONS.clear()
    _OPTIONS[id(options)] = (options, env, result, fusable)  # holds `options`: ids stay unique
    return result, fusable


def validated_options(options: MethodOptions | None) -> MethodOptions:
    """`options.validated()`, memoised per options object and $HESSIAN_BACKEND value."""
    return _options_entry(options)[0]


def _plan(objective: Objective) -> tuple[Any, ...] | None:
    hit = _PLANS.get(id(objective))
    if hit is not None and hit[0] is objective:
        return hit[1]
    plan = None
    entry = selector.fused_entry(objective)
    if entry is not None:
        fn, args = entry
        itemsize = torch.empty((), dtype=objective.dtype).element_size()
        gauge = type(objective).project_step is not Objective.project_step
        n, flat = objective.num_params, not objective.native_step_any_shape
        plan = (fn, args, objective.dtype, n, itemsize, flat, gauge)
    if len(_PLANS) >= _MAX_CACHED:
        _PLANS.clear()
    _PLANS[id(objective)] = (objective, plan)  # holds `objective`: ids stay unique
    return plan


def fused_newton_step(
    objective: Objective, params: torch.Tensor, options: MethodOptions | None
) -> StepResult | None:
    """The fixed-step Newton step through the fused native op, or None where it does not apply."""
    options, fusable = _options_entry(options)
    if not fusable or type(params) is not torch.Tensor:
        return None
    plan = _plan(objective)
    if plan is None:
        return None
    fn, args, dtype, n, itemsize, flat, gauge = plan
    budget = options.dense_budget_bytes
    if (
        params.dtype is not dtype
        or not params.is_cpu
        or params.numel() != n
        or (budget is not None and n * n * itemsize > budget)
    ):
        return None
    if params.requires_grad:
        params = params.detach()
    if params.dim() != 1 and (flat or not params.is_contiguous()):
        params = params.reshape(-1)
    lr = options.learning_rate
    start = time.perf_counter()
    x_new, (loss, gnorm, gmax, step_norm, damping, attempts, finite) = fn(
        params, *args, lr, options.damping, MAX_DAMPING_ATTEMPTS
    )
    if not finite or attempts != 1:
        return None  # a failed or damped solve: the general path says what it found
    if gauge:
        step = objective.project_step((x_new - params).reshape(-1))
        x_new = (params.reshape(-1) + step).reshape(x_new.shape)
        step_norm = float(step.norm())
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
        backend="native",
        iteration_seconds=seconds,
        cumulative_seconds=seconds,
    )
    return StepResult(x_new, record, "newton", "")
