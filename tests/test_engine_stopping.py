"""Honest stops and safe defaults (issue 13 items 1-9, issue 11 D3), against float64 references.

Each test reproduces one reported defect: the reference is numpy/scipy/scikit-learn in
float64 on fresh inputs, never the engine's own output.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from itertools import pairwise

import numpy as np
import pytest
import scipy.optimize
import torch
from hessian_service.engine import (
    MethodOptions,
    Objective,
    Run,
    StopCriteria,
    make_objective,
    take_step,
)
from hessian_service.engine.analysis.curvature_summary import dense_curvature, spectrum_summary
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from hessian_service.engine.cancel import Cancelled, CancelToken
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.linalg import loss_rounding
from hessian_service.engine.options import METHODS, STEP_POLICIES
from hessian_service.engine.records import StopReason
from hessian_service.engine.solvers.run import FLAT_STEPS, UNCHANGED_STEPS
from native_support import BACKENDS, F64
from problems import NO_TOL, Saddle, breast_cancer
from sklearn.linear_model import LogisticRegression


def saddle_hessian(x: float, y: float) -> np.ndarray:
    """The analytic Hessian of `Saddle`."""
    return np.diag([2.0, -2.0 + 3.0 * y * y])


def logistic_minimum(x: np.ndarray, y: np.ndarray, l2: float) -> float:
    """The minimum of mean(softplus(z) - y z) + 0.5 l2 |w|^2 by SciPy's L-BFGS-B."""
    design = np.hstack([x, np.ones((len(x), 1))])

    def f(p: np.ndarray) -> tuple[float, np.ndarray]:
        z = design @ p
        w = p[:-1]
        loss = np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w @ w
        grad = design.T @ (1 / (1 + np.exp(-z)) - y) / len(y)
        grad[:-1] += l2 * w
        return loss, grad

    res = scipy.optimize.minimize(
        f, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000},
    )  # fmt: skip
    return float(res.fun)


# 1. Levenberg-Marquardt damping is capped: a named stop, the same on every backend
def test_levenberg_marquardt_below_rounding_stops_with_no_progress_on_every_backend():
    obj, x, y = breast_cancer()
    minimum = logistic_minimum(x, y, 1e-3)
    outcomes = []
    for backend in BACKENDS:
        run = Run(
            obj,
            torch.zeros(31, dtype=F64),
            MethodOptions(method="newton", step_policy="levenberg_marquardt", backend=backend),
            StopCriteria(max_iterations=300, **{**NO_TOL, "gradient_tolerance": 1e-30}),
        )
        records = run.run_to_end()
        assert run.stop_reason is StopReason.NO_PROGRESS and not run.stop_reason.converged
        assert "machine precision" in run.message
        assert math.isfinite(records[-1].damping) and records[-1].damping > 1e15
        assert records[-1].loss == pytest.approx(minimum, rel=1e-12)
        outcomes.append((run.stop_reason, records[-1].loss))
    # the same stop; the losses agree to rounding, not bit for bit: the backends' gradients
    # differ in their last bits from the first record on (a different summation order), so
    # which last bit the final loss lands on depends on the path and torch's thread count
    assert len({reason for reason, _ in outcomes}) == 1, outcomes
    losses = [loss for _, loss in outcomes]
    assert max(losses) - min(losses) <= 8 * np.finfo(np.float64).eps * min(losses), outcomes


def _least_squares(rng) -> Objective:
    x = torch.tensor(rng.normal(size=(20, 3)))
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.1 * torch.tensor(rng.normal(size=20))
    return make_objective("least_squares", {"X": x, "y": y})


BELOW_ROUNDING = {**NO_TOL, "gradient_tolerance": 1e-30}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("newton", {}),
        ("newton", {"step_policy": "fixed"}),
        ("saddle_free", {}),
        ("newton_cg", {}),
        ("gauss_newton_cg", {}),
        ("gradient_descent", {"learning_rate": 0.5}),
    ],
)
def test_steps_below_the_rounding_of_x_end_no_progress_as_levenberg_marquardt(
    rng, backend, method, extra
):
    # they were accepted for ever (x + d == x, or a cycle between two points one ulp apart
    # whose losses differ in their last bit) up to max_iterations
    for _ in range(3):
        obj = _least_squares(rng)
        options = MethodOptions(method=method, backend=backend, **extra)
        run = Run(obj, torch.zeros(3, dtype=F64), options, StopCriteria(2000, **BELOW_ROUNDING))
        records = run.run_to_end()
        assert run.stop_reason is StopReason.NO_PROGRESS and not run.converged, run.message
        assert "returned the parameters to one of their last" in run.message
        assert len(records) < 2001
        rounding = 16 * np.finfo(np.float64).eps
        tail = records[-1 - UNCHANGED_STEPS : -1]
        assert all(r.step_accepted and abs(r.loss_change) <= rounding * r.loss for r in tail[1:])
        design = obj.data["X"]
        if obj.options["fit_intercept"]:
            design = torch.hstack([design, torch.ones(20, 1, dtype=F64)])
        want = torch.linalg.lstsq(design, obj.data["y"].unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(run.params, want, rtol=1e-12, atol=1e-12)


def test_a_cycle_of_full_sized_steps_is_not_called_a_rounding_stall(rng):
    # lr = n on mean(x^2) maps x to -x: a cycle, but of steps twice |x|, not rounding
    x0 = torch.tensor(rng.normal(size=4))
    obj = make_objective("mse", {"target": torch.zeros(4, dtype=F64)})
    options = MethodOptions(method="gradient_descent", learning_rate=4.0, step_policy="fixed")
    run = Run(obj, x0, options, StopCriteria(max_iterations=30))
    records = run.run_to_end()
    assert run.stop_reason is StopReason.MAX_ITERATIONS and len(records) == 31
    assert torch.equal(run.params, x0)  # an even number of flips


@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_trust_radius_whose_step_underflows_ends_no_progress(rng, method):
    # the step was exactly 0, rejected, and the radius floored: max_iterations of nothing.
    # The smallest radius, with a gradient of ~1e3: radius / |g| rounds to 0
    x = torch.tensor(rng.normal(size=(20, 3)))
    obj = make_objective("least_squares", {"X": x, "y": 1e3 * x.sum(1)})
    options = MethodOptions(method=method, trust_radius=5e-324)
    run = Run(obj, torch.zeros(3, dtype=F64), options, StopCriteria(5000))
    records = run.run_to_end()
    assert run.stop_reason is StopReason.NO_PROGRESS and "trust radius" in run.message
    assert len(records) == 1 and not run.converged
    with pytest.raises(ValidationError) as err:
        take_step(obj, torch.zeros(3, dtype=F64), options)
    assert err.value.field == "options.trust_radius"


@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_subnormal_trust_radius_whose_step_is_representable_grows_and_converges(rng, method):
    # radius^2 underflowed to 0 below 1e-162, so the step was 0 although radius x the
    # unit direction is a representable step: it now doubles its way up and converges
    options = MethodOptions(method=method, trust_radius=1e-308)
    run = Run(_least_squares(rng), torch.zeros(3, dtype=F64), options, StopCriteria(5000))
    run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged


@pytest.mark.parametrize("radius", [1e-100, 1e-30])
def test_a_tiny_trust_radius_below_the_rounding_of_x_grows_and_converges(rng, radius):
    # x + d == x while the radius doubles: the parameters repeat but the step's state does
    # not, so this is no cycle and the run goes on to converge (the parameter test, off
    # here, would call the first such step a stall)
    obj = _least_squares(rng)
    options = MethodOptions(method="newton_cg", trust_radius=radius)
    stopping = StopCriteria(5000, gradient_tolerance=1e-8, parameter_tolerance=0.0)
    run = Run(obj, torch.ones(3, dtype=F64), options, stopping)
    records = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged, run.message
    assert records[0].trust_radius == radius and len(records) > 20


def test_a_run_resumed_inside_a_run_of_unchanged_steps_stops_where_the_whole_run_does(rng):
    obj = _least_squares(rng)
    options = MethodOptions(method="gradient_descent", learning_rate=0.5)
    whole = Run(obj, torch.zeros(3, dtype=F64), options, StopCriteria(2000, **BELOW_ROUNDING))
    records = whole.run_to_end()
    for cut in (len(records) - 3, len(records) - 2):  # after one and two unchanged steps
        first = Run(obj, torch.zeros(3, dtype=F64), options, StopCriteria(2000, **BELOW_ROUNDING))
        head = [record for _, record in zip(range(cut), first, strict=False)]
        resumed = Run(
            obj,
            torch.zeros(3, dtype=F64),
            options,
            StopCriteria(2000, **BELOW_ROUNDING),
            resume=first.checkpoint(),
        )
        tail = resumed.run_to_end()
        assert head[-1].iteration == tail[0].iteration
        assert [r.iteration for r in head[:-1] + tail] == [r.iteration for r in records]
        assert resumed.stop_reason is StopReason.NO_PROGRESS


# 2. a tolerance of 0 disables its test
def identity_quadratic(n: int) -> Objective:
    """0.5 |x|^2 (minimum at 0)."""
    data = {"A": torch.eye(n, dtype=F64), "b": torch.zeros(n, dtype=F64)}
    return make_objective("quadratic", data)


def _endless_line_search(rng) -> tuple[Objective, torch.Tensor, MethodOptions]:
    """Rosenbrock far out with a search that would take 10,000 barely shorter trials."""
    obj = make_objective("rosenbrock", {}, {"dim": 50})
    x = torch.tensor(rng.uniform(2.0, 3.0, 50))
    options = MethodOptions(
        method="gradient_descent", step_policy="line_search", learning_rate=1.0,
        armijo=0.9999, backtrack=1 - 1e-7, max_backtracks=10_000,
    )  # fmt: skip
    return obj, x, options


def test_a_deadline_or_a_cancel_stops_a_line_search_between_its_trials(rng):
    obj, x, options = _endless_line_search(rng)
    with pytest.raises(Cancelled) as err:  # NewtonStep's deadline
        take_step(obj, x, options, cancel=CancelToken.after(0.05))
    trials = int(re.search(r"after (\d+) line-search trials", str(err.value)).group(1))
    assert 0 < trials < 10_000
    token = CancelToken()  # CancelRun: the run stops inside its first step, not after it
    run = Run(obj, x, options, StopCriteria(max_iterations=5), cancel=token)
    threading.Timer(0.05, token.cancel).start()
    records = run.run_to_end()
    assert run.stop_reason is StopReason.CANCELLED and len(records) == 1
    assert re.search(r"cancelled during iteration 0: .*after \d+ line-search trials", run.message)
    with pytest.raises(
        ValidationError, match=r"max_backtracks: expected an integer in \[1, 10000\]"
    ):
        take_step(obj, x, dataclasses.replace(options, max_backtracks=10_001))


def test_zero_tolerances_disable_their_tests_even_when_nothing_changes():
    # x - 1e-20 x rounds to x: every step leaves x and the loss exactly unchanged
    x0 = torch.full((4,), 1e3, dtype=F64)
    assert np.array_equal(x0.numpy() - 1e-20 * x0.numpy(), x0.numpy())
    run = Run(
        identity_quadratic(4),
        x0,
        MethodOptions(method="gradient_descent", learning_rate=1e-20),
        StopCriteria(max_iterations=5, **NO_TOL),
    )
    records = run.run_to_end()
    assert [r.loss_change for r in records] == [0.0] * 6
    assert run.stop_reason is StopReason.MAX_ITERATIONS and len(records) == 6


def test_zero_gradient_tolerance_does_not_stop_at_an_exact_zero_gradient():
    run = Run(
        identity_quadratic(3),
        torch.zeros(3, dtype=F64),
        MethodOptions(),
        StopCriteria(max_iterations=3, **NO_TOL),
    )
    records = run.run_to_end()
    assert records[0].gradient_max_norm == 0.0
    assert run.stop_reason is StopReason.MAX_ITERATIONS and len(records) == 4


# 3. converged (first-order condition) vs stalled, defaults that let gradient descent run
def test_default_criteria_do_not_stop_slow_gradient_descent():
    obj, x, y = breast_cancer()
    run = Run(
        obj,
        torch.zeros(31, dtype=F64),
        MethodOptions(method="gradient_descent", learning_rate=1e-7),
        StopCriteria(max_iterations=20),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.MAX_ITERATIONS and len(records) == 21
    # the reference gradient at the start, numpy float64: far from stationary
    p = 1 / (1 + np.exp(-np.zeros(len(y))))
    g = np.append(x.T @ (p - y), np.sum(p - y)) / len(y)
    assert records[0].gradient_max_norm == pytest.approx(np.abs(g).max(), rel=1e-12)
    assert np.abs(g).max() > 0.3


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradient_descent_with_a_line_search_goes_as_far_as_the_fixed_step(rng, dtype):
    """Least squares, default stopping: once the loss cannot show a step's decrease, its
    gradients do (trapezoid estimate); before, Armijo passed a backtracked step of 1e-11
    (the decrease term rounded away), x stopped moving and the run ended no_progress at
    |g| 1.6e-9 (float64) while the fixed step converged."""
    x = rng.standard_normal((200, 4))
    y = x @ rng.standard_normal(4) + 0.1 * rng.standard_normal(200)
    want = np.linalg.lstsq(x, y, rcond=None)[0]
    obj = make_objective(
        "least_squares", {"X": torch.tensor(x, dtype=dtype), "y": torch.tensor(y, dtype=dtype)}, {}
    )
    ends = {}
    for policy in ("line_search", "fixed"):
        options = MethodOptions(method="gradient_descent", step_policy=policy)
        run = Run(obj, torch.zeros(4, dtype=dtype), options, StopCriteria(max_iterations=20_000))
        records = run.run_to_end()
        ends[policy] = run, records[-1].gradient_max_norm
    run, g_max = ends["line_search"]
    if dtype is F64:  # the default gradient tolerance 1e-10 is reached, as with the fixed step
        assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged, run.message
        assert np.abs(run.params.numpy() - want).max() <= 1e-8
    else:  # float32's gradient floor: within 4x of where the fixed step ends
        assert run.stop_reason in (StopReason.GRADIENT_TOLERANCE, StopReason.NO_PROGRESS)
        assert g_max <= 4 * max(ends["fixed"][1], 1e-10), (g_max, ends["fixed"][1])
        assert np.abs(run.params.double().numpy() - want).max() <= 1e-4


def test_gradient_descent_steps_below_the_rounding_of_x_still_end_no_progress(rng):
    """float32 mse far from 0 (target 1e4): lr g is below x's ulp, so no trial moves x.
    The gradient cannot judge a step that is not there (it saw g.dx = 0 and refused every
    trial: line_search_failed, and a unary step INVALID_ARGUMENT); Armijo does, as before."""
    obj = make_objective(
        "mse", {"target": torch.full((4,), 1e4) + torch.tensor(rng.random(4), dtype=torch.float32)}
    )
    options = MethodOptions(method="gradient_descent", step_policy="line_search", learning_rate=0.1)
    run = Run(obj, torch.full((4,), 0.3), options, StopCriteria(max_iterations=5000))
    run.run_to_end()
    assert run.stop_reason is StopReason.NO_PROGRESS, run.message
    step = take_step(obj, run.params.clone(), options)
    assert step.record.step_accepted and torch.equal(step.params, run.params)


def test_a_small_loss_change_is_a_stall_not_convergence():
    obj, _, _ = breast_cancer()
    run = Run(
        obj,
        torch.zeros(31, dtype=F64),
        MethodOptions(method="gradient_descent", learning_rate=1e-7),
        StopCriteria(max_iterations=20, function_tolerance=1e-5),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.FUNCTION_STALLED and not run.stop_reason.converged
    assert len(records) == 2 and records[-1].gradient_max_norm > 0.3
    assert "stalled" in run.message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ftol", [0.0, 1e-6])
def test_a_diverging_fixed_step_is_not_called_a_stall(backend, ftol):
    """Newton's full step x 3 on Rosenbrock grows x geometrically, each step ~1e-8 |x| while
    the loss climbs by ~1e-7 of itself: the stall tests judge only steps that did not raise
    the loss, so the run ends where the loss overflows, not "parameters_stalled" at 1e205."""
    run = Run(
        make_objective("rosenbrock", options={"dim": 2}),
        torch.tensor([-1.2, 1.0], dtype=F64),
        MethodOptions(method="newton", step_policy="fixed", learning_rate=3.0, backend=backend),
        StopCriteria(max_iterations=200, function_tolerance=ftol),
    )
    records = run.run_to_end()
    assert run.stop_reason is StopReason.NON_FINITE, run.message
    assert records[-1].loss > 1e200 and not run.converged
    rises = [b.loss > a.loss for a, b in pairwise(records[5:])]
    assert all(rises)


def test_stall_messages_name_the_change_and_the_gradient_still_above_tolerance():
    """Each stalled stop says what fell below its tolerance and the gradient max-norm that
    kept it from being convergence (the final record's, to 3 significant digits)."""
    obj, _, _ = breast_cancer()
    gd = MethodOptions(method="gradient_descent", learning_rate=1e-7)
    for criteria, reason, head in (
        (
            StopCriteria(max_iterations=20, function_tolerance=1e-5, parameter_tolerance=0.0),
            StopReason.FUNCTION_STALLED,
            "stalled: |loss change| {change:.3g} <= function_tolerance x |loss| ",
        ),
        (
            StopCriteria(max_iterations=20, function_tolerance=0.0, parameter_tolerance=1e-3),
            StopReason.PARAMETERS_STALLED,
            "stalled: step norm {step:.3g} <= parameter_tolerance x (|x| + parameter_tolerance) ",
        ),
    ):
        run = Run(obj, torch.zeros(31, dtype=F64), gd, criteria)
        first, last = run.run_to_end()
        assert run.stop_reason is reason
        clause = f"while the gradient max-norm {last.gradient_max_norm:.3g} > gradient_tolerance"
        change = abs(first.loss - last.loss)
        assert run.message == head.format(change=change, step=first.step_norm) + clause


def test_a_stall_with_the_gradient_test_off_does_not_claim_the_gradient_is_above_it():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    run = Run(
        obj,
        torch.ones(2, dtype=F64),  # the minimum: g = 0, the Newton step is 0
        MethodOptions(method="newton"),
        StopCriteria(max_iterations=5, gradient_tolerance=0.0),
    )
    last = run.run_to_end()[-1]
    assert run.stop_reason is StopReason.PARAMETERS_STALLED and last.gradient_max_norm == 0.0
    assert "> gradient_tolerance" not in run.message
    assert run.message.endswith(
        "(gradient max-norm 0; the gradient test is off: gradient_tolerance 0)"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_unary_lm_step_with_a_damping_past_the_cap_names_the_value_and_the_cap(backend):
    """The damping scales diag H (Marquardt's scaling), so its cap, 1 / eps, needs no H:
    refused at the door, before anything is evaluated."""
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    x = torch.tensor([-1.2, 1.0], dtype=F64)
    cap = 1.0 / float(np.finfo(np.float64).eps)
    options = MethodOptions(
        method="newton", step_policy="levenberg_marquardt", damping=1e20, backend=backend
    )
    with pytest.raises(ValidationError) as err:
        take_step(obj, x, options)
    assert err.value.field == "options.damping"
    assert f"<= 1 / eps = {cap:.3g} (it scales diag H" in str(err.value)
    assert str(err.value).endswith(", got 1e+20")
    # below the cap the same step is a trial, not an error: about g_i / (lambda H_ii) each
    below = MethodOptions(
        method="newton", step_policy="levenberg_marquardt", damping=cap / 2, backend=backend
    )
    result = take_step(obj, x, below)
    g = torch.func.grad(obj.loss)(x)
    diag = torch.func.hessian(obj.loss)(x).diagonal().abs()
    assert bool(((result.params - x).abs() <= 4 * g.abs() / (cap / 2 * diag)).all())


@pytest.mark.parametrize("method", ["newton", "newton_cg"])
def test_float32_runs_stall_at_their_resolution_alike_on_every_backend(method):
    """parameter_tolerance 1e-8 is below float32's eps: steps at the rounding of x never pass
    it, so such runs took rounding-level steps to max_iterations on one backend and stopped
    on an exact 0 step on another; the test is raised to eps and both stop, and say so."""
    gen = np.random.default_rng(0)
    x = gen.normal(size=(60, 4))
    y = ((x @ [1.0, -2, 0.5, 0] + gen.normal(size=60)) > 0).astype(np.float64)
    data = {"X": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32)}
    obj = make_objective("logistic_regression", data, {"l2": 1e-3})
    minimum = logistic_minimum(x, y, 1e-3)
    stops = set()
    for backend in BACKENDS:
        run = Run(
            obj,
            torch.zeros(5),
            MethodOptions(method=method, backend=backend),
            StopCriteria(max_iterations=300, gradient_tolerance=0.0),
        )
        records = run.run_to_end()
        assert run.stop_reason is StopReason.PARAMETERS_STALLED, run.message
        assert len(records) <= 30
        assert "(parameter_tolerance 1e-08 raised to the float32 eps 1.19e-07)" in run.message
        assert records[-1].loss == pytest.approx(minimum, rel=1e-6)
        stops.add(run.stop_reason)
    assert len(stops) == 1
    # float64: 1e-8 is far above eps, as given
    data64 = {"X": torch.tensor(x), "y": torch.tensor(y)}
    run = Run(
        make_objective("logistic_regression", data64, {"l2": 1e-3}),
        torch.zeros(5, dtype=F64),
        MethodOptions(method=method),
        StopCriteria(max_iterations=300, gradient_tolerance=0.0),
    )
    run.run_to_end()
    assert "raised" not in run.message


def test_default_parameter_tolerance_depends_on_the_method():
    gd = StopCriteria().for_method("gradient_descent")
    newton = StopCriteria().for_method("newton")
    assert (gd.function_tolerance, gd.parameter_tolerance) == (0.0, 0.0)
    assert (newton.function_tolerance, newton.parameter_tolerance) == (0.0, 1e-8)
    assert StopCriteria(parameter_tolerance=1e-3).for_method("gradient_descent") == StopCriteria(
        parameter_tolerance=1e-3, gradient_tolerance=1e-10
    )


def test_the_default_gradient_tolerance_is_one_the_dtype_can_meet():
    # 1e-10 in float32 could never be met (the gradient's rounding is a few eps32 ~ 1e-7):
    # a float32 run at its minimum ended "stalled" instead of converged
    assert StopCriteria().for_method("newton", torch.float64).gradient_tolerance == 1e-10
    assert StopCriteria().for_method("newton", torch.float32).gradient_tolerance == 1e-6
    given = StopCriteria(gradient_tolerance=1e-9).for_method("newton", torch.float32)
    assert given.gradient_tolerance == 1e-9


def _f32_logistic(rng):
    """Logistic regression on float32 data (the README tour's model) and its float64 twin."""
    X = rng.normal(size=(500, 5))
    y = (X @ np.array([1.5, -2.0, 0.5, 0.0, 1.0]) + 0.5 * rng.normal(size=500) > 0) * 1.0
    return [
        make_objective(
            "logistic_regression",
            {"X": torch.tensor(X, dtype=dt), "y": torch.tensor(y, dtype=dt)},
            {"l2": 1e-3},
        )
        for dt in (torch.float32, F64)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton", "saddle_free", "newton_cg"])
def test_a_float32_run_at_its_minimum_converges_by_default(rng, backend, method):
    f32, f64 = _f32_logistic(rng)
    options = MethodOptions(method=method, backend=backend)
    reference = Run(f64, torch.zeros(6, dtype=F64), options)
    reference.run_to_end()
    run = Run(f32, torch.zeros(6, dtype=torch.float32), options)
    records = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged, run.message
    assert records[-1].gradient_max_norm <= 1e-6
    # the first-order condition at 1e-6 on this conditioning: x within 1e-4 of float64's
    assert float((run.params.double() - reference.params).abs().max()) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton", "newton_cg"])
def test_float32_steps_of_rounding_noise_end_no_progress_not_at_max_iterations(
    rng, backend, method
):
    # with a gradient tolerance below float32's reach, Newton-CG took 95 of 100 steps at a
    # bit-identical loss (steps of the gradient's rounding noise, each above the cycle
    # test's ulp scale) and ended max_iterations
    X = rng.normal(size=(80, 3))
    labels = rng.integers(0, 3, size=80)
    obj = make_objective(
        "softmax_regression",
        {"X": torch.tensor(X, dtype=torch.float32), "labels": torch.tensor(labels)},
        {"num_classes": 3, "l2": 1e-2},
    )
    options = MethodOptions(method=method, backend=backend)
    run = Run(obj, torch.zeros(12), options, StopCriteria(100, gradient_tolerance=1e-12))
    records = run.run_to_end()
    assert not run.converged and len(records) < 60, run.message
    if method == "newton" and run.stop_reason is StopReason.PARAMETERS_STALLED:
        return  # the dense step is smaller: the parameter test may see it first
    assert run.stop_reason is StopReason.NO_PROGRESS, run.message
    assert "no measurable progress at float32 precision" in run.message
    tail = records[-FLAT_STEPS:]
    low = loss_rounding(tail[0].loss, torch.float32)
    assert all(abs(r.loss - tail[0].loss) <= 2 * low for r in tail)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 2e19), (F64, 1e160)])
def test_the_parameter_test_holds_where_the_norm_of_x_overflows(rng, dtype, scale):
    # ||x||^2 overflows the dtype while x is finite: the test compared the step with inf and
    # stopped a run moving by 5% of |x| a step as parameters_stalled
    b = torch.tensor(rng.uniform(0.5, 1.0, size=3), dtype=dtype)
    obj = make_objective("quadratic", {"A": torch.zeros(3, 3, dtype=dtype), "b": b})
    x0 = torch.full((3,), scale, dtype=dtype)
    lr = 0.05 * scale
    run = Run(
        obj,
        x0,
        MethodOptions(method="gradient_descent", learning_rate=lr),
        StopCriteria(max_iterations=5, parameter_tolerance=1e-3, gradient_tolerance=0.0),
    )
    records = run.run_to_end()
    assert run.stop_reason == StopReason.MAX_ITERATIONS, run.message
    assert len(records) == 6
    moved = ((run.params.double() - x0.double()) / scale).norm() / math.sqrt(3)
    assert 0.1 < float(moved) < 1.0  # five steps of lr |b| against |x0| = scale sqrt(3)


def _mlp_at_a_saddle() -> tuple[Objective, torch.Tensor]:
    """A tanh mlp at zero weights with the output bias at mean(y): the gradient is exactly 0."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(30, 4, generator=gen, dtype=F64)
    y = torch.randn(30, 1, generator=gen, dtype=F64)
    obj = make_objective("mlp", {"X": x, "y": y}, {"layer_sizes": [4, 6, 1]})
    params = torch.zeros(obj.num_params, dtype=F64)
    params[-1] = y.mean()
    return obj, params


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_that_ends_at_a_saddle_says_so(backend):
    obj, params = _mlp_at_a_saddle()
    run = Run(obj, params, MethodOptions(method="newton", backend=backend), StopCriteria())
    (record,) = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE  # the first-order condition holds
    h = torch.func.hessian(obj.loss)(params).numpy()
    evals = np.linalg.eigvalsh(h)
    assert record.end_point == "saddle"
    assert record.negative_eigenvalues == int((evals < -1e-8).sum()) > 0
    # ... but a saddle is not convergence, and the message says why
    assert not run.converged
    assert run.message.startswith("stationary point: gradient max-norm")
    assert f"not a minimum: the Hessian there has {record.negative_eigenvalues} negative" in (
        run.message
    )


def test_a_stationary_point_with_negative_curvature_and_a_zero_eigenvalue_is_not_converged():
    """diag(-1, 0) at 0: g = 0, the second-order test is inconclusive ("flat": a zero
    eigenvalue), yet the negative eigenvalue alone rules a minimum out."""
    a = torch.diag(torch.tensor([-1.0, 0.0], dtype=F64))
    obj = make_objective("quadratic", {"A": a, "b": torch.zeros(2, dtype=F64)})
    run = Run(obj, torch.zeros(2, dtype=F64), MethodOptions(method="newton"))
    (record,) = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and not run.converged
    assert record.end_point == "flat" and record.negative_eigenvalues == 1
    assert run.message.endswith(
        "not a minimum: the Hessian there has 1 negative eigenvalue (semi-definite), so the "
        "run has not converged"
    )


def test_a_newton_run_ending_at_the_minimum_says_minimum():
    obj, x, y = breast_cancer()
    run = Run(obj, torch.zeros(31, dtype=F64), MethodOptions(method="newton"), StopCriteria())
    records = run.run_to_end()
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged
    assert run.message.startswith("converged: ") and "not a minimum" not in run.message
    assert records[-1].end_point == "minimum" and records[-1].negative_eigenvalues == 0
    assert all(r.end_point == "" for r in records[:-1])
    assert records[-1].loss == pytest.approx(logistic_minimum(x, y, 1e-3), rel=1e-12)


# 3b. a line search at machine precision: where the loss cannot judge, the gradient does
def test_below_rounding_is_both_the_predicted_and_the_actual_change_within_rounding():
    from hessian_service.engine.linalg import ROUNDING_ULPS, below_rounding, sufficient_decrease

    loss, eps = 1.3198822356050455, float(np.finfo(np.float64).eps)
    noise = ROUNDING_ULPS * eps * loss
    up = float(np.nextafter(loss, 2.0))  # one ulp above
    tiny, big = -0.5 * noise, -1e-6  # slopes: a decrease below, and far above, rounding
    assert below_rounding(up, loss, 1.0, tiny, torch.float64)
    assert below_rounding(loss - 0.9 * noise, loss, 1.0, tiny, torch.float64)
    assert not below_rounding(loss + 2 * noise, loss, 1.0, tiny, torch.float64)
    assert not below_rounding(up, loss, 1.0, big, torch.float64)
    assert not below_rounding(up, loss, 1.0, 4 * tiny, torch.float64)  # 2 x noise predicted
    assert below_rounding(up, loss, 1e-3, 4 * tiny, torch.float64)  # ... but not at alpha 1e-3
    # float32: the same rule at float32's eps
    f32 = float(np.float32(loss))
    assert below_rounding(float(np.nextafter(np.float32(loss), np.float32(2))), f32, 1.0,
                          -1e-7, torch.float32)  # fmt: skip
    # Armijo itself is strict: an ulp up never passes it, whatever the slope
    assert not sufficient_decrease(up, loss, 1.0, tiny, 1e-4)
    assert sufficient_decrease(loss + 1e-4 * big, loss, 1.0, big, 1e-4)
    assert not sufficient_decrease(math.nan, loss, 1.0, tiny, 1e-4)


def _float32_softmax(seed: int) -> Objective:
    from scipy.special import logsumexp

    gen = np.random.default_rng(seed)
    x, w = gen.normal(size=(300, 4)), gen.normal(size=(4, 3))
    labels = np.array([gen.choice(3, p=np.exp(z - logsumexp(z))) for z in x @ w])
    data = {"X": torch.tensor(x, dtype=torch.float32), "labels": torch.tensor(labels)}
    return make_objective("softmax_regression", data, {"num_classes": 3, "l2": 0.01})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_newton_line_search_takes_no_rise_the_gradient_does_not_justify(seed, backend):
    """At float32's resolution a first trial an ulp or so above the loss is taken only when
    its gradient max-norm at most halves: no run climbs on rounding noise to max_iterations."""
    obj = _float32_softmax(seed)
    run = Run(obj, torch.zeros(15), MethodOptions(method="newton", backend=backend))
    records = run.run_to_end()
    assert run.stop_reason in (StopReason.PARAMETERS_STALLED, StopReason.GRADIENT_TOLERANCE)
    for before, after in pairwise(records):
        if after.loss > before.loss:
            assert before.function_evaluations == 1  # a first trial, judged by its gradient
            assert after.gradient_max_norm <= 0.5 * before.gradient_max_norm
            assert after.loss - before.loss <= 16 * np.finfo(np.float32).eps * before.loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_newton_line_search_converges_where_the_last_step_is_below_rounding(backend):
    """Softmax without intercepts, l2 = 0: the last Newton step's predicted decrease (1e-17)
    is below the loss's rounding, and its trial lands an ulp above; it is taken, not
    backtracked into a parameters_stalled stop at |g| 1e-9."""
    gen = np.random.default_rng(3)
    x, labels = gen.normal(size=(120, 3)), gen.integers(0, 4, 120)
    obj = make_objective(
        "softmax_regression",
        {"X": torch.tensor(x), "labels": torch.tensor(labels)},
        {"num_classes": 4, "l2": 0.0, "fit_intercept": False},
    )
    x0 = torch.zeros(3, 4, dtype=F64)
    x0[-1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    options = MethodOptions(method="newton", backend=backend)
    run = Run(obj, x0.reshape(-1), options)
    records, points = [], []
    for record in run:
        records.append(record)
        points.append(run.checkpoint().params.clone())  # x_k, before its step
    assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged, run.message
    assert records[-2].step_size == 1.0 and records[-2].function_evaluations == 1  # taken
    # a unary step from the same point, whose first trial is a loss alone (the rule then
    # evaluates it whole), is taken the same way
    result = take_step(obj, points[-2], options)
    assert result.record.step_size == 1.0 and result.record.step_accepted
    assert float(torch.func.grad(obj.loss)(result.params).abs().max()) <= 1e-10
    ref = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000)
    ref.fit(x, labels)
    want = -np.mean(ref.predict_log_proba(x)[np.arange(120), labels])
    assert records[-1].loss == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", [1.5, 2.0, 5.0, 50.0])
def test_a_newton_line_search_from_past_the_full_step_tries_it_and_converges(backend, lr):
    """A first trial past 1 backtracked over the Newton step (5, 2.5, 1.25, 0.625...): near
    the minimum the loss could not judge those trials and the run ended no_progress at a
    gradient of 1e-9; and any step below about 2 passes Armijo on a quadratic, so lr 1.5 was
    linear and stalled. The search tries 1 where its trials pass it, and takes it where it
    does at least as well as the longer step Armijo took: runs converge to the minimum
    (L-BFGS-B's for the logistic regression, to 1e-12; lstsq's exact fit; Rosenbrock's)."""
    obj, x, y = breast_cancer()
    gen = np.random.default_rng(4)
    design = gen.normal(size=(60, 5)) * 1000
    truth = gen.normal(size=5)
    fit = make_objective("least_squares", {"X": torch.tensor(design),
                                           "y": torch.tensor(design @ truth)})  # fmt: skip
    cases = [
        (obj, torch.zeros(31, dtype=F64), logistic_minimum(x, y, 1e-3)),
        (fit, torch.zeros(5, dtype=F64), 0.0),
        (make_objective("rosenbrock", options={"dim": 2}), torch.tensor([-1.2, 1.0], dtype=F64),
         0.0),
    ]  # fmt: skip
    for objective, start, minimum in cases:
        options = MethodOptions(method="newton", learning_rate=lr, backend=backend)
        run = Run(objective, start, options, StopCriteria(max_iterations=200))
        records = run.run_to_end()
        assert run.stop_reason is StopReason.GRADIENT_TOLERANCE and run.converged, run.message
        assert records[-1].loss == pytest.approx(minimum, rel=1e-12, abs=1e-20)
        assert 1.0 in [r.step_size for r in records]


@pytest.mark.parametrize("lr", [1.5, 5.0])
def test_a_unary_newton_step_past_the_full_step_is_the_same_on_every_backend(lr):
    """The native fused step takes its first trial when Armijo passes; past 1 the search
    compares it with the full step, so that path steps aside and both backends agree."""
    obj, _, _ = breast_cancer()
    x0 = torch.full((31,), 0.1, dtype=F64)
    steps = [take_step(obj, x0, MethodOptions(method="newton", learning_rate=lr, backend=b))
             for b in BACKENDS]  # fmt: skip
    for step in steps:
        assert step.record.step_size in (1.0, lr) and step.record.step_accepted
    assert len({s.record.step_size for s in steps}) == 1
    for step in steps[1:]:
        torch.testing.assert_close(step.params, steps[0].params, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_float32_exact_fit_whose_loss_is_its_own_noise_stops(backend, method):
    """At a float32 exact fit the loss (~1e-10) is rounding noise of its own size: a full
    CG solve after a partial one rose by 6% of it, which the stall test took for divergence,
    and the run alternated between two points until max_iterations. Rises within the
    trust region's rounding (absolute near 0) are judged; the run stops within a few steps,
    its loss at the float32 noise floor of the exact fit."""
    gen = np.random.default_rng(2)
    design = gen.normal(size=(500, 20)) * 30.0
    y = design @ gen.normal(size=20)
    obj = make_objective("least_squares", {"X": torch.tensor(design, dtype=torch.float32),
                                           "y": torch.tensor(y, dtype=torch.float32)})  # fmt: skip
    run = Run(obj, torch.zeros(20, dtype=torch.float32), MethodOptions(method=method,
              backend=backend), StopCriteria(max_iterations=300))  # fmt: skip
    records = run.run_to_end()
    assert run.stop_reason is not StopReason.MAX_ITERATIONS and len(records) < 50, run.message
    assert records[-1].loss < 1e-8  # float32's floor here is ~1e-10; the start's loss ~1e4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_trust_region_step_from_an_exactly_zero_gradient_is_taken_and_judged(backend, method):
    """At the exact minimum of an mse (gradient exactly 0) every trust-region step (0) was
    rejected, the radius fell to 1e-300 and, with the gradient test off, the stall test never
    ran: max_iterations of nothing. The zero step is taken, and the stall test stops it."""
    target = torch.tensor(np.random.default_rng(0).normal(size=7))
    obj = make_objective("mse", {"target": target})
    run = Run(obj, torch.zeros(7, dtype=F64), MethodOptions(method=method, backend=backend),
              StopCriteria(max_iterations=200, gradient_tolerance=0.0))  # fmt: skip
    records = run.run_to_end()
    assert run.stop_reason is StopReason.PARAMETERS_STALLED and len(records) < 10
    torch.testing.assert_close(run.params, target, rtol=0, atol=1e-15)
    assert records[-2].step_accepted and records[-2].step_norm == 0.0


# 4. globalised default step policies; fixed only on request
def test_newton_defaults_to_a_line_search_and_rosenbrock_never_climbs():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    x0 = torch.tensor([-1.2, 1.0], dtype=F64)
    run = Run(obj, x0, MethodOptions(method="newton"), StopCriteria(max_iterations=100))
    records = run.run_to_end()
    assert run.options.step_policy == "line_search"
    assert all(b.loss <= a.loss for a, b in pairwise(records))
    ref = scipy.optimize.minimize(
        scipy.optimize.rosen, x0.numpy(), jac=scipy.optimize.rosen_der,
        hess=scipy.optimize.rosen_hess, method="trust-exact", options={"gtol": 1e-12},
    )  # fmt: skip
    np.testing.assert_allclose(run.params.numpy(), ref.x, atol=1e-8)
    fixed = Run(obj, x0, MethodOptions(method="newton", step_policy="fixed"), StopCriteria())
    assert max(r.loss for r in fixed.run_to_end()) > 1000  # the full step, as asked


@pytest.mark.parametrize("method", ["newton", "saddle_free", "newton_cg"])
def test_second_order_defaults_are_globalised(method):
    obj = make_objective("rosenbrock", {}, {"dim": 10})
    x0 = torch.full((10,), -1.2, dtype=F64)
    run = Run(obj, x0, MethodOptions(method=method), StopCriteria(max_iterations=300))
    records = run.run_to_end()
    assert run.options.step_policy in ("line_search", "trust_region")
    assert max(r.loss for r in records) == records[0].loss
    assert float(scipy.optimize.rosen(run.params.numpy())) <= records[0].loss


# 5 / D3. Gauss-Newton curvature without a Gauss-Newton form: one refusal everywhere
GN_REFUSAL = "it has no Gauss-Newton form"


@pytest.mark.parametrize("name", ["rosenbrock", "quadratic"])
def test_gauss_newton_without_a_gauss_newton_form_is_refused_at_every_entry(name):
    if name == "rosenbrock":
        obj = make_objective(name, {}, {"dim": 3})
    else:
        obj = make_objective(name, {"A": torch.eye(3, dtype=F64), "b": torch.ones(3, dtype=F64)})
    x = torch.full((3,), 0.3, dtype=F64)
    entries = {
        "options.curvature": [
            lambda: take_step(obj, x, MethodOptions(curvature="gauss_newton")),
            lambda: take_step(
                obj, x, MethodOptions(method="saddle_free", curvature="gauss_newton")
            ),
            lambda: Run(obj, x, MethodOptions(method="newton_cg", curvature="gauss_newton")),
            lambda: dense_curvature(obj, x, MethodOptions(curvature="gauss_newton")),
            lambda: analyze_curvature(obj, x, SpectrumOptions(curvature="gauss_newton")),
        ],
        "options.method": [
            lambda: take_step(obj, x, MethodOptions(method="gauss_newton_cg")),
            lambda: Run(obj, x, MethodOptions(method="gauss_newton_cg")),
        ],
    }
    messages = set()
    for field, calls in entries.items():
        for call in calls:
            with pytest.raises(ValidationError) as err:
                call()
            assert err.value.field == field and GN_REFUSAL in str(err.value)
            messages.add(str(err.value).removeprefix(field))
    assert len(messages) == 1, messages


# 6. eigenvalue counts against a tolerance relative to max|lambda| and the dtype
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_gauss_newton_matrix_has_no_negative_eigenvalues(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=gen, dtype=dtype)
    y = torch.randn(5, 1, generator=gen, dtype=dtype)
    obj = make_objective("mlp", {"X": x, "y": y}, {"layer_sizes": [4, 8, 8, 1]})
    params = 0.5 * torch.randn(obj.num_params, generator=gen, dtype=dtype)
    result = dense_curvature(obj, params, MethodOptions(curvature="gauss_newton"))
    evals = np.linalg.eigvalsh(result.matrix.double().numpy())
    tol = obj.num_params * np.finfo(np.dtype(str(dtype).removeprefix("torch."))).eps
    tol *= np.abs(evals).max()
    assert (evals < 0).any(), "rank <= 5 of 121: rounding puts eigenvalues below 0"
    s = result.summary
    assert s.negative_tolerance == pytest.approx(tol, rel=1e-6)
    assert s.negative_eigenvalues == int((evals < -tol).sum()) == 0
    assert not s.positive_definite
    assert s.condition_number == math.inf  # singular to rounding: rank <= 5


def _dependent_columns(rng, dtype, rows=20_000):
    """X with two columns that are sums of others: every Hessian below is singular."""
    x = rng.standard_normal((rows, 8))
    x[:, 7], x[:, 6] = x[:, 0] - x[:, 1], 2.0 * x[:, 2]
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_hessians_summed_over_many_rows_count_no_rounding_negatives(rng, backend):
    """Softmax (convex) and a linear mlp (least squares: positive semi-definite), float32,
    20,000 rows and dependent columns: the exact Hessians' smallest eigenvalues are 0, the
    float32 sums' come out near -1e-5 x their scale (more than n eps: before, 1 negative was
    counted, the native softmax step said so, and the mlp run ended 'saddle', not converged)."""
    x = _dependent_columns(rng, np.float64)
    labels = rng.integers(0, 3, len(x))
    y = x[:, :3].sum(1, keepdims=True) + 0.5 * rng.standard_normal((len(x), 1))
    cases = {
        "softmax_regression": ({"labels": torch.tensor(labels)}, {"num_classes": 3}),
        "mlp": ({"y": torch.tensor(y)}, {"layer_sizes": [8, 1]}),
    }
    options = MethodOptions(backend=backend)
    for name, (data, extra) in cases.items():
        o64 = make_objective(name, {"X": torch.tensor(x), **data}, extra)
        o32 = make_objective(
            name,
            {
                "X": torch.tensor(x, dtype=torch.float32),
                **{k: v.float() if v.is_floating_point() else v for k, v in data.items()},
            },
            extra,
        )
        at = 0.3 * torch.randn(
            o64.num_params,
            dtype=F64,
            generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))),
        )
        ref = np.linalg.eigvalsh(
            dense_curvature(o64, at, MethodOptions(backend="autograd")).matrix.numpy()
        )
        assert ref[0] >= -1e-12 * ref[-1] and ref[1] <= 1e-12 * ref[-1], ref[:3]  # PSD, singular
        got = dense_curvature(o32, at.float(), options)
        want_tol = max(o32.num_params, math.log2(len(x))) * np.finfo(np.float32).eps
        want_tol *= float(np.abs(np.linalg.eigvalsh(got.matrix.double().numpy())).max())
        assert got.summary.negative_tolerance == pytest.approx(want_tol, rel=1e-5)
        assert got.summary.negative_eigenvalues == 0, (name, got.summary)
        step = take_step(o32, at.float(), MethodOptions(method="newton", backend=backend))
        assert step.record.negative_eigenvalues in (0, -1), (name, step.record)
        run = Run(
            o32, torch.zeros(o32.num_params), MethodOptions(method="newton", backend=backend),
            StopCriteria(max_iterations=50, gradient_tolerance=1e-4),
        )  # fmt: skip
        last = run.run_to_end()[-1]
        assert run.stop_reason is StopReason.GRADIENT_TOLERANCE, (name, run.message)
        assert run.converged and last.end_point in ("minimum", "flat"), (name, run.message)
        assert last.negative_eigenvalues == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_float32_saddle_over_many_rows_is_still_counted(rng, backend):
    """A tanh mlp at W = 0 over 60,000 float32 rows: a real saddle, lambda_min -4e-5 x 2,
    which float32 computes to 1e-8. A tolerance of sqrt(rows) eps max|lambda| (5.8e-5)
    hid it (converged at 'flat'); log2(rows) and n keep it (9.8e-6)."""
    rows = 60_000
    x = rng.standard_normal((rows, 8))
    x -= x.mean(0)
    r = rng.standard_normal(rows)
    design = np.c_[x, np.ones(rows)]
    r -= design @ np.linalg.lstsq(design, r, rcond=None)[0]
    y = (r / r.std() + 2e-5 * x[:, 0])[:, None]

    def mlp(dtype):
        data = {"X": torch.tensor(x, dtype=dtype), "y": torch.tensor(y, dtype=dtype)}
        return make_objective("mlp", data, {"layer_sizes": [8, 4, 1], "activation": "tanh"})

    o64, o32 = mlp(F64), mlp(torch.float32)
    at = torch.zeros(o32.num_params)
    ref = np.linalg.eigvalsh(
        dense_curvature(o64, at.double(), MethodOptions(backend="autograd")).matrix.numpy()
    )
    assert ref[0] < -1e-5 * ref[-1]  # a saddle: clearly negative curvature
    summary = dense_curvature(o32, at, MethodOptions(backend=backend)).summary
    assert summary.negative_eigenvalues == int((ref < -summary.negative_tolerance).sum()) > 0
    run = Run(
        o32,
        at,
        MethodOptions(method="newton", backend=backend),
        StopCriteria(max_iterations=3, gradient_tolerance=1e-4),
    )
    last = run.run_to_end()[-1]
    assert last.end_point == "saddle" and not run.converged, run.message


def test_condition_number_of_a_regular_and_a_singular_matrix():
    gen = np.random.default_rng(12)
    q, _ = np.linalg.qr(gen.normal(size=(20, 20)))
    evals = np.logspace(-6, 3, 20)
    s = spectrum_summary(torch.tensor((q * evals) @ q.T))
    assert s.condition_number == pytest.approx(1e9, rel=1e-6)
    evals[0] = 1e-15  # below 20 eps x 1e3: zero to rounding
    s = spectrum_summary(torch.tensor((q * evals) @ q.T))
    assert s.condition_number == math.inf and not s.positive_definite


def test_clearly_negative_eigenvalues_are_counted():
    gen = np.random.default_rng(11)
    q, _ = np.linalg.qr(gen.normal(size=(30, 30)))
    evals = np.concatenate([-np.logspace(-3, 0, 4), np.zeros(6), np.logspace(-2, 2, 20)])
    matrix = torch.tensor((q * evals) @ q.T)
    s = spectrum_summary(matrix)
    assert s.negative_eigenvalues == 4 and not s.positive_definite
    assert s.min_eigenvalue == pytest.approx(-1.0, rel=1e-10)


# 7. damped Newton on an indefinite Hessian reports what the factorisation learned
@pytest.mark.parametrize("backend", BACKENDS)
def test_damped_newton_reports_negative_eigenvalues_and_the_damping(backend):
    obj = Saddle({}, {})
    for point, negatives, damped in (((0.5, 0.5), 1, True), ((0.5, 2.0), 0, False)):
        x = torch.tensor(point, dtype=F64)
        options = MethodOptions(method="newton", step_policy="fixed", backend=backend)
        record = take_step(obj, x, options).record
        reference = int((np.linalg.eigvalsh(saddle_hessian(*point)) < 0).sum())
        assert record.negative_eigenvalues == reference == negatives
        assert record.step_damped is damped
        assert (record.damping > 0) is damped


# 8. a wrong step policy's error lists every valid one
@pytest.mark.parametrize("method", [m for m in METHODS if m != "auto"])
def test_a_wrong_step_policy_names_every_valid_one(method):
    valid = []
    for policy in STEP_POLICIES:
        try:
            MethodOptions(method=method, step_policy=policy).validated()
            valid.append(policy)
        except ValidationError:
            pass
    assert valid and len(valid) < len(STEP_POLICIES)
    for policy in set(STEP_POLICIES) - set(valid):
        with pytest.raises(ValidationError) as err:
            MethodOptions(method=method, step_policy=policy).validated()
        assert err.value.field == "options.step_policy"
        assert all(repr(v) in str(err.value) for v in valid), str(err.value)


# 9. the softmax gauge: intercepts do not drift along the Hessian's null direction
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_newton_keeps_the_intercepts_centred_and_matches_sklearn(backend, rng):
    n, d, k, l2 = 300, 8, 4, 1e-2
    x = rng.normal(size=(n, d))
    labels = np.arange(n) % k  # every class present
    rng.shuffle(labels)
    data = {"X": torch.tensor(x), "labels": torch.tensor(labels)}
    obj = make_objective("softmax_regression", data, {"l2": l2})
    run = Run(
        obj,
        torch.zeros(obj.num_params, dtype=F64),
        MethodOptions(method="newton", step_policy="fixed", backend=backend),
        StopCriteria(max_iterations=10, **NO_TOL),
    )
    run.run_to_end()
    w = run.params.reshape(d + 1, k).numpy()
    assert abs(w[d].sum()) <= 1e-10  # without the projection it drifts by O(1)
    ref = LogisticRegression(C=1 / (l2 * n), tol=1e-12, max_iter=1000, solver="newton-cholesky")
    ref.fit(x, labels)
    np.testing.assert_allclose(w[:d].T, ref.coef_, atol=1e-7)
    np.testing.assert_allclose(w[d], ref.intercept_ - ref.intercept_.mean(), atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
@pytest.mark.parametrize("l2", [1e-3, 0.0])
def test_hessian_free_softmax_stays_off_the_gauge_in_float32(backend, method, l2, rng):
    """CG runs on the projected curvature: float32 rounding along the singular directions
    (each unpenalised row's class mean) is no "negative curvature" to follow to the trust
    boundary, so the rows keep their starting mean and the fit matches a float64 one."""
    n, d, k = 120, 3, 4
    x = rng.normal(size=(n, d))
    labels = np.arange(n) % k
    rng.shuffle(labels)
    data32 = {"X": torch.tensor(x, dtype=torch.float32), "labels": torch.tensor(labels)}
    obj = make_objective("softmax_regression", data32, {"num_classes": k, "l2": l2})
    run = Run(
        obj,
        torch.zeros(obj.num_params),
        MethodOptions(method=method, backend=backend),
        StopCriteria(max_iterations=60),
    )
    records = run.run_to_end()
    assert not any(r.negative_curvature for r in records)
    w = run.params.reshape(d + 1, k).double().numpy()
    gauge_rows = w if l2 == 0 else w[d:]
    assert np.abs(gauge_rows.mean(axis=1)).max() <= 1e-5  # was 4 to 25 before the projection
    # the float64 minimiser with the same gauge (every class mean of those rows 0)
    data64 = {"X": torch.tensor(x), "labels": torch.tensor(labels)}
    ref = Run(
        make_objective("softmax_regression", data64, {"num_classes": k, "l2": l2}),
        torch.zeros(obj.num_params, dtype=F64),
        MethodOptions(method="newton"),
    )
    ref.run_to_end()
    assert ref.converged
    np.testing.assert_allclose(w, ref.params.reshape(d + 1, k).numpy(), atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saddle_free_counts_no_rounding_negatives_on_any_backend(backend, rng):
    b = rng.normal(size=(5, 30))
    a = b.T @ b  # positive semi-definite, rank 5: 25 eigenvalues at rounding level
    evals = np.linalg.eigvalsh(a)
    assert (evals < 0).any(), "rounding puts some of the 25 zero eigenvalues below 0"
    tol = 30 * np.finfo(np.float64).eps * np.abs(evals).max()
    obj = make_objective(
        "quadratic", {"A": torch.tensor(a), "b": torch.tensor(rng.normal(size=30))}
    )
    options = MethodOptions(method="saddle_free", step_policy="fixed", backend=backend)
    record = take_step(obj, torch.tensor(rng.normal(size=30)), options).record
    assert record.negative_eigenvalues == int((evals < -tol).sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_unary_softmax_newton_step_has_no_gauge_component(backend, rng):
    # the fixed-step NewtonStep (the fused native op under native) projects its step too
    n, d, k = 300, 8, 4
    labels = np.arange(n) % k
    data = {"X": torch.tensor(rng.normal(size=(n, d))), "labels": torch.tensor(labels)}
    obj = make_objective("softmax_regression", data, {"l2": 1e-2})
    x0 = torch.tensor(rng.normal(size=(d + 1) * k))
    options = MethodOptions(method="newton", step_policy="fixed", backend=backend)
    result = take_step(obj, x0, options)
    step = (result.params - x0).reshape(d + 1, k).numpy()
    assert abs(step[d].sum()) <= 1e-10
    assert result.record.step_norm == pytest.approx(np.linalg.norm(step), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_line_search_at_machine_precision_ends_no_progress(backend):
    """float32 Rosenbrock with newton_cg's line search reaches (1, 1) to rounding, where no
    trial passes Armijo's test and the first one's changes are rounding (loss ~1e-13, its
    terms cancel): the run ends no_progress, not converged (the gradient is rounding noise
    above a tolerance of 0), and a NewtonStep from there answers the step not taken. The
    classic start (-1.2, 1) and fresh random ones near it; every search that gives up there
    is a stall at rounding, never line_search_failed."""
    objective = make_objective("rosenbrock", {}, {"dim": 2})
    classic = torch.tensor([-1.2, 1.0])
    starts = [classic] + [classic + 0.1 * torch.randn(2) for _ in range(5)]
    options = MethodOptions(method="newton_cg", step_policy="line_search", backend=backend)
    stalls = 0
    for x0 in starts:
        run = Run(objective, x0, options, StopCriteria(**NO_TOL, max_iterations=300))
        list(run)
        assert run.stop_reason != StopReason.LINE_SEARCH_FAILED, run.message
        if run.stop_reason == StopReason.NO_PROGRESS:
            stalls += 1
            assert not run.converged and "machine precision" in run.message
            assert float((run.params.double() - 1.0).abs().max()) <= 1e-3  # the minimum (1, 1)
            step = take_step(objective, run.params, options)
            assert not step.record.step_accepted and step.record.step_norm == 0.0
            assert torch.equal(step.params, run.params)
    assert stalls >= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_line_search_that_gives_up_on_long_steps_failed(backend, dtype):
    """A search that gave up after a few long trials says nothing of rounding, however small
    the loss: a random SPD quadratic scaled to a loss far below 1 (computed to its own
    precision), first trials 3x too long, one or three backtracks: line_search_failed, and
    NewtonStep refuses the step policy as before."""
    m = torch.randn(3, 3, dtype=F64)
    a = (m @ m.T + torch.eye(3, dtype=F64)) * (1e-7 if dtype == torch.float32 else 1e-16)
    objective = make_objective("quadratic", {"A": a.to(dtype), "b": torch.zeros(3, dtype=dtype)})
    x0 = torch.randn(3, dtype=dtype)
    for backtracks in (1, 3):
        options = MethodOptions(
            method="newton",
            step_policy="line_search",
            learning_rate=3.0,
            backtrack=0.9,
            max_backtracks=backtracks,
            backend=backend,
        )
        run = Run(objective, x0, options, StopCriteria(**NO_TOL, max_iterations=5))
        list(run)
        assert run.stop_reason == StopReason.LINE_SEARCH_FAILED, run.message
        with pytest.raises(ValidationError) as err:
            take_step(objective, x0, options)
        assert err.value.field == "options.step_policy"


def test_a_line_search_stall_is_judged_on_its_first_and_last_trials():
    """The rule behind no_progress for an exhausted search: a descent slope, a last step of
    at most sqrt(eps) lr, and both the first trial and the last changing the loss, as they
    predicted, within 16 ulps of max(|loss|, 1). A first trial that predicted a real
    decrease and went uphill (a wrong or mini-batch slope) is a failure however tiny the
    last step; so is a search that gave up on long steps, and an ascent slope."""
    from hessian_service.engine.solvers.methods import Point, _at_rounding

    loss = float(torch.empty(()).uniform_(0.5, 2.0))
    point = Point(torch.ones(2, dtype=torch.float32), loss, torch.ones(2, dtype=torch.float32))
    eps, tiny = torch.finfo(torch.float32).eps, 2.0**-39
    assert _at_rounding(point, (loss + 2 * eps, loss), tiny, -1e-7, 1.0)
    assert not _at_rounding(point, (loss + 40.0, loss), tiny, -40.0, 1.0)
    assert not _at_rounding(point, (loss + 2 * eps, loss + 2 * eps), 0.5, -1e-7, 1.0)
    assert not _at_rounding(point, (loss, loss), tiny, 1e-7, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        {"method": "newton_cg", "trust_radius": 1e-9},
        {"method": "newton", "step_policy": "levenberg_marquardt", "damping": 1e9},
        {"method": "newton", "step_policy": "levenberg_marquardt", "damping": 1e12},
    ],
    ids=["trust-radius-1e-9", "lm-damping-1e9", "lm-damping-1e12"],
)
def test_a_cautious_start_is_not_a_stall(rng, backend, options):
    """A tiny first trust radius or a huge first damping makes the first good steps tiny;
    the policy then lets go (radius x2, damping / 3 a step). The default parameter test
    (1e-8) stopped such runs PARAMETERS_STALLED after one step (loss 24, max|g| 216 on
    Rosenbrock); now they reach the minimum (1, 1; the float64 reference)."""
    x0 = torch.tensor(rng.uniform(-2.0, 2.0, size=2), dtype=F64)
    run = Run(
        make_objective("rosenbrock", {}, {"dim": 2}),
        x0,
        MethodOptions(backend=backend, **options),
        StopCriteria(max_iterations=500),
    )
    records = run.run_to_end()
    # at the minimum: converged, or a stall there (|g| near Newton-CG's own accuracy)
    np.testing.assert_allclose(run.params.numpy(), np.ones(2), atol=1e-6)
    assert records[-1].gradient_max_norm <= 1e-6, run.message
    assert records[0].step_norm < 1e-6  # the first steps were that small


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        {"method": "newton", "step_policy": "levenberg_marquardt"},
        {"method": "saddle_free", "step_policy": "line_search"},
        {"method": "newton", "step_policy": "line_search", "damping": 2.5},
    ],
    ids=["levenberg-marquardt", "saddle-free-line-search", "damped-newton-line-search"],
)
def test_a_loss_unbounded_below_ends_non_finite_on_every_backend(rng, backend, options):
    """A float32 quadratic with an indefinite A: the loss runs to -inf. A trial that
    overflowed to -inf was rejected like a bad one, so the same run ended NON_FINITE on one
    backend and NO_PROGRESS (damping at its cap) or LINE_SEARCH_FAILED on the other, both
    claiming the loss could not be lowered; now the trial is taken and the run stops
    NON_FINITE, its last record the last finite point."""
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    a = q @ np.diag([2.0, -rng.uniform(0.5, 2.0), 3.0]) @ q.T
    obj = make_objective(
        "quadratic",
        {"A": torch.tensor(a, dtype=torch.float32),
         "b": torch.tensor(rng.standard_normal(3), dtype=torch.float32)},
    )  # fmt: skip
    run = Run(obj, torch.zeros(3), MethodOptions(backend=backend, **options),
              StopCriteria(max_iterations=1000))  # fmt: skip
    records = run.run_to_end()
    assert run.stop_reason == StopReason.NON_FINITE, run.message
    assert math.isfinite(records[-1].loss) and records[-1].loss < -1e30


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_on_an_indefinite_hessian_with_a_tiny_diagonal_keeps_stepping(rng, backend):
    """Scaled by its diagonal (1e-20), H = [[1e-20, 1], [1, 1e-20]] has off-diagonal 1e20:
    the Cholesky raised lambda to ~1e20, past a cap of 1 / eps computed from the diagonal
    alone, and the next iteration ended NO_PROGRESS "at machine precision" though the loss
    (unbounded below) fell at every step. The cap counts the scaled matrix's norm."""
    a = np.array([[1e-20, 1.0], [1.0, 1e-20]])
    b = rng.standard_normal(2)
    obj = make_objective("quadratic", {"A": torch.tensor(a), "b": torch.tensor(b)})
    options = MethodOptions(method="newton", step_policy="levenberg_marquardt", backend=backend)
    run = Run(obj, torch.tensor(rng.standard_normal(2)), options, StopCriteria(max_iterations=30))
    records = run.run_to_end()
    assert run.stop_reason != StopReason.NO_PROGRESS, run.message
    accepted = [r for r in records if r.step_accepted]
    assert len(accepted) >= 10 and records[-1].loss < records[0].loss


def test_slow_float32_gradient_descent_is_not_called_no_progress(rng):
    # each step lowered the gradient by less than its float32 rounding: ten steps set no new
    # low and the run ended no_progress at 16,225 iterations, still tracking its float64 twin
    f32, _ = _f32_logistic(rng)
    options = MethodOptions(method="gradient_descent")
    run = Run(f32, torch.zeros(6, dtype=torch.float32), options,
              StopCriteria(max_iterations=20000, gradient_tolerance=1e-12))  # fmt: skip
    records = run.run_to_end()
    # it goes on until its steps truly cycle at rounding (or to max_iterations), well past
    # the gradient of 2e-5 where the flat test stopped it
    assert "no measurable progress" not in run.message, run.message
    assert records[-1].gradient_max_norm <= 1e-5, run.message
