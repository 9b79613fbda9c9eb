"""Methods and step policies: Newton, Levenberg-Marquardt, line search, saddle-free, GD."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hessian_service.engine import (
    MethodOptions,
    Run,
    StopCriteria,
    StopReason,
    ValidationError,
    make_objective,
    take_step,
)
from hessian_service.engine.linalg import damped_cholesky_solve, saddle_free_direction
from problems import NO_TOL, Saddle, breast_cancer, random_params, random_problem

F64 = torch.float64


def test_newton_lr1_solves_quadratic_in_one_step():
    obj = random_problem("quadratic", size=30)
    a, b = obj.data["A"].double(), obj.data["b"].double()
    result = take_step(obj, random_params(obj), MethodOptions(method="newton"))
    expected = torch.linalg.solve(a, b)
    assert float((result.params - expected).norm() / expected.norm()) <= 1e-10


def test_newton_lr1_solves_least_squares_in_one_step():
    obj = random_problem("least_squares", size=12)
    x0 = random_params(obj)
    result = take_step(obj, x0, MethodOptions(method="newton"))
    grad = torch.func.grad(obj.loss)(result.params)
    assert float(grad.abs().max()) <= 1e-12
    assert result.record.loss == pytest.approx(float(obj.loss(x0)), rel=1e-14)
    assert result.record.step_accepted and result.record.solver_attempts == 1


def test_fixed_newton_step_is_minus_lr_hinv_g():
    obj = random_problem("logistic_regression")
    x = random_params(obj)
    h = torch.func.hessian(obj.loss)(x)
    g = torch.func.grad(obj.loss)(x)
    result = take_step(obj, x, MethodOptions(method="newton", learning_rate=0.3))
    expected = x - 0.3 * torch.linalg.solve(h, g)
    assert float((result.params - expected).norm() / expected.norm()) <= 1e-12
    assert result.record.step_size == 0.3


def test_gradient_descent_step():
    obj = random_problem("softmax_regression")
    x = random_params(obj)
    result = take_step(obj, x, MethodOptions(method="gradient_descent", learning_rate=0.05))
    expected = x - 0.05 * torch.func.grad(obj.loss)(x)
    assert float((result.params - expected).abs().max()) <= 1e-14
    assert result.record.negative_eigenvalues == -1


def test_levenberg_marquardt_logistic_breast_cancer():
    obj, _, _ = breast_cancer()
    options = MethodOptions(method="newton", step_policy="levenberg_marquardt")
    stopping = StopCriteria(max_iterations=15, **NO_TOL)
    records = Run(obj, torch.zeros(obj.num_params, dtype=F64), options, stopping).run_to_end()
    assert min(r.gradient_norm for r in records) <= 1e-8
    losses = [r.loss for r in records]
    assert all(b <= a + 1e-15 for a, b in pairwise(losses))


def test_levenberg_marquardt_rosenbrock():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    x0 = torch.tensor([-1.2, 1.0], dtype=F64)
    run = Run(
        obj,
        x0,
        MethodOptions(method="newton", step_policy="levenberg_marquardt"),
        StopCriteria(max_iterations=100, **NO_TOL),
    )
    records = run.run_to_end()
    assert min(r.loss for r in records) <= 1e-12
    assert float((run.params - 1).abs().max()) <= 1e-5
    assert any(not r.step_accepted for r in records[:-1]) or records[-1].iteration < 100


def test_line_search_satisfies_armijo_and_descends():
    obj = make_objective("rosenbrock", {}, {"dim": 4})
    run = Run(
        obj,
        obj.init_params(),
        MethodOptions(method="newton", step_policy="line_search"),
        StopCriteria(max_iterations=100),
    )
    records = run.run_to_end()
    assert run.stop_reason.converged
    assert records[-1].loss <= 1e-16
    for a, b in pairwise(records):
        assert b.loss <= a.loss


def test_saddle_free_escapes_where_newton_converges_to_saddle():
    obj = Saddle({}, {})
    start = torch.tensor([0.3, 0.05], dtype=F64)
    stopping = StopCriteria(max_iterations=50)
    x = start.clone()
    for _ in range(50):  # plain Newton, x <- x - H^-1 g, as the seed does it
        x = x - torch.linalg.solve(torch.func.hessian(obj.loss)(x), torch.func.grad(obj.loss)(x))
    assert float(x.norm()) <= 1e-12, "plain Newton is attracted to the saddle"
    damped = Run(obj, start, MethodOptions(method="newton"), stopping)
    first = next(iter(damped))
    assert first.damping > 0 and first.solver_attempts > 1, "indefinite H is damped, not inverted"
    sf = Run(
        obj,
        start,
        MethodOptions(method="saddle_free", step_policy="line_search"),
        StopCriteria(max_iterations=50, **{**NO_TOL, "gradient_tolerance": 1e-12}),
    )
    records = sf.run_to_end()
    assert records[0].negative_eigenvalues == 1
    assert float(sf.params[0].abs()) <= 1e-6
    assert float(sf.params[1].abs()) == pytest.approx(math.sqrt(2), rel=1e-8)
    assert records[-1].loss == pytest.approx(-1.0, rel=1e-12)
    assert records[-2].negative_eigenvalues == 0, "near the minimum H is positive definite"


def test_damped_cholesky_escalates_on_indefinite_and_singular():
    torch.manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=F64))
    for evals in (
        torch.linspace(-3, 5, 20, dtype=F64),
        torch.cat([torch.zeros(5), torch.ones(15)]).double(),
    ):
        h = q @ torch.diag(evals) @ q.T
        g = torch.randn(20, dtype=F64)
        res = damped_cholesky_solve(h, g)
        assert res.attempts > 1 and res.damping > 0
        assert bool(torch.isfinite(res.direction).all())
        resid = (h + res.damping * torch.eye(20, dtype=F64)) @ res.direction + g
        assert float(resid.norm() / g.norm()) <= 1e-8
        assert float(g @ res.direction) < 0, "a damped PD solve gives a descent direction"


def test_saddle_free_direction_matches_eigen_formula():
    torch.manual_seed(3)
    m = torch.randn(9, 9, dtype=F64)
    h = (m + m.T) / 2
    g = torch.randn(9, dtype=F64)
    evals, evecs = torch.linalg.eigh(h)
    expected = -evecs @ torch.diag(1 / evals.abs()) @ evecs.T @ g
    res = saddle_free_direction(h, g, 1e-12)
    assert float((res.direction - expected).norm() / expected.norm()) <= 1e-10
    assert res.negative_eigenvalues == int((evals < 0).sum())


def test_gauss_newton_curvature_option():
    obj = random_problem("mlp")
    x = random_params(obj)
    result = take_step(
        obj, x, MethodOptions(method="newton", curvature="gauss_newton", step_policy="line_search")
    )
    assert result.record.loss_change == 0.0
    assert float(obj.loss(result.params)) < float(obj.loss(x))


@pytest.mark.parametrize("name", ["mse", "least_squares", "quadratic"])
def test_newton_fixed_records_describe_the_step(name):
    obj = random_problem(name)
    x = random_params(obj)
    result = take_step(obj, x, MethodOptions(method="newton", learning_rate=0.5))
    g = torch.func.grad(obj.loss)(x)
    assert result.record.gradient_norm == pytest.approx(float(g.norm()), rel=1e-12)
    assert result.record.gradient_max_norm == pytest.approx(float(g.abs().max()), rel=1e-12)
    assert result.record.step_norm == pytest.approx(float((result.params - x).norm()), rel=1e-12)


def test_point_is_finite_matches_the_entrywise_test_on_every_kind_of_entry():
    """The curvature test by one sum agrees with isfinite on fresh random matrices with
    inf, -inf, NaN (alone, together) and with finite entries whose sum overflows."""
    from hessian_service.engine.solvers.methods import Point

    gen = torch.Generator().manual_seed(1313)
    for trial in range(200):
        n = int(torch.randint(2, 40, (), generator=gen))
        h = torch.randn(n, n, dtype=F64, generator=gen)
        kind = trial % 5
        if kind == 1:  # finite entries near the largest double: the sum overflows to inf
            h = h.abs() * 1e-3 + torch.finfo(F64).max * 0.9
            assert not math.isfinite(float(h.sum()))
        bad = [math.inf, -math.inf, math.nan]
        for value in bad if kind == 2 else [bad[kind - 2]] if kind > 2 else []:
            i, j = (int(v) for v in torch.randint(0, n, (2,), generator=gen))
            h[i, j] = value
        point = Point(torch.zeros(n, dtype=F64), 1.0, torch.ones(n, dtype=F64), h)
        assert point.is_finite() is bool(torch.isfinite(h).all()), (trial, kind)


def _exact_sum(x: float, alpha: float, d: float) -> float:
    """x + alpha d rounded once (exact rational arithmetic)."""
    from fractions import Fraction

    return float(Fraction(x) + Fraction(alpha) * Fraction(d))


@pytest.mark.parametrize("policy", ["fixed", "line_search"])
def test_gradient_descent_step_is_x_minus_lr_g_rounded_once(policy):
    """The step x - lr g is one torch.add (the native fused step's op), and where ATen's CPU
    kernels have FMA every entry is the exactly rounded value (two roundings, lr g then the
    sum, miss it for some entries when lr g is as large as x)."""
    obj = random_problem("mse", size=1000)  # a convex quadratic, Hessian 2/n I in n = 3,000
    x = random_params(obj)
    lr = obj.num_params * (0.2 + 0.2 * float(torch.rand(())))  # 40-80% of the way to the minimum
    result = take_step(
        obj, x, MethodOptions(method="gradient_descent", learning_rate=lr, step_policy=policy)
    )
    assert result.record.step_size == lr  # the first trial taken
    g = torch.func.grad(obj.loss)(x)
    assert torch.equal(result.params, torch.add(x, g, alpha=-lr))
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("ATen's DEFAULT CPU kernels round lr g and the sum separately")
    want = [_exact_sum(a, -lr, b) for a, b in zip(x.tolist(), g.tolist(), strict=True)]
    assert result.params.tolist() == want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 25, 64, 65, 300])
def test_first_order_gradient_norms_against_float64(dtype, n):
    """GD records' norms (Python floats up to 64 entries, torch past it) against a float64
    reference; a NaN or inf anywhere in the gradient gives a non-finite max-norm, so the
    run stops NON_FINITE instead of reporting a finite gradient."""
    from hessian_service.engine.solvers.methods import Point

    g = torch.randn(n, dtype=dtype) * 10.0 ** float(torch.randint(-5, 5, ()))
    ref = g.double()
    two, inf = Point(torch.zeros(n, dtype=dtype), 0.0, g).grad_norms
    tol = 4 * torch.finfo(dtype).eps
    assert two == pytest.approx(float(ref.norm()), rel=tol)
    assert inf == float(ref.abs().max())  # exact: the largest magnitude itself
    for bad in (math.nan, math.inf, -math.inf):
        h = g.clone()
        h[int(torch.randint(0, n, ()))] = bad
        two, inf = Point(torch.zeros(n, dtype=dtype), 0.0, h).grad_norms
        assert not math.isfinite(inf) and not math.isfinite(two)
        assert math.isnan(inf) == math.isnan(bad)


def test_loss_and_grad_under_no_grad_gives_the_same_and_leaves_grad_mode_off():
    from hessian_service.engine import loss_and_grad

    obj = random_problem("logistic_regression")
    x = random_params(obj)
    loss, grad = loss_and_grad(obj, x)
    with torch.no_grad():
        loss2, grad2 = loss_and_grad(obj, x)
        assert not torch.is_grad_enabled()
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert not (x.requires_grad or grad.requires_grad or loss.requires_grad)
    ref = torch.func.grad(obj.loss)(x.double())
    assert float((grad2.double() - ref).abs().max()) <= 1e-12 * max(1.0, float(ref.abs().max()))


def test_record_fields_land_in_their_own_fields():
    """_record builds StepRecord positionally: every Step field, the point's values and the
    backend land in the field of their own name (a field inserted into StepRecord would
    shift them)."""
    import dataclasses

    from hessian_service.engine.records import StepRecord
    from hessian_service.engine.solvers.methods import Point, Step
    from hessian_service.engine.solvers.run import _record

    values = iter(range(100, 200))
    step_values = {}
    for f in dataclasses.fields(Step):
        if f.name == "x_new":
            step_values[f.name] = torch.zeros(2)
        elif f.type in ("bool", bool):
            step_values[f.name] = True
        else:
            step_values[f.name] = float(next(values))
    step = Step(**step_values)
    point = Point(torch.zeros(2, dtype=torch.float64), 7.0, torch.tensor([3.0, -4.0]))
    record = _record(5, point, 9.0, "native", step)
    renamed = {"accepted": "step_accepted"}
    # Run._stop_test's and its flat-step count's, not a record's
    internal = ("x_new", "held_back", "partial_solve", "loss_noise")
    want = {renamed.get(k, k): v for k, v in step_values.items() if k not in internal}
    want.update(iteration=5, loss=7.0, loss_change=2.0, gradient_norm=5.0,
                gradient_max_norm=4.0, backend="native")  # fmt: skip
    got = dataclasses.asdict(record)
    assert {k: got[k] for k in want} == want
    untouched = {f.name for f in dataclasses.fields(StepRecord)} - set(want)
    defaults = dataclasses.asdict(StepRecord(iteration=0, loss=0.0))
    assert {k: got[k] for k in untouched} == {k: defaults[k] for k in untouched}
    stopped = _record(5, point, None, "native", None)
    assert dataclasses.asdict(stopped) == {**defaults, "iteration": 5, "loss": 7.0,
        "gradient_norm": 5.0, "gradient_max_norm": 4.0, "backend": "native"}  # fmt: skip


def test_a_backend_environment_naming_no_backend_is_refused_under_its_name(monkeypatch):
    """$HESSIAN_BACKEND serves calls that name no backend; a bad value is its own error."""
    objective = random_problem("quadratic")
    x = random_params(objective)
    monkeypatch.setenv("HESSIAN_BACKEND", "bogus")
    with pytest.raises(ValidationError, match=r"\$HESSIAN_BACKEND: expected one of") as info:
        take_step(objective, x, MethodOptions(method="newton"))
    assert info.value.field == "$HESSIAN_BACKEND"
    step = take_step(objective, x, MethodOptions(method="newton", backend="autograd"))
    assert step.record.backend == "autograd"


@pytest.mark.parametrize("method", ["newton", "gradient_descent"])
def test_a_learning_rate_whose_every_trial_overflows_is_named(rng, method):
    """NewtonStep with learning_rate 1e308: every backtrack's loss overflowed and the
    refusal blamed options.step_policy ("no step satisfied the Armijo condition")."""
    objective = random_problem("logistic_regression")
    x = random_params(objective)
    policy = {"step_policy": "line_search"}  # gradient descent's default is the fixed step
    options = MethodOptions(method=method, learning_rate=1e308, **policy).validated()
    with pytest.raises(ValidationError) as err:
        take_step(objective, x, options)
    assert err.value.field == "options.learning_rate"
    assert "a smaller learning_rate" in str(err.value)
    run = Run(objective, x, options, StopCriteria(max_iterations=3))
    records = list(run)
    assert run.stop_reason == StopReason.LINE_SEARCH_FAILED and len(records) == 1
    assert "a smaller learning_rate" in run.message


@pytest.mark.parametrize("backend", ["native", "autograd"])
@pytest.mark.parametrize("method", ["newton", "gradient_descent"])
def test_a_huge_finite_step_records_its_finite_norm(backend, method):
    """A step of ~1e160 per entry, whose squares overflow float64: the record said
    step_norm = inf for a finite step (both backends); the norm is rescaled by max|d| where
    the sum of squares overflows, as a reference computed exactly by scaling."""
    n = 6
    scale = 1e-160 if method == "newton" else 1.0  # newton: d = A^-1 b ~ 1e160
    A = scale * torch.eye(n, dtype=F64)
    b = (torch.rand(n, dtype=F64) + 0.5) * (1.0 if method == "newton" else 1e160)
    obj = make_objective("quadratic", {"A": A, "b": b}, {})
    x0 = torch.zeros(n, dtype=F64)
    options = MethodOptions(method=method, step_policy="fixed", learning_rate=1.0, backend=backend)
    result = take_step(obj, x0, options)
    step = (result.params - x0).tolist()
    top = max(map(abs, step))
    assert all(math.isfinite(v) for v in step) and top > 1e154  # its squares overflow
    reference = top * math.hypot(*(v / top for v in step))
    assert result.record.step_norm == pytest.approx(reference, rel=1e-12)
