"""Hessian-free Newton-CG and Gauss-Newton-CG (engine/hessian_free.py, issue 7).

Curvature products are checked against dense float64 references built with torch.func
(hessian, jacrev) on fresh random problems; Steihaug CG against torch.linalg.solve and
the quadratic model; Newton-CG iterates against the dense-Newton engine run; a ~1e6
parameter mlp takes steps in a subprocess whose peak RSS growth must stay O(n).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
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
from hessian_service.engine.backends.selector import native_status
from hessian_service.engine.curvature.products import ggn_product, hessian_product
from hessian_service.engine.options import resolve_method
from hessian_service.engine.solvers.hessian_free import curvature_objective, steihaug_cg
from native_support import BACKENDS

F64 = torch.float64


def _problem(name: str, rows: int = 40, d: int = 6, **opts):
    x = torch.randn(rows, d, dtype=F64)
    if name == "least_squares":
        return make_objective(name, {"X": x, "y": torch.randn(rows, dtype=F64)}, opts)
    if name == "logistic_regression":
        y = torch.randint(0, 2, (rows,)).to(F64)
        return make_objective(name, {"X": x, "y": y}, opts)
    if name == "softmax_regression":
        labels = torch.randint(0, 3, (rows,))
        return make_objective(name, {"X": x, "labels": labels}, {"num_classes": 3, **opts})
    if name == "mlp":
        opts.setdefault("layer_sizes", [d, 7, 2])
        y = torch.randn(rows, opts["layer_sizes"][-1], dtype=F64)
        return make_objective(name, {"X": x, "y": y}, opts)
    raise AssertionError(name)


def _dense_ggn(obj, x):
    """J^T H_out J + H_reg from torch.func jacrev/hessian (the float64 reference)."""
    out = obj.outputs(x)
    jac = torch.func.jacrev(obj.outputs)(x).reshape(out.numel(), -1)
    h_out = torch.func.hessian(lambda o: obj.output_loss(o.reshape(out.shape)))(out.reshape(-1))
    return jac.T @ h_out @ jac + torch.func.hessian(obj.regulariser)(x)


@pytest.mark.parametrize(
    "name,opts",
    [
        ("least_squares", {"l2": 0.3, "fit_intercept": True}),
        ("logistic_regression", {"l2": 0.1}),
        ("softmax_regression", {"l2": 0.2}),
        ("mlp", {"activation": "tanh", "l2": 0.05}),
    ],
)
def test_curvature_products_match_dense_float64(name, opts):
    obj = _problem(name, **opts)
    x = 0.5 * torch.randn(obj.num_params, dtype=F64)
    v = torch.randn(obj.num_params, dtype=F64)
    h = torch.func.hessian(obj.loss)(x).reshape(obj.num_params, -1)
    torch.testing.assert_close(hessian_product(obj, x)(v), h @ v, rtol=1e-10, atol=1e-12)
    twice = hessian_product(obj, x, "reverse_over_reverse")
    torch.testing.assert_close(twice(v), h @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(twice(2 * v), 2 * h @ v, rtol=1e-10, atol=1e-12)  # graph reused
    torch.testing.assert_close(
        ggn_product(obj, x)(v), _dense_ggn(obj, x) @ v, rtol=1e-10, atol=1e-12
    )


def _spd(n, cond=50.0):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=F64)) @ q.T


def test_steihaug_cg_solves_damped_spd_system_and_reports_true_residual():
    n, lam = 30, 0.7
    a, g = _spd(n), torch.randn(n, dtype=F64)
    res = steihaug_cg(lambda v: a @ v, g, damping=lam, tolerance=1e-12, max_iterations=200)
    damped = a + lam * torch.eye(n, dtype=F64)
    torch.testing.assert_close(res.direction, torch.linalg.solve(damped, -g), rtol=1e-9, atol=1e-11)
    true_residual = float((-g - damped @ res.direction).norm() / g.norm())
    assert res.residual <= 1e-12 and math.isclose(
        res.residual, true_residual, rel_tol=1e-3, abs_tol=1e-15
    )
    d = res.direction
    assert math.isclose(res.predicted_decrease, -float(g @ d + 0.5 * d @ (a @ d)), rel_tol=1e-10)
    assert not res.negative_curvature and not res.on_boundary


def test_steihaug_cg_truncates_at_forcing_tolerance():
    a, g = _spd(60, cond=1e3), torch.randn(60, dtype=F64)
    res = steihaug_cg(lambda v: a @ v, g, tolerance=0.1, max_iterations=500)
    tight = steihaug_cg(lambda v: a @ v, g, tolerance=1e-10, max_iterations=500)
    true_residual = float((-g - a @ res.direction).norm() / g.norm())
    assert true_residual <= 0.1 and res.iterations < tight.iterations
    assert float((-g - a @ tight.direction).norm() / g.norm()) <= 1e-9


def test_steihaug_cg_stops_on_the_trust_region_boundary():
    a, g = _spd(20), torch.randn(20, dtype=F64)
    full = torch.linalg.solve(a, -g)
    radius = 0.3 * float(full.norm())
    res = steihaug_cg(lambda v: a @ v, g, radius=radius, tolerance=1e-12)
    assert res.on_boundary and math.isclose(float(res.direction.norm()), radius, rel_tol=1e-10)
    assert float(g @ res.direction) < 0 and res.predicted_decrease > 0


@pytest.mark.parametrize("radius", [2.0, math.inf])
def test_steihaug_cg_follows_negative_curvature_as_a_descent_direction(radius):
    # Indefinite A; the gradient lies mostly along the negative eigenvector.
    evals = torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    a = q @ torch.diag(evals) @ q.T
    g = q @ torch.tensor([0.01, 0.02, 1.0, 0.01], dtype=F64)
    res = steihaug_cg(lambda v: a @ v, g, radius=radius, tolerance=1e-10)
    d = res.direction
    assert res.negative_curvature and res.iterations == 1
    assert float(g @ d) < 0
    model = float(g @ d + 0.5 * d @ (a @ d))
    assert model < 0 and math.isclose(res.predicted_decrease, -model, rel_tol=1e-10)
    if math.isfinite(radius):
        assert res.on_boundary and math.isclose(float(d.norm()), radius, rel_tol=1e-10)


def _norm(v: torch.Tensor) -> float:
    """||v|| where the sum of its squares overflows."""
    top = float(v.abs().max())
    return top * float((v / top).norm())


@pytest.mark.parametrize("radius", [1e160, 1e250, 1e300])
def test_steihaug_cg_reaches_a_boundary_whose_square_overflows(radius):
    """radius^2 overflowed past 1e154: the boundary step came out infinite (a trust_radius of
    1e200 recorded step_norm inf). Both ways to the boundary: along negative curvature, and
    a positive definite system whose Newton step lies beyond the radius."""
    evals = torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    a = q @ torch.diag(evals) @ q.T
    g = q @ torch.tensor([0.01, 0.02, 1.0, 0.01], dtype=F64)
    res = steihaug_cg(lambda v: a @ v, g, radius=radius, tolerance=1e-10)
    assert res.negative_curvature and res.on_boundary and bool(res.direction.isfinite().all())
    assert (
        math.isclose(_norm(res.direction), radius, rel_tol=1e-10) and float(g @ res.direction) < 0
    )
    tiny = _spd(20) * (1e-10 / radius)  # the Newton step ~1e10 x radius
    g = torch.randn(20, dtype=F64)
    res = steihaug_cg(lambda v: tiny @ v, g, radius=radius, tolerance=1e-12)
    assert res.on_boundary and not res.negative_curvature
    assert (
        math.isclose(_norm(res.direction), radius, rel_tol=1e-10) and float(g @ res.direction) < 0
    )


@pytest.mark.parametrize("radius", [1e-46, 1e-40, 1e-30])
def test_a_float32_boundary_below_float32s_range_is_a_zero_step_not_nan(radius):
    """A float32 radius below 7e-46 rounds to 0 in float32: d / radius was 0 / 0 = NaN, a
    NaN step; the boundary is solved in float64, the step the dtype can hold (0 or tiny)."""
    g = torch.randn(5, dtype=torch.float32)
    a = _spd(5).float()
    res = steihaug_cg(lambda v: a @ v, g, radius=radius, tolerance=1e-6)
    d = res.direction
    assert res.on_boundary and bool(d.isfinite().all()) and d.dtype == torch.float32
    assert float(d.double().norm()) <= radius * (1 + 1e-6) + 1.5e-45


STOP = StopCriteria(
    max_iterations=6, gradient_tolerance=0.0, function_tolerance=0.0, parameter_tolerance=0.0
)
EXACT_CG = {"cg_forcing": "fixed", "cg_tolerance": 1e-12, "cg_max_iterations": 400}


@pytest.mark.parametrize(
    "name,method,policy,steps",
    [
        ("least_squares", "newton_cg", "trust_region", 1),  # a quadratic: one step solves it
        ("least_squares", "gauss_newton_cg", "fixed", 1),
        ("logistic_regression", "newton_cg", "trust_region", 4),
        ("logistic_regression", "newton_cg", "fixed", 4),
        ("logistic_regression", "gauss_newton_cg", "trust_region", 4),
        ("logistic_regression", "newton_cg", "reverse_over_reverse", 4),
    ],
)
def test_newton_cg_iterates_match_dense_newton(name, method, policy, steps):
    obj = _problem(name, rows=120, d=25, l2=1e-2)
    x_dense = x_cg = 0.1 * torch.randn(obj.num_params, dtype=F64)
    dense_opts = MethodOptions(method="newton", backend="autograd")
    mode = "forward_over_reverse"
    if policy == "reverse_over_reverse":
        policy, mode = "trust_region", policy
    cg_opts = MethodOptions(  # autograd products here; native ones: test_native_products.py
        method=method,
        step_policy=policy,
        trust_radius=1e6,
        hvp_mode=mode,
        backend="autograd",
        **EXACT_CG,
    )
    for k in range(steps):
        x_dense = take_step(obj, x_dense, dense_opts).params
        step = take_step(obj, x_cg, cg_opts)
        assert step.record.step_accepted and step.record.cg_iterations > 0
        assert step.record.cg_residual <= 1e-12
        assert (policy == "trust_region") == (step.record.trust_radius == 1e6)
        x_cg = step.params
        err = float((x_cg - x_dense).norm()) / float(x_dense.norm())
        assert err <= 1e-9, (k, err)


def test_newton_cg_run_losses_match_dense_run():
    obj = _problem("logistic_regression", rows=150, d=20, l2=1e-3)
    x0 = torch.zeros(obj.num_params, dtype=F64)
    dense = Run(obj, x0, MethodOptions(method="newton", backend="autograd"), STOP).run_to_end()
    cg_run = Run(obj, x0, MethodOptions(method="newton_cg", trust_radius=1e6, **EXACT_CG), STOP)
    records = cg_run.run_to_end()
    for a, b in zip(dense[:4], records[:4], strict=True):
        assert math.isclose(a.loss, b.loss, rel_tol=1e-12)
    native = native_status()[0]  # auto: native products for logistic_regression when built
    assert cg_run.backend == ("native" if native else "autograd") and cg_run.method == "newton_cg"
    assert all(r.cg_iterations > 0 for r in records[:-1])


def test_eisenstat_walker_converges_superlinearly_with_fewer_cg_iterations():
    obj = _problem("logistic_regression", rows=300, d=40, l2=1e-3)
    x0 = torch.zeros(obj.num_params, dtype=F64)
    stop = StopCriteria(max_iterations=30, gradient_tolerance=1e-10, function_tolerance=0.0)
    ew = Run(obj, x0, MethodOptions(method="newton_cg"), stop)
    ew_records = ew.run_to_end()
    exact = Run(obj, x0, MethodOptions(method="newton_cg", **EXACT_CG), stop).run_to_end()
    assert ew.stop_reason == "gradient_tolerance"
    assert sum(r.cg_iterations for r in ew_records) < sum(r.cg_iterations for r in exact)
    first = ew_records[0]
    assert first.cg_residual <= 0.5 + 1e-12  # eta_0 = 0.5


def test_trust_region_recovers_on_a_saddle_of_an_indefinite_quadratic():
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    obj = make_objective("quadratic", {"A": a, "b": torch.zeros(2, dtype=F64)})
    x = torch.tensor([1e-3, 0.3], dtype=F64)
    step = take_step(obj, x, MethodOptions(method="newton_cg", trust_radius=0.5))
    r = step.record
    assert r.negative_curvature and r.step_accepted
    assert obj.loss(step.params) < obj.loss(x)
    assert math.isclose(r.step_norm, 0.5, rel_tol=1e-10) and r.trust_radius == 0.5


def test_newton_cg_solves_rosenbrock_from_the_classic_start():
    obj = make_objective("rosenbrock", {}, {"dim": 4})
    run = Run(obj, obj.init_params(), MethodOptions(method="newton_cg"), StopCriteria(200, 1e-9))
    records = run.run_to_end()
    assert run.stop_reason.converged
    torch.testing.assert_close(run.params, torch.ones(4, dtype=F64), rtol=0, atol=1e-6)
    losses = [r.loss for r in records]
    assert all(b <= a for a, b in itertools.pairwise(losses))


def test_gauss_newton_cg_never_meets_negative_curvature_on_an_mlp():
    obj = _problem("mlp", rows=60, d=5, layer_sizes=[5, 16, 3])
    x0 = obj.init_params(torch.Generator().manual_seed(1))
    records = Run(obj, x0, MethodOptions(method="gauss_newton_cg"), STOP).run_to_end()
    assert not any(r.negative_curvature for r in records)
    assert records[-1].loss < 0.8 * records[0].loss


def test_curvature_subsample_uses_the_drawn_rows():
    obj = _problem("mlp", rows=50, d=4, layer_sizes=[4, 6, 2])
    x = obj.init_params(torch.Generator().manual_seed(0))
    v = torch.randn(obj.num_params, dtype=F64)
    sub = curvature_objective(obj, 0.3, torch.Generator().manual_seed(7))
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:15].sort().values
    assert sub.num_rows == 15
    fresh = make_objective(
        "mlp", {"X": obj.data["X"][rows], "y": obj.data["y"][rows]}, {"layer_sizes": [4, 6, 2]}
    )
    h = torch.func.hessian(fresh.loss)(x)
    torch.testing.assert_close(hessian_product(sub, x)(v), h @ v, rtol=1e-10, atol=1e-12)


def test_subsampled_runs_are_deterministic_per_seed():
    obj = _problem("logistic_regression", rows=200, d=10, l2=1e-2)
    x0 = torch.zeros(obj.num_params, dtype=F64)

    def losses(seed):
        opts = MethodOptions(method="newton_cg", curvature_fraction=0.2, seed=seed)
        return [r.loss for r in Run(obj, x0, opts, STOP)]

    first = losses(3)
    assert first == losses(3)
    assert first != losses(4)
    assert first[-1] < first[0]


def test_auto_resolves_by_dense_budget_and_says_why():
    obj = _problem("least_squares", rows=30, d=10)
    x = torch.zeros(obj.num_params, dtype=F64)
    opts = MethodOptions(method="auto").validated()
    resolved, note = resolve_method(opts, obj.num_params, F64)
    assert resolved.method == "newton" and resolved.step_policy == "line_search"
    assert "within" in note
    small = MethodOptions(method="auto", dense_budget_bytes=8 * 10 * 10 - 1)
    step = take_step(obj, x, small)
    assert step.method == "newton_cg" and "over the" in step.method_note
    assert "dense-Hessian budget" in step.method_note and step.record.cg_iterations > 0
    assert take_step(obj, x, MethodOptions(method="newton")).method_note == ""


@pytest.mark.parametrize(
    "fractions",
    [
        {"curvature_fraction": 0.5},
        {"gradient_fraction": 0.5},
        {"curvature_fraction": 0.25, "gradient_fraction": 0.5},
    ],
)
def test_auto_with_a_sampling_fraction_chooses_newton_cg_whatever_the_size(fractions):
    # a dense Newton step cannot sub-sample: auto honours the fraction (it refused, naming
    # a method newton the caller never asked for)
    obj = _problem("least_squares", rows=30, d=10)
    x = torch.zeros(obj.num_params, dtype=F64)
    opts = MethodOptions(method="auto", seed=3, **fractions).validated()
    resolved, note = resolve_method(opts, obj.num_params, F64)
    assert resolved.method == "newton_cg"
    for name, value in fractions.items():
        assert getattr(resolved, name) == value and f"{name} {value:g}" in note
    step = take_step(obj, x, opts)
    assert step.method == "newton_cg" and step.method_note == note
    same = take_step(obj, x, replace(opts, method="newton_cg"))
    assert torch.equal(step.params, same.params)


def test_a_refusal_of_the_method_auto_chose_says_auto_chose_it():
    options = MethodOptions(
        method="auto", step_policy="levenberg_marquardt", curvature_fraction=0.5
    )
    with pytest.raises(ValidationError) as err:
        resolve_method(options, 10, F64)
    assert err.value.field == "options.step_policy"
    assert str(err.value).endswith("(method auto chose newton_cg: curvature_fraction 0.5 below "
                                   "1 asks for sub-sampling, which only the Hessian-free methods "
                                   "do)")  # fmt: skip


@pytest.mark.parametrize(
    "options,field",
    [
        ({"method": "newton_cg", "cg_max_iterations": 0}, "options.cg_max_iterations"),
        ({"method": "newton_cg", "cg_tolerance": 1.5}, "options.cg_tolerance"),
        ({"method": "newton_cg", "cg_forcing": "exact"}, "options.cg_forcing"),
        ({"method": "newton_cg", "trust_radius": 0.0}, "options.trust_radius"),
        ({"method": "newton_cg", "curvature_fraction": 0.0}, "options.curvature_fraction"),
        ({"method": "newton_cg", "curvature_fraction": 1.5}, "options.curvature_fraction"),
        ({"method": "newton_cg", "seed": -1}, "options.seed"),
        ({"method": "newton_cg", "hvp_mode": "finite_difference"}, "options.hvp_mode"),
        ({"method": "newton", "step_policy": "trust_region"}, "options.step_policy"),
        ({"method": "newton_cg", "step_policy": "levenberg_marquardt"}, "options.step_policy"),
        ({"method": "auto", "step_policy": "trust_region"}, "options.step_policy"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValidationError) as err:
        MethodOptions.from_dict(options)
    assert err.value.field == field


@pytest.mark.parametrize(
    "options,field",
    [
        ({"method": "gauss_newton_cg"}, "options.method"),
        ({"method": "newton_cg", "curvature": "gauss_newton"}, "options.curvature"),
        ({"method": "newton_cg", "curvature_fraction": 0.5}, "options.curvature_fraction"),
    ],
)
def test_unsupported_objective_combinations_name_the_field(options, field):
    obj = make_objective("rosenbrock", {}, {"dim": 3})
    with pytest.raises(ValidationError) as err:
        take_step(obj, obj.init_params(), MethodOptions(**options))
    assert err.value.field == field


MILLION_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective
    from hessian_service.engine.curvature.autograd import loss_and_grad
    torch.manual_seed(0)
    sizes = [100, 1000, 900, 1]
    X = torch.randn(32, 100, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    obj = make_objective("mlp", {"X": X, "y": y}, {"layer_sizes": sizes})
    x0 = obj.init_params(torch.Generator().manual_seed(0))
    loss_and_grad(obj, x0)  # warm the allocator with one gradient graph
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opts = MethodOptions(method="newton_cg", cg_max_iterations=4, damping=1.0, trust_radius=0.3)
    run = Run(obj, x0, opts, StopCriteria(max_iterations=2, gradient_tolerance=0.0))
    records = [r.to_dict() for r in run]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump({"n": obj.num_params, "growth": after - before, "records": records}, sys.stdout)
    """
)


@pytest.mark.slow
def test_million_parameter_mlp_takes_newton_cg_steps_in_bounded_memory():
    proc = subprocess.run(
        [sys.executable, "-c", MILLION_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n, growth, records = out["n"], out["growth"], out["records"]
    assert 1_000_000 <= n <= 1_010_000
    # O(n): CG keeps a handful of n-vectors, each product a few more (the forward-over-reverse
    # graph of 32 rows, slice gradients); measured ~33. Bound the peak growth by 64 float64
    # n-vectors (~513 MB), over 1e4 times below a dense Hessian's 8 n^2 bytes (8 TB).
    assert growth <= 64 * 8 * n, growth / (8 * n)
    assert growth < 8 * n * n / 10_000
    assert len(records) == 3 and all(r["cg_iterations"] > 0 for r in records[:2])
    assert records[-1]["loss"] < records[0]["loss"]


def test_a_resumed_subsampled_trust_region_run_repeats_the_same_records():
    obj = _problem("logistic_regression", rows=150, d=12, l2=1e-2)
    x0 = torch.zeros(obj.num_params, dtype=F64)
    opts = MethodOptions(method="newton_cg", curvature_fraction=0.5, trust_radius=0.2, seed=9)
    full = Run(obj, x0, opts, STOP)
    records = [next(full) for _ in range(3)]
    checkpoint = full.checkpoint()
    rest = [r.loss for r in full]
    resumed = Run(obj, x0, opts, STOP, resume=checkpoint)
    again = [r.loss for r in resumed]
    assert again[0] == records[-1].loss and again[1:] == rest
    assert checkpoint.state["curvature_draws"] == 2.0  # two sub-samples drawn before record 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton_cg", "gauss_newton_cg"])
def test_a_badly_scaled_least_squares_is_not_called_stalled_after_a_partial_solve(
    rng, method, backend, dtype
):
    """Columns scaled by 1e3 and 1e-3: CG's first iteration moves along the stiff column
    only, a step of ~1e-6 at |x| ~ 250 passed the parameter test, and the run stopped
    PARAMETERS_STALLED at 6,000x the minimum's loss (SDK least_squares: success=True). A
    stall after a partial solve is now judged after a solve to cg_tolerance. Against the
    float64 least-squares solution (numpy)."""
    x = rng.standard_normal((200, 4))
    x[:, 0] *= 1e3
    x[:, 1] *= 1e-3
    w = np.array([1e-3, 1e3, 1.0, -2.0]) * rng.uniform(0.5, 2.0, 4)
    y = x @ w + 0.01 * rng.standard_normal(200)
    xt, yt = torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)
    objective = make_objective("least_squares", {"X": xt, "y": yt}, {"fit_intercept": False})
    options = MethodOptions(method=method, backend=backend)
    run = Run(objective, torch.zeros(4, dtype=dtype), options, StopCriteria(max_iterations=300))
    records = list(run)
    x64 = xt.double().numpy()
    best = np.linalg.lstsq(x64, yt.double().numpy(), rcond=None)[0]
    least = 0.5 * np.mean((x64 @ best - yt.double().numpy()) ** 2)
    if dtype == torch.float64:
        assert run.stop_reason == StopReason.GRADIENT_TOLERANCE, run.message
        got = run.params.double().numpy()
        assert np.linalg.norm(got - best) <= 1e-8 * np.linalg.norm(best)
    else:  # float32 cannot meet 1e-10: it may stall, at the minimum
        assert records[-1].loss <= least * (1 + 1e-3), (records[-1].loss, least, run.message)


@pytest.mark.parametrize("forcing", ["eisenstat_walker", "fixed"])
def test_a_solve_capped_at_one_cg_iteration_still_stalls(rng, forcing):
    """cg_max_iterations=1: a tighter solve cannot go further, so a stall after it is not
    put off (it was, every iteration: such runs ran to max_iterations), and with a fixed
    forcing the request for a tight solve does not stick in the state."""
    x = rng.standard_normal((200, 4))
    x[:, 0] *= 3.0
    y = x @ np.array([1.0, 2.0, 3.0, -2.0]) + 0.01 * rng.standard_normal(200)
    objective = make_objective(
        "least_squares", {"X": torch.tensor(x), "y": torch.tensor(y)}, {"fit_intercept": False}
    )
    options = MethodOptions(method="newton_cg", cg_max_iterations=1, cg_forcing=forcing)
    stopping = StopCriteria(max_iterations=2000, gradient_tolerance=0.0, function_tolerance=1e-12)
    run = Run(objective, torch.zeros(4, dtype=F64), options, stopping)
    records = list(run)
    assert run.stop_reason in (StopReason.FUNCTION_STALLED, StopReason.PARAMETERS_STALLED)
    assert len(records) < 200, run.message
    assert run.checkpoint().state.get("cg_tight", 0.0) == 0.0


def test_a_run_cancelled_where_it_asked_for_a_tight_solve_resumes_to_the_same_records(rng):
    """The request for a solve to cg_tolerance is made before a cancel stops the run, so
    the checkpoint a resume starts from carries it (the stop test returned CANCELLED
    first: the resumed run took the loose solve and its records differed)."""
    x = rng.standard_normal((200, 4))
    x[:, 0] *= 1e3
    x[:, 1] *= 1e-3
    y = x @ (np.array([1e-3, 1e3, 1.0, -2.0]) * rng.uniform(0.5, 2.0, 4))
    objective = make_objective(
        "least_squares", {"X": torch.tensor(x), "y": torch.tensor(y)}, {"fit_intercept": False}
    )
    options, stopping = MethodOptions(method="newton_cg"), StopCriteria(max_iterations=300)
    x0 = torch.zeros(4, dtype=F64)
    run = Run(objective, x0, options, stopping)
    full, asked = [], []
    for record in run:
        full.append(record)
        if run.checkpoint().state.get("cg_tight"):
            asked.append(record.iteration)
    assert asked, "no partial solve looked stalled: the case is not exercised"
    k = asked[0]
    cancelled = Run(objective, x0, options, stopping)
    steps = iter(cancelled)
    for record in steps:
        if record.iteration == k - 1:
            break
    cancelled.cancel()
    assert next(steps).iteration == k and cancelled.stop_reason == StopReason.CANCELLED
    assert cancelled.checkpoint().state["cg_tight"] == 1.0
    resumed = list(Run(objective, x0, options, stopping, resume=cancelled.checkpoint()))

    def key(r):
        return (r.iteration, r.loss, r.cg_iterations, r.step_norm)

    assert [key(r) for r in resumed] == [key(r) for r in full if r.iteration >= k]


@pytest.mark.parametrize("max_iterations", [20, 100])
def test_cg_to_a_tolerance_below_float32_stops_at_rounding_not_a_blown_up_step(rng, max_iterations):
    # float32 softmax with intercepts (projected CG) and cg_tolerance 1e-10: the residual was
    # rounding noise along near-null directions and its steps rr / p.A p gave a direction of
    # norm 2.7e6 (the Newton step's is 2.06), or overflowed x + d at 100 iterations
    X, labels = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    start = rng.normal(size=12) * 0.5
    options = MethodOptions(method="newton_cg", step_policy="fixed", cg_tolerance=1e-10,
                            cg_forcing="fixed", cg_max_iterations=max_iterations)  # fmt: skip
    steps = {}
    for dtype in (torch.float64, torch.float32):
        data = {"X": torch.tensor(X, dtype=dtype), "labels": torch.tensor(labels)}
        obj = make_objective("softmax_regression", data, {"l2": 0.1, "num_classes": 3})
        steps[dtype] = take_step(obj, torch.tensor(start, dtype=dtype), options).params
    moved64 = steps[torch.float64] - torch.tensor(start)
    moved32 = steps[torch.float32].double() - torch.tensor(start)
    # float32's step is the float64 one to its precision (1e-5 of the step's norm)
    assert float((moved32 - moved64).norm()) <= 1e-5 * float(moved64.norm())


@pytest.mark.parametrize("method", ["gauss_newton_cg", "newton_cg"])
def test_a_trust_region_step_that_raises_a_small_loss_is_not_taken_as_rounding(method):
    """A float32 mlp whose loss is small (targets 0.03 sin X): the gain-ratio test took any
    change under 16 eps32 absolute (1.9e-6) as rounding with a gain ratio of 1, and accepted
    steps that raised a loss of 6e-7 fourfold. No accepted step now raises it by 0.1%, and
    the run reaches its gradient tolerance (a relative 16 eps |loss| alone kept it from it)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 3))
    y = 0.03 * np.sin(X[:, :2])
    data = {"X": torch.from_numpy(X).float(), "y": torch.from_numpy(y).float()}
    options = {"layer_sizes": [3, 5, 2], "activation": "tanh", "l2": 9e-7}
    obj = make_objective("mlp", data, options)
    x0 = torch.from_numpy(0.3 * np.random.default_rng(7).normal(size=32)).float()
    opts = MethodOptions(method=method, step_policy="trust_region")
    run = Run(obj, x0, opts, StopCriteria(max_iterations=600))
    records = run.run_to_end()
    for a, b in itertools.pairwise(records):
        if a.step_accepted:
            assert b.loss - a.loss <= 1e-3 * a.loss, (a.iteration, a.loss, b.loss)
    assert run.stop_reason == StopReason.GRADIENT_TOLERANCE and run.converged
    assert records[-1].loss < 1e-2 * records[0].loss


def test_a_float64_gauss_newton_trust_region_is_not_held_by_rises_taken_as_rounding():
    """A float64 mlp (sin targets, loss ~7e-5 at its end): rises of up to 1.4e5 eps of the
    loss (under 16 eps absolute) were accepted as rounding, again and again, and the run
    ended at max_iterations 600; none is now, and it reaches its gradient tolerance."""
    rng = np.random.default_rng(5)
    X = torch.from_numpy(rng.normal(size=(60, 3)))
    data = {"X": X, "y": torch.sin(X[:, :2])}
    obj = make_objective("mlp", data, {"layer_sizes": [3, 5, 2], "activation": "tanh", "l2": 9e-7})
    x0 = torch.from_numpy(0.3 * np.random.default_rng(7).normal(size=32))
    opts = MethodOptions(method="gauss_newton_cg", step_policy="trust_region")
    run = Run(obj, x0, opts, StopCriteria(max_iterations=600))
    records = run.run_to_end()
    rises = [b.loss - a.loss for a, b in itertools.pairwise(records) if a.step_accepted]
    assert max(rises) <= 16 * torch.finfo(F64).eps * records[-1].loss * 100
    assert run.stop_reason == StopReason.GRADIENT_TOLERANCE


def test_a_fit_on_huge_data_started_near_its_minimum_reaches_it():
    """Least squares on X + 1e6 (an exact fit), started 1e-3 from its minimiser: its loss's
    rounding follows the terms X w ~ 3e6, not sqrt of the first loss, so a rounding scale
    from the first loss alone stopped it no_progress at 4.7e-12; where the scales disagree
    the trial's gradient decides, and it reaches the float64 floor (~3e-19) as before."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10)) + 1e6
    w = rng.standard_normal(10)
    obj = make_objective("least_squares", {"X": torch.tensor(X), "y": torch.tensor(X @ w)}, {})
    pert = np.random.default_rng(5).standard_normal(10)
    x0 = torch.tensor(w + 1e-3 * (np.abs(w) + 1) * pert)
    opts = MethodOptions(method="newton_cg", step_policy="trust_region")
    run = Run(obj, x0, opts, StopCriteria(max_iterations=200))
    records = run.run_to_end()
    assert records[-1].loss < 1e-17
    assert float(torch.linalg.norm(run.params - torch.tensor(w))) < 1e-8
