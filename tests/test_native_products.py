"""Native curvature block products (csrc/products.cpp, engine/native_products.py).

B V for an (n, k) block against the float64 torch.func Hessian (or Gauss-Newton matrix) of
the upcast problem, on fresh random inputs: float64 within 1e-12 and float32 within 1e-5
relative (Frobenius), for k = 1 and k = 7, with and without intercept and l2, on all rows
and on a row subset; the same against the autograd products at the same dtype. Newton-CG
with native products takes the autograd products' iterates (to CG tolerance) and its
record says native; backend=native on an uncovered objective falls back with the record
saying autograd; every new op passes torch.library.opcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from hessian_service.engine import MethodOptions, make_objective, take_step
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from hessian_service.engine.backends import selector as backends
from hessian_service.engine.backends.selector import curvature_block_product
from hessian_service.engine.errors import UnavailableError, UnknownNameError, ValidationError
from hessian_service.engine.solvers.methods import Stepper
from native_support import F32, F64, TOL, rel_err, require_native, spd, upcast

require_native()
ops = torch.ops.hessian
COVERED = ("mse", "quadratic", "least_squares", "logistic_regression", "softmax_regression")
LINEAR = ("least_squares", "logistic_regression", "softmax_regression")
VARIANTS = [
    {"l2": 0.0, "fit_intercept": False},
    {"l2": 0.3, "fit_intercept": False},
    {"l2": 0.0, "fit_intercept": True},
    {"l2": 0.3, "fit_intercept": True},
]
EXACT_CG = {"cg_forcing": "fixed", "cg_tolerance": 1e-12, "cg_max_iterations": 400}


def _problem(name: str, dtype: torch.dtype = F64, rows: int = 60, d: int = 9, **opts):
    """A random `name` problem in `dtype` (linear models: rows x d data, classes 4)."""
    if name == "mse":
        return make_objective(name, {"target": torch.randn(5, 7, dtype=dtype)})
    if name == "quadratic":
        a = spd(d, dtype, lo=-2.0, hi=5.0)  # indefinite: the product must not care
        return make_objective(name, {"A": a, "b": torch.randn(d, dtype=dtype)})
    x = torch.randn(rows, d, dtype=dtype)
    if name == "least_squares":
        return make_objective(name, {"X": x, "y": torch.randn(rows, dtype=dtype)}, opts)
    if name == "logistic_regression":
        y = torch.randint(0, 2, (rows,)).to(dtype)
        return make_objective(name, {"X": 2 * x, "y": y}, opts)
    if name == "softmax_regression":
        labels = torch.randint(0, 4, (rows,))
        return make_objective(name, {"X": x, "labels": labels}, {"num_classes": 4, **opts})
    if name == "mlp":
        y = torch.randn(rows, 2, dtype=dtype)
        return make_objective(name, {"X": x, "y": y}, {"layer_sizes": [d, 5, 2], **opts})
    raise AssertionError(name)


def _reference(objective, x: torch.Tensor, v: torch.Tensor, rows=None) -> torch.Tensor:
    """H V from torch.func.hessian of the float64 problem (on `rows` when given)."""
    ref = upcast(objective)
    if rows is not None:
        ref = ref.subsample(rows)
    return torch.func.hessian(ref.loss)(x.double()) @ v.double()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("name", ["mse", "quadratic"])
def test_data_free_products_match_float64_hessian(name, k, dtype):
    obj = _problem(name, dtype)
    x = torch.randn(obj.num_params, dtype=dtype)
    v = torch.randn(obj.num_params, k, dtype=dtype)
    product, label = curvature_block_product(obj, x, "native")
    assert label == "native"
    got = product(v)
    assert got.shape == (obj.num_params, k) and got.dtype == dtype
    assert rel_err(got, _reference(obj, x, v)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: f"l2={o['l2']},b={o['fit_intercept']}")
@pytest.mark.parametrize("name", LINEAR)
def test_linear_products_match_float64_hessian_and_autograd(name, opts, k, dtype):
    obj = _problem(name, dtype, **opts)
    x = 0.5 * torch.randn(obj.num_params, dtype=dtype)
    v = torch.randn(obj.num_params, k, dtype=dtype)
    native, label = curvature_block_product(obj, x, "native")
    auto, auto_label = curvature_block_product(obj, x, "autograd")
    assert (label, auto_label) == ("native", "autograd")
    got = native(v)
    assert got.shape == (obj.num_params, k) and got.dtype == dtype
    assert rel_err(got, _reference(obj, x, v)) <= TOL[dtype]
    assert rel_err(got, auto(v)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("name", LINEAR)
def test_subsampled_rows_match_the_hessian_of_those_rows(name, k, dtype):
    obj = _problem(name, dtype, rows=80, l2=0.1, fit_intercept=True)
    rows = torch.randperm(80)[:23].sort().values
    x = 0.5 * torch.randn(obj.num_params, dtype=dtype)
    v = torch.randn(obj.num_params, k, dtype=dtype)
    native, _ = curvature_block_product(obj, x, "native", rows)
    auto, _ = curvature_block_product(obj, x, "autograd", rows)
    got = native(v)
    assert rel_err(got, _reference(obj, x, v, rows)) <= TOL[dtype]
    assert rel_err(got, auto(v)) <= TOL[dtype]
    assert rel_err(got, _reference(obj, x, v)) > 1e-3  # the subset's curvature, not all rows'


@pytest.mark.parametrize("name", ["mse", *LINEAR])
def test_gauss_newton_products_equal_the_autograd_ggn(name):
    obj = _problem(name, l2=0.2, fit_intercept=True) if name != "mse" else _problem(name)
    x = torch.randn(obj.num_params, dtype=F64)
    v = torch.randn(obj.num_params, 7, dtype=F64)
    native, label = curvature_block_product(obj, x, "auto", kind="gauss_newton")
    auto, _ = curvature_block_product(obj, x, "autograd", kind="gauss_newton")
    assert label == "native"
    assert rel_err(native(v), auto(v)) <= TOL[F64]


def test_weights_are_taken_at_the_build_point_not_at_call_time():
    obj = _problem("logistic_regression", l2=0.0, fit_intercept=True)
    x = torch.randn(obj.num_params, dtype=F64)
    v = torch.randn(obj.num_params, 3, dtype=F64)
    product, _ = curvature_block_product(obj, x, "native")
    want = _reference(obj, x, v)
    x.add_(1.0)  # the caller's tensor changes; the cached p (1 - p) must not
    assert rel_err(product(v), want) <= TOL[F64]


# ---------------------------------------------------------------- selection


def select_backend(obj, x, backend: str, kind: str = "hessian") -> str:
    """Who serves the curvature products: the one selector's answer."""
    return backends.resolve(backend, obj, x, kind).products


@pytest.mark.parametrize("name", COVERED)
def test_auto_and_native_select_native_for_covered_objectives(name):
    obj = _problem(name, l2=0.1) if name in LINEAR else _problem(name)
    x = torch.zeros(obj.num_params, dtype=F64)
    assert select_backend(obj, x, "auto") == select_backend(obj, x, "native") == "native"
    assert select_backend(obj, x, "autograd") == "autograd"


def test_uncovered_objectives_fall_back_to_autograd():
    mlp = _problem("mlp")
    x = mlp.init_params(torch.Generator().manual_seed(0))
    assert select_backend(mlp, x, "native") == "autograd"
    quad = _problem("quadratic")
    assert select_backend(quad, torch.zeros(9, dtype=F64), "native", "gauss_newton") == "autograd"


def test_native_without_the_extension_is_unavailable_and_auto_falls_back(monkeypatch):
    obj = _problem("least_squares")
    x = torch.zeros(obj.num_params, dtype=F64)
    monkeypatch.setattr(backends, "_load_native", lambda: (None, "no _C here"))
    with pytest.raises(UnavailableError) as err:
        select_backend(obj, x, "native")
    assert err.value.field == "backend" and "no _C here" in str(err.value)
    assert select_backend(obj, x, "auto") == "autograd"


def test_unknown_backend_and_rows_without_data_rows_name_the_field():
    obj = _problem("least_squares")
    x = torch.zeros(obj.num_params, dtype=F64)
    with pytest.raises(UnknownNameError) as err:
        select_backend(obj, x, "gpu")
    assert err.value.field == "backend"
    quad = _problem("quadratic")
    with pytest.raises(ValidationError) as err:
        curvature_block_product(quad, torch.zeros(9, dtype=F64), "native", torch.tensor([0]))
    assert err.value.field == "rows"


# ---------------------------------------------------------------- Newton-CG


@pytest.mark.parametrize(
    "name,method,fraction,gradient_fraction",
    [
        ("least_squares", "newton_cg", 1.0, 1.0),
        ("logistic_regression", "newton_cg", 1.0, 1.0),
        ("logistic_regression", "gauss_newton_cg", 1.0, 1.0),
        ("logistic_regression", "newton_cg", 0.3, 1.0),
        ("logistic_regression", "newton_cg", 0.3, 0.6),  # curvature rows within the batch
        ("softmax_regression", "newton_cg", 1.0, 1.0),
        ("softmax_regression", "newton_cg", 0.5, 1.0),
    ],
)
def test_newton_cg_native_iterates_match_autograd(name, method, fraction, gradient_fraction):
    # softmax's unpenalised intercept row has a null direction (all classes alike): CG's
    # rounding there is noise, so its problem has no intercept (H positive definite)
    obj = _problem(name, rows=120, d=12, l2=1e-2, fit_intercept=name != "softmax_regression")
    x_native = x_auto = 0.1 * torch.randn(obj.num_params, dtype=F64)
    common = {
        "method": method,
        "trust_radius": 1e6,
        "curvature_fraction": fraction,
        "gradient_fraction": gradient_fraction,
        **EXACT_CG,
    }
    native = Stepper(obj, MethodOptions(backend="native", **common).validated(), x_native)
    auto = Stepper(obj, MethodOptions(backend="autograd", **common).validated(), x_auto)
    assert (native.backend_label, auto.backend_label) == ("native", "autograd")
    for k in range(4):
        sn = native.step(native.evaluate(x_native))
        sa = auto.step(auto.evaluate(x_auto))
        assert sn.cg_iterations == sa.cg_iterations > 0
        assert math.isclose(sn.cg_residual, sa.cg_residual, rel_tol=1e-6, abs_tol=1e-12)
        assert sn.accepted == sa.accepted
        x_native, x_auto = sn.x_new, sa.x_new
        err = float((x_native - x_auto).norm()) / float(x_auto.norm())
        assert err <= 1e-9, (k, err)
    draws = native.state["curvature_draws"]  # (a gradient mini-batch draws its own rows)
    assert draws == auto.state["curvature_draws"]
    assert (draws == 4) == (fraction < 1 and gradient_fraction == 1)


def test_newton_cg_native_on_an_mlp_runs_autograd_and_says_so():
    obj = _problem("mlp")
    x = obj.init_params(torch.Generator().manual_seed(0))
    step = take_step(obj, x, MethodOptions(method="newton_cg", backend="native"))
    assert step.record.backend == "autograd" and step.record.cg_iterations > 0


# ---------------------------------------------------------------- spectrum


@pytest.mark.parametrize("name", ["logistic_regression", "softmax_regression"])
def test_spectrum_with_native_products_matches_eigvalsh_and_autograd(name):
    obj = _problem(name, rows=100, d=8, l2=0.05, fit_intercept=False)
    x = 0.3 * torch.randn(obj.num_params, dtype=F64)
    opts = {"top_k": 2, "bottom_k": 2, "trace_samples": 9, "density_probes": 2, "seed": 3}
    native = analyze_curvature(obj, x, SpectrumOptions(backend="native", **opts))
    auto = analyze_curvature(obj, x, SpectrumOptions(backend="autograd", **opts))
    assert (native.backend, auto.backend) == ("native", "autograd")
    exact = torch.linalg.eigvalsh(torch.func.hessian(obj.loss)(x))
    scale = float(exact.abs().max())
    for got in (native.top_eigenvalues, auto.top_eigenvalues):
        assert torch.allclose(
            torch.tensor(got, dtype=F64), exact[-2:].flip(0), rtol=0, atol=1e-8 * scale
        )
    assert torch.allclose(
        torch.tensor(native.bottom_eigenvalues, dtype=F64), exact[:2], rtol=0, atol=1e-8 * scale
    )
    # Same probes; Lanczos' convergence test sees roundoff-level differences between the two
    # product paths, so it may stop up to one block (default 4 products) apart.
    assert native.products > 0 and abs(native.products - auto.products) <= 4
    assert math.isclose(
        native.trace_hutchinson.estimate, auto.trace_hutchinson.estimate, rel_tol=1e-10
    )
    assert math.isclose(native.density.trace, auto.density.trace, rel_tol=1e-8)


def test_spectrum_backend_native_on_an_mlp_says_autograd_and_bad_backend_names_the_field():
    obj = _problem("mlp", rows=20, d=3)
    x = obj.init_params(torch.Generator().manual_seed(0))
    opts = {"trace_samples": 0, "density_probes": 0, "max_lanczos_iterations": 10}
    report = analyze_curvature(obj, x, SpectrumOptions(backend="native", **opts))
    assert report.backend == "autograd"
    with pytest.raises(UnknownNameError) as err:
        analyze_curvature(obj, x, SpectrumOptions(backend="gpu", **opts))
    assert err.value.field == "options.backend"


# ---------------------------------------------------------------- bad input and opcheck


def test_bad_blocks_are_refused_naming_the_argument():
    obj = _problem("logistic_regression", fit_intercept=True)
    X = obj.data["X"]
    w = ops.logistic_regression_weights(torch.zeros(10, dtype=F64), X, True)
    with pytest.raises(RuntimeError, match="V must be an \\(10, k\\) block"):
        ops.linear_block_product(X, w, torch.zeros(9, 2, dtype=F64), 0.0, True)
    with pytest.raises(RuntimeError, match="V must have X's dtype"):
        ops.linear_block_product(X, w, torch.zeros(10, 2, dtype=F32), 0.0, True)
    with pytest.raises(RuntimeError, match="weights must have 60 values"):
        ops.linear_block_product(X, w[:5], torch.zeros(10, 2, dtype=F64), 0.0, True)
    with pytest.raises(RuntimeError, match="params must hold"):
        ops.softmax_regression_probs(torch.zeros(7, dtype=F64), X, 4, True)


def _opcheck_cases():
    X = torch.randn(30, 5, dtype=F64)
    v6, v24 = torch.randn(6, 3, dtype=F64), torch.randn(24, 2, dtype=F64)
    x6, x24 = torch.randn(6, dtype=F64), torch.randn(24, dtype=F64)
    yield "mse_block_product", (torch.randn(2, 3, dtype=F64), v6)
    yield "quadratic_block_product", (spd(6), v6)
    yield "logistic_regression_weights", (x6, X, True)
    yield "linear_block_product", (X, torch.rand(30, dtype=F64), v6, 0.1, True)
    yield "linear_block_product", (X, None, v6[:5], 0.0, False)
    yield "softmax_regression_probs", (x24, X, 4, True)
    probs = torch.softmax(torch.randn(30, 4, dtype=F64), 1)
    yield "softmax_block_product", (X, probs, v24, 0.2, True)
    yield "softmax_block_product", (X, probs, torch.randn(20, 1, dtype=F32).double(), 0.0, False)


@pytest.mark.parametrize(("op_name", "args"), list(_opcheck_cases()))
def test_opcheck(op_name, args):
    torch.library.opcheck(getattr(ops, op_name).default, args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", COVERED)
def test_cuda_products_match_cpu(name):
    obj = _problem(name, l2=0.1, fit_intercept=True) if name in LINEAR else _problem(name)
    x = 0.5 * torch.randn(obj.num_params, dtype=F64)
    v = torch.randn(obj.num_params, 7, dtype=F64)
    cpu, _ = curvature_block_product(obj, x, "native")
    data = {k: t.cuda() for k, t in obj.data.items()}
    gpu_obj = make_objective(obj.name, data, dict(obj.options))
    gpu, label = curvature_block_product(gpu_obj, x.cuda(), "native")
    assert label == "native"
    assert rel_err(gpu(v.cuda()).cpu(), cpu(v)) <= TOL[F64]
