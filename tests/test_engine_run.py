"""The run loop: records, stopping criteria, cancel, non-finite losses, resume, bad options."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from itertools import pairwise
from typing import Any

import pytest
import torch
from hessian_service.engine import (
    CancelToken,
    MethodOptions,
    Objective,
    Run,
    StopCriteria,
    StopReason,
    UnknownNameError,
    ValidationError,
    make_objective,
    take_step,
)
from problems import NO_TOL, random_params, random_problem

F64 = torch.float64


class BlowUp(Objective):
    """exp(x) summed: gradient descent with a huge step overflows to inf."""

    name = "blow_up"

    def _setup(self, data: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> None:
        self.param_shape = (3,)
        self.dtype = F64

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        return torch.exp(-params).sum() + torch.exp(params).sum()


def test_records_are_consecutive_and_max_iterations_counts_steps():
    obj = random_problem("logistic_regression")
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="gradient_descent"),
        StopCriteria(max_iterations=7, **NO_TOL),
    )
    records = run.run_to_end()
    assert [r.iteration for r in records] == list(range(8))
    assert run.stop_reason is StopReason.MAX_ITERATIONS and not run.stop_reason.converged
    assert records[-1].step_norm == 0.0 and all(r.step_norm > 0 for r in records[:-1])
    for a, b in pairwise(records):
        assert b.loss_change == pytest.approx(a.loss - b.loss, abs=1e-15)
        assert b.cumulative_seconds >= a.cumulative_seconds
    assert float(obj.loss(run.params)) == pytest.approx(records[-1].loss, rel=1e-14)


def test_gradient_tolerance_stops_and_reports():
    obj = random_problem("quadratic")
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="newton"),
        StopCriteria(max_iterations=10, **{**NO_TOL, "gradient_tolerance": 1e-9}),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.stop_reason.converged
    assert len(records) == 2 and records[-1].gradient_max_norm <= 1e-9
    assert "gradient_tolerance" in run.message


def test_function_tolerance():
    obj = random_problem("mse")
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="gradient_descent", learning_rate=1),
        StopCriteria(max_iterations=1000, **{**NO_TOL, "function_tolerance": 1e-3}),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.FUNCTION_STALLED and not run.stop_reason.converged
    assert abs(records[-1].loss_change) <= 1e-3 * abs(records[-2].loss)
    assert all(abs(r.loss_change) > 1e-3 * abs(p.loss) for p, r in pairwise(records[:-1]))


def test_parameter_tolerance():
    obj = random_problem("mse")
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="gradient_descent", learning_rate=1),
        StopCriteria(max_iterations=1000, **{**NO_TOL, "parameter_tolerance": 1e-4}),
    )
    run.run_to_end()
    assert run.stop_reason is StopReason.PARAMETERS_STALLED and not run.stop_reason.converged


def test_time_limit():
    obj = random_problem("mlp", size=8)
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="gradient_descent", learning_rate=1e-6),
        StopCriteria(max_iterations=10**9, time_limit_seconds=0.2, **NO_TOL),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.TIME_LIMIT
    assert records[-1].cumulative_seconds >= 0.2
    # The limit is tested as each iteration begins (at cumulative - iteration seconds): the
    # run stopped at the first iteration that began past it, however slow the machine.
    began = [r.cumulative_seconds - r.iteration_seconds for r in records]
    slack = 1e-9  # the rounding of the two subtractions, nothing measurable
    assert began[-1] >= 0.2 - slack
    assert all(t < 0.2 + slack for t in began[:-1]), began[-3:]


def test_cancel_between_iterations():
    obj = random_problem("least_squares")
    token = CancelToken()
    run = Run(
        obj,
        random_params(obj),
        MethodOptions(method="gradient_descent", learning_rate=1e-3),
        StopCriteria(max_iterations=10**9, **NO_TOL),
        cancel=token,
    )
    seen = []
    for record in run:
        seen.append(record)
        if record.iteration == 5:
            token.cancel()
    assert run.stop_reason is StopReason.CANCELLED
    assert [r.iteration for r in seen] == list(range(7)), "stops within one iteration"


def test_non_finite_keeps_last_finite_params():
    obj = BlowUp({}, {})
    x0 = torch.full((3,), 2.0, dtype=F64)
    run = Run(
        obj,
        x0,
        MethodOptions(method="gradient_descent", learning_rate=200.0),
        StopCriteria(max_iterations=50, **NO_TOL),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.NON_FINITE
    assert all(math.isfinite(r.loss) for r in records)
    assert bool(torch.isfinite(run.params).all())
    assert float(obj.loss(run.params)) == pytest.approx(records[-1].loss, rel=1e-14)
    assert "non-finite" in run.message


def test_non_finite_initial_point():
    run = Run(BlowUp({}, {}), torch.full((3,), 800.0, dtype=F64))
    assert run.run_to_end() == []
    assert run.stop_reason is StopReason.NON_FINITE


@pytest.mark.parametrize("policy", ["fixed", "line_search", "levenberg_marquardt"])
def test_resume_from_checkpoint_continues_identically(policy):
    obj = make_objective("rosenbrock", {}, {"dim": 6})
    options = MethodOptions(method="newton", step_policy=policy, learning_rate=0.7)
    stopping = StopCriteria(max_iterations=25, **NO_TOL)
    full = Run(obj, obj.init_params(), options, stopping).run_to_end()
    first = Run(obj, obj.init_params(), options, stopping)
    for record in first:
        if record.iteration == 9:
            break
    checkpoint = first.checkpoint()
    assert checkpoint.iteration == 9
    resumed = Run(obj, obj.init_params(), options, stopping, resume=checkpoint).run_to_end()
    assert [r.iteration for r in resumed] == list(range(9, len(full)))
    for a, b in zip(full[9:], resumed, strict=True):
        assert (a.loss, a.damping, a.step_norm, a.loss_change) == (
            b.loss,
            b.damping,
            b.step_norm,
            b.loss_change,
        )


def _untimed(record) -> str:
    """A record without its timings, as its repr: every float exact, NaN equal to NaN."""
    return repr(replace(record, iteration_seconds=0.0, cumulative_seconds=0.0))


@pytest.mark.parametrize("policy", ["line_search", "levenberg_marquardt"])
def test_a_moved_run_does_not_test_its_repeated_iteration_again(policy):
    """A run moved to another process (moved_after) was cancelled just after its record k
    there: it redoes iteration k without testing it (it passed there) and stops at k + 1,
    as the unmoved run does, not at k with step k lost (a review finding)."""
    obj = make_objective("rosenbrock", {}, {"dim": 6})
    options = MethodOptions(method="newton", step_policy=policy)
    stopping = StopCriteria(max_iterations=40, **NO_TOL)
    token = CancelToken()
    unmoved = []
    for record in Run(obj, obj.init_params(), options, stopping, cancel=token):
        unmoved.append(record)
        if record.iteration == 7:
            token.cancel()
    assert [r.iteration for r in unmoved] == list(range(9))
    first = Run(obj, obj.init_params(), options, stopping)
    head = []
    for record in first:
        head.append(record)
        if record.iteration == 7:
            break
    cancelled = CancelToken()
    cancelled.cancel()
    moved = Run(obj, obj.init_params(), options, stopping, cancel=cancelled,
                resume=first.checkpoint(), moved_after=head[-1].cumulative_seconds)  # fmt: skip
    tail = moved.run_to_end()
    assert [r.iteration for r in tail] == [7, 8]
    assert [_untimed(r) for r in head + tail[1:]] == [_untimed(r) for r in unmoved]
    assert moved.stop_reason is StopReason.CANCELLED
    # its clock goes on from where it moved: past the limit, it stops at k + 1 too
    limited = Run(obj, obj.init_params(), options, replace(stopping, time_limit_seconds=1.0),
                  resume=first.checkpoint(), moved_after=5.0)  # fmt: skip
    tail = limited.run_to_end()
    assert [r.iteration for r in tail] == [7, 8] and tail[-1].cumulative_seconds >= 5.0
    assert limited.stop_reason is StopReason.TIME_LIMIT


@pytest.mark.parametrize(
    ("moved_after", "resume", "field"),
    [(-1.0, True, "moved_after"), (math.nan, True, "moved_after"), (0.5, False, "resume")],
)
def test_bad_moved_after_names_the_field(moved_after, resume, field):
    obj = make_objective("rosenbrock", {}, {"dim": 3})
    first = Run(obj, obj.init_params())
    next(first)
    with pytest.raises(ValidationError) as info:
        Run(obj, obj.init_params(), resume=first.checkpoint() if resume else None,
            moved_after=moved_after)  # fmt: skip
    assert info.value.field == field


def test_rejected_levenberg_marquardt_step_repeats_the_point():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    run = Run(
        obj,
        torch.tensor([-1.2, 1.0], dtype=F64),
        MethodOptions(method="newton", step_policy="levenberg_marquardt", damping=1e-9),
        StopCriteria(max_iterations=60, **NO_TOL),
    )
    records = run.run_to_end()
    rejected = [i for i, r in enumerate(records[:-1]) if not r.step_accepted]
    assert rejected, "a tiny initial damping must produce a rejected trial on Rosenbrock"
    for i in rejected:
        assert records[i + 1].loss == records[i].loss
        assert records[i + 1].damping > records[i].damping


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"method": "adam"}, "options.method"),
        ({"learning_rate": -0.1}, "options.learning_rate"),
        ({"learning_rate": 0}, "options.learning_rate"),
        ({"learning_rate": float("nan")}, "options.learning_rate"),
        ({"step_policy": "wolfe"}, "options.step_policy"),
        (
            {"method": "gradient_descent", "step_policy": "levenberg_marquardt"},
            "options.step_policy",
        ),
        ({"damping": -1.0}, "options.damping"),
        ({"backend": "gpu"}, "options.backend"),
        ({"curvature": "fisher"}, "options.curvature"),
        ({"armijo": 1.5}, "options.armijo"),
        ({"lr": 0.1}, "options.lr"),
        # relative to max|lambda|: past 1 saddle-free made one tiny step, then "stalled"
        ({"method": "saddle_free", "eigenvalue_floor": 1e300}, "options.eigenvalue_floor"),
        ({"method": "saddle_free", "eigenvalue_floor": 1.5}, "options.eigenvalue_floor"),
        ({"method": "saddle_free", "eigenvalue_floor": 0.0}, "options.eigenvalue_floor"),
    ],
)
def test_bad_method_options_name_the_field(options, field):
    with pytest.raises(ValidationError) as info:
        MethodOptions.from_dict(options)
    assert info.value.field == field
    assert str(info.value).startswith(field + ": expected")


@pytest.mark.parametrize(
    ("stopping", "field"),
    [
        ({"max_iterations": -1}, "stopping.max_iterations"),
        ({"max_iterations": 2.5}, "stopping.max_iterations"),
        ({"gradient_tolerance": -1e-3}, "stopping.gradient_tolerance"),
        ({"time_limit_seconds": 0}, "stopping.time_limit_seconds"),
        ({"maxiter": 3}, "stopping.maxiter"),
    ],
)
def test_bad_stopping_names_the_field(stopping, field):
    with pytest.raises(ValidationError) as info:
        StopCriteria.from_dict(stopping)
    assert info.value.field == field


def test_unknown_objective_and_bad_params():
    with pytest.raises(UnknownNameError) as info:
        make_objective("lasso", {}, {})
    assert info.value.field == "objective" and "least_squares" in str(info.value)
    obj = random_problem("mse")
    with pytest.raises(ValidationError, match=r"^params: expected 18 values"):
        take_step(obj, torch.zeros(5, dtype=F64))
    with pytest.raises(ValidationError, match=r"^params: expected finite"):
        take_step(obj, torch.full((18,), math.nan, dtype=F64))
    with pytest.raises(ValidationError, match=r"^params: expected dtype float32 or float64"):
        take_step(obj, torch.zeros(18, dtype=torch.int64))


@pytest.mark.parametrize("n", [2, 65], ids=["python-sum", "torch-sum"])
def test_the_unary_steps_finiteness_check_is_exact(n):
    """take_step's overflow check sums the new parameters (a finite sum proves them finite:
    isfinite's mask cost ~5 us a call, more than the seed's fused step) and falls back to
    the exact test where a sum of finite entries overflows."""
    from hessian_service.engine.linalg import all_finite

    for dtype in (torch.float32, torch.float64):
        big = torch.finfo(dtype).max
        assert all_finite(torch.full((n,), big, dtype=dtype))  # the sum overflows
        assert all_finite(torch.linspace(-1.0, 1.0, n, dtype=dtype))
        for bad in (math.inf, -math.inf, math.nan):
            t = torch.zeros(n, dtype=dtype)
            t[n // 2] = bad
            assert not all_finite(t), (dtype, bad)
        t = torch.full((n,), big, dtype=dtype)
        t[0] = -math.inf
        assert not all_finite(t)
        t[1] = math.inf  # -inf + inf: fsum raises ValueError
        assert not all_finite(t)
