"""The native backend inside the engine: selection, fallback, the fused step, runs.

The fused unary Newton step (run.take_step, fixed policy) must give the autograd engine's
step and record; auto must pick native where it assembles, closed-form (mlp) or autograd
assembly plus the native solve elsewhere, and a missing extension must log its real error
and fall back.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import hessian_service
import pytest
import torch
from hessian_service.engine import (
    MethodOptions,
    ResourceLimitError,
    Run,
    StopCriteria,
    UnavailableError,
    ValidationError,
    make_objective,
    take_step,
)
from hessian_service.engine.backends import selector as backends
from hessian_service.engine.backends.native.fused import fused_newton_step
from hessian_service.engine.records import StepRecord
from hessian_service.engine.solvers import run as run_module
from native_support import F32, F64, TOL, objective_of_size, rel_err, require_native
from problems import random_params, random_problem

require_native()
ASSEMBLED = ("mse", "quadratic", "least_squares", "logistic_regression", "softmax_regression")
NO_TOL = StopCriteria(
    max_iterations=6, gradient_tolerance=0.0, function_tolerance=0.0, parameter_tolerance=0.0
)
STEP_FIELDS = (
    "loss",
    "gradient_norm",
    "gradient_max_norm",
    "step_norm",
    "step_size",
    "damping",
    "solver_attempts",
    "negative_eigenvalues",
    "function_evaluations",
    "step_accepted",
    "iteration",
    "loss_change",
)


def _assert_records_close(native, auto, tol):
    for field in STEP_FIELDS:
        a, b = getattr(native, field), getattr(auto, field)
        if isinstance(b, float) and not math.isnan(b):
            assert a == pytest.approx(b, rel=tol, abs=tol), field
        else:
            assert a == b, field


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize("name", ASSEMBLED)
@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_auto_picks_native_where_it_assembles(name, kind):
    obj = random_problem(name)
    resolved = backends.resolve("auto", obj, random_params(obj), kind)
    expected = "native" if kind == "hessian" or obj.supports_ggn else "autograd+native-solve"
    assert resolved.label == expected


@pytest.mark.parametrize(("name", "system"), [("mlp", "closed_form"), ("rosenbrock", "autograd")])
def test_objectives_without_native_assembly_still_get_the_native_solve(name, system):
    obj = random_problem(name)
    for kind in ("hessian", "gauss_newton") if obj.supports_ggn else ("hessian",):
        for requested in ("auto", "native"):
            resolved = backends.resolve(requested, obj, random_params(obj), kind)
            assert resolved.label == f"{system}+native-solve"
            assert resolved.system.name == system and resolved.solver.name == "native"
    assert backends.resolve("autograd", obj, random_params(obj), "hessian").label == "autograd"


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_mlp_closed_form_system_matches_autograd(kind):
    obj = random_problem("mlp")
    p = random_params(obj)
    resolved = backends.resolve("auto", obj, p, kind)
    loss, g, h = resolved.system.newton_system(obj, p, kind, None)
    ref = backends.AUTOGRAD.newton_system(obj, p, kind, None)
    for got, want in zip((loss, g, h), ref, strict=True):
        assert rel_err(got, want) <= 1e-12


def test_records_name_the_backend_that_ran():
    obj = random_problem("rosenbrock")
    rec = take_step(obj, obj.init_params(), MethodOptions(backend="auto")).record
    assert rec.backend == "autograd+native-solve"
    obj = random_problem("logistic_regression")
    for backend, label in (("auto", "native"), ("native", "native"), ("autograd", "autograd")):
        for policy in ("fixed", "line_search"):
            opts = MethodOptions(backend=backend, step_policy=policy)
            assert take_step(obj, random_params(obj), opts).record.backend == label
            run = Run(obj, random_params(obj), opts, NO_TOL)
            assert {r.backend for r in run} == {label}


def test_environment_selects_backend(monkeypatch):
    obj = random_problem("mse")
    p = random_params(obj)
    monkeypatch.setenv("HESSIAN_BACKEND", "autograd")
    assert take_step(obj, p).record.backend == "autograd"
    monkeypatch.setenv("HESSIAN_BACKEND", "native")
    assert take_step(obj, p).record.backend == "native"
    assert take_step(obj, p, MethodOptions(backend="autograd")).record.backend == "autograd"


def _without_native(monkeypatch):
    """Make the extension's import fail as a broken build would, for this test only."""
    monkeypatch.setitem(sys.modules, "hessian_service._C", None)
    monkeypatch.delattr(hessian_service, "_C", raising=False)
    for module in (
        "hessian_service.engine.backends.native.dense",
        "hessian_service.engine.backends.native.ops",
    ):
        monkeypatch.delitem(sys.modules, module, raising=False)
    backends._load_native.cache_clear()


@pytest.fixture
def no_native(monkeypatch):
    _without_native(monkeypatch)
    yield
    monkeypatch.undo()
    backends._load_native.cache_clear()
    assert backends.native_status()[0]


def test_missing_extension_logs_real_error_once_and_falls_back(no_native, caplog):
    obj = random_problem("least_squares")  # a fresh objective: no cached fused plan
    with caplog.at_level(logging.WARNING, logger="hessian_service.engine.backends.selector"):
        available, reason = backends.native_status()
        auto = MethodOptions(backend="auto")  # explicit: HESSIAN_BACKEND may say native
        rec = take_step(obj, random_params(obj), auto).record
        take_step(obj, random_params(obj), auto)
    assert not available and "ModuleNotFoundError" in reason and "hessian_service._C" in reason
    assert rec.backend == "autograd"
    warnings = [r for r in caplog.records if "native backend unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0].getMessage()


def test_missing_extension_keeps_the_mlp_closed_form_assembly(no_native):
    obj = random_problem("mlp")
    rec = take_step(obj, random_params(obj), MethodOptions(backend="auto")).record
    assert rec.backend == "closed_form+autograd-solve"


def test_native_requested_but_unavailable_raises(no_native):
    obj = random_problem("quadratic")
    with pytest.raises(UnavailableError) as err:
        take_step(obj, random_params(obj), MethodOptions(backend="native"))
    assert err.value.field == "backend" and "ModuleNotFoundError" in str(err.value)


# ---------------------------------------------------------------- the fused take_step


def _cases():
    for name in ASSEMBLED:
        for n in (1, 2, 25, 64, 65, 300):
            if name == "softmax_regression" and n == 1:
                continue
            for dtype in (F64, F32):
                yield pytest.param(name, n, dtype, id=f"{name}-{n}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("name", "n", "dtype"), list(_cases()))
def test_fused_take_step_equals_autograd_take_step(name, n, dtype):
    obj = objective_of_size(name, n, dtype)
    p = 0.3 * torch.randn(n, dtype=dtype)
    opts = {"learning_rate": 0.5, "damping": 0.01}
    native = take_step(obj, p, MethodOptions(backend="native", **opts))
    auto = take_step(obj, p, MethodOptions(backend="autograd", **opts))
    assert native.record.backend == "native" and auto.record.backend == "autograd"
    assert native.params.shape == auto.params.shape == (n,)
    tol = 10 * TOL[dtype]
    assert rel_err(native.params - p, auto.params - p) <= tol
    _assert_records_close(native.record, auto.record, tol)
    assert native.method == auto.method == "newton"


def test_seed_shaped_params_and_requires_grad_take_the_fused_path():
    target = torch.rand(5, 5, dtype=F64)
    obj = make_objective("mse", {"target": target})
    p = torch.rand(5, 5, dtype=F64, requires_grad=True)
    res = take_step(obj, p, MethodOptions(learning_rate=0.1, backend="native"))
    ref = take_step(obj, p, MethodOptions(learning_rate=0.1, backend="autograd"))
    assert res.params.shape == (25,) and not res.params.requires_grad
    assert rel_err(res.params, ref.params) <= 1e-15
    assert res.params.data_ptr() != p.data_ptr()


def test_fused_path_keeps_the_general_path_errors():
    obj = make_objective("mse", {"target": torch.rand(4, dtype=F64)})
    nan = torch.tensor([0.0, float("nan"), 1.0, 2.0], dtype=F64)
    with pytest.raises(ValidationError) as err:
        take_step(obj, nan, MethodOptions(backend="native"))
    assert err.value.field == "params"
    with pytest.raises(ValidationError) as err:
        take_step(obj, torch.zeros(5, dtype=F64), MethodOptions(backend="native"))
    assert err.value.field == "params"
    with pytest.raises(ResourceLimitError):
        take_step(obj, torch.zeros(4, dtype=F64), MethodOptions(dense_budget_bytes=64))
    # float32 params for a float64 problem are converted (general path), same answer
    p = torch.rand(4, dtype=F32)
    a = take_step(obj, p, MethodOptions(backend="native"))
    b = take_step(obj, p.double(), MethodOptions(backend="native"))
    assert a.params.dtype == F64 and rel_err(a.params, b.params) <= 1e-14


def test_fused_indefinite_quadratic_records_damping_like_autograd():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    a = (q * torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0, 4.0], dtype=F64)) @ q.T
    obj = make_objective("quadratic", {"A": a, "b": torch.randn(6, dtype=F64)})
    p = torch.randn(6, dtype=F64)
    native = take_step(obj, p, MethodOptions(backend="native"))
    auto = take_step(obj, p, MethodOptions(backend="autograd"))
    assert native.record.solver_attempts == auto.record.solver_attempts > 1
    _assert_records_close(native.record, auto.record, 1e-12)


# ---------------------------------------------------------------- the fused line search

# Every StepRecord field but the timings; these must be the same bits on both paths.
RECORD_FIELDS = [f.name for f in dataclasses.fields(StepRecord) if not f.name.endswith("_seconds")]


@pytest.fixture
def fused_calls(monkeypatch):
    """Spy on run.take_step's fused path: what it returned, per call (None: general path)."""
    calls = []

    def spy(*args):
        calls.append(fused_newton_step(*args))
        return calls[-1]

    monkeypatch.setattr(run_module, "fused_newton_step", spy)
    return calls


def _general_step(monkeypatch, obj, p, opts):
    """take_step with the fused path switched off: the general line-search path."""
    with monkeypatch.context() as m:
        m.setattr(run_module, "fused_newton_step", lambda *args: None)
        return take_step(obj, p, opts)


def _assert_same_bits(got, want, fields):
    for field in fields:
        a, b = getattr(got.record, field), getattr(want.record, field)
        assert a == b or (a != a and b != b), field  # NaN == NaN here (gain_ratio)
    assert got.params.dtype == want.params.dtype and torch.equal(got.params, want.params)
    assert got.method == want.method


def _line_search_cases():
    for name in ASSEMBLED:
        for n in (2, 25, 65):
            for dtype in (F64, F32):
                yield pytest.param(name, n, dtype, id=f"{name}-{n}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("name", "n", "dtype"), list(_line_search_cases()))
def test_fused_line_search_step_is_the_general_path_bit_for_bit(
    monkeypatch, fused_calls, name, n, dtype
):
    """Default newton (line search, first trial 1): the fused op plus one loss at x + d gives
    the record and parameters of the general native path, bit for bit, on fresh problems
    (n = 65 takes the LAPACK solve). mse's direction is its closed form (2/n)^-1 g, not the
    Cholesky solve, and its loss and gradient are one loop of its own, so those fields agree
    to 8 eps instead; an objective with a gauge (softmax with intercepts or l2 = 0) fills it
    in before its solve and projects its step, on the general path."""
    obj = objective_of_size(name, n, dtype)
    p = 0.3 * torch.randn(n, dtype=dtype)
    damping = 0.0 if n == 2 else 0.1 * float(torch.rand(()))  # records 0 / -1 negatives
    opts = MethodOptions(backend="native", damping=damping)
    fused = take_step(obj, p, opts)
    general = _general_step(monkeypatch, obj, p, opts)
    assert general.record.step_size == 1.0 and general.record.function_evaluations == 1
    if obj.has_gauge:
        assert fused_calls == [None]
        _assert_same_bits(fused, general, RECORD_FIELDS)
        return
    assert fused_calls[0] is not None, "the fused op served the line search"
    if name != "mse":
        _assert_same_bits(fused, general, RECORD_FIELDS)
        return
    rounded = {"loss", "gradient_norm", "gradient_max_norm", "step_norm"}
    exact = [f for f in RECORD_FIELDS if f not in rounded]
    for field in exact:
        a, b = getattr(fused.record, field), getattr(general.record, field)
        assert a == b or (a != a and b != b), field
    tol = 8 * torch.finfo(dtype).eps
    for field in rounded:
        assert getattr(fused.record, field) == pytest.approx(
            getattr(general.record, field), rel=tol
        )
    assert rel_err(fused.params - p, general.params - p) <= tol


@pytest.mark.parametrize("dtype", [F64, F32])
def test_a_rejected_first_trial_falls_back_to_the_general_search(monkeypatch, fused_calls, dtype):
    """Newton's full step overshoots on a logistic regression started far on the wrong side
    (tiny curvature, l2 = 0.01): the fused path declines and the general path backtracks,
    with the general path's record bit for bit."""
    x = torch.rand(40, 2, dtype=dtype) + 0.5
    obj = make_objective(
        "logistic_regression",
        {"X": x, "y": torch.ones(40, dtype=dtype)},
        {"l2": 0.01, "fit_intercept": False},
    )
    p = torch.full((2,), -10.0, dtype=dtype)
    opts = MethodOptions(backend="native")
    got = take_step(obj, p, opts)
    want = _general_step(monkeypatch, obj, p, opts)
    assert fused_calls == [None]
    assert want.record.step_size < 1.0 and want.record.function_evaluations > 1
    assert got.record.loss > 0 and bool((got.params > p).all())
    _assert_same_bits(got, want, RECORD_FIELDS)


def test_a_first_trial_other_than_1_takes_the_general_search(monkeypatch, fused_calls):
    """The fused op serves the line search only from a first trial of 1: any other first
    trial is the general path's."""
    obj = objective_of_size("least_squares", 12)
    p = 0.3 * torch.randn(12, dtype=F64)
    opts = MethodOptions(backend="native", learning_rate=0.7)
    got = take_step(obj, p, opts)
    assert fused_calls == [None] and got.record.step_size == 0.7
    _assert_same_bits(got, _general_step(monkeypatch, obj, p, opts), RECORD_FIELDS)


# ---------------------------------------------------------------- runs and other methods


@pytest.mark.parametrize("name", ASSEMBLED)
@pytest.mark.parametrize(
    "options",
    [
        {"method": "newton", "learning_rate": 0.5},
        {"method": "newton", "step_policy": "line_search"},
        {"method": "newton", "step_policy": "levenberg_marquardt"},
        {"method": "saddle_free", "learning_rate": 0.5},
        {"method": "newton", "curvature": "gauss_newton", "learning_rate": 0.5},
    ],
    ids=["fixed", "line_search", "lm", "saddle_free", "gauss_newton"],
)
def test_native_run_equals_autograd_run(name, options):
    obj = _run_problem(name)
    if options.get("curvature") == "gauss_newton" and not obj.supports_ggn:
        pytest.skip(f"{name} has no Gauss-Newton structure")
    p = 0.3 * torch.randn(obj.num_params, dtype=F64)
    native = Run(obj, p, MethodOptions(backend="native", **options), NO_TOL).run_to_end()
    auto = Run(obj, p, MethodOptions(backend="autograd", **options), NO_TOL).run_to_end()
    _assert_runs_close(native, auto, "native")


def _run_problem(name):
    """A problem with a positive-definite Hessian (softmax without its free intercept)."""
    if name == "softmax_regression":
        return objective_of_size(name, 65)
    return objective_of_size(name, 12)


def _assert_runs_close(native, auto, label):
    """Records agree while the runs are above rounding noise (then steps are noise)."""
    assert {r.backend for r in native} == {label} and {r.backend for r in auto} == {"autograd"}
    floor = 1e-7 * auto[0].gradient_norm
    compared = 0
    for a, b in zip(native, auto, strict=False):
        if b.gradient_norm < floor:
            break
        _assert_records_close(a, b, 1e-9)
        compared += 1
    assert compared >= 1  # quadratic models converge in one line-search step


def test_mlp_newton_uses_closed_form_assembly_native_solve_and_matches_autograd():
    obj = random_problem("mlp")
    p = random_params(obj)
    opts = {"method": "newton", "step_policy": "levenberg_marquardt"}
    native = Run(obj, p, MethodOptions(backend="native", **opts), NO_TOL).run_to_end()
    auto = Run(obj, p, MethodOptions(backend="autograd", **opts), NO_TOL).run_to_end()
    _assert_runs_close(native, auto, "closed_form+native-solve")


def test_the_fused_plan_goes_with_its_objective_and_a_row_copy_makes_its_own():
    # The plan lives on the objective (no global table keeping deleted problems alive), and a
    # copy on other rows must not reuse the parent's data.
    import gc
    import weakref

    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randn(40, dtype=torch.float64)
    objective = make_objective("least_squares", {"X": X, "y": y}, {"l2": 0.1})
    x = torch.randn(3, dtype=torch.float64)
    options = MethodOptions(method="newton", step_policy="fixed", backend="native")
    take_step(objective, x, options)
    rows = objective.subsample(torch.arange(10))
    got = take_step(rows, x, options).params
    # float64 reference on the first 10 rows: 0.5 mean((X w - y)^2) + 0.05 ||w||^2
    Xr, yr = X[:10], y[:10]
    H = Xr.T @ Xr / 10 + 0.1 * torch.eye(3, dtype=torch.float64)
    g = Xr.T @ (Xr @ x - yr) / 10 + 0.1 * x
    torch.testing.assert_close(got, x - torch.linalg.solve(H, g), rtol=1e-10, atol=1e-12)
    ref = weakref.ref(objective)
    del objective, rows
    gc.collect()
    assert ref() is None
