"""Matrix-free curvature analysis (engine/spectrum.py, issue 7).

Eigenvalues are compared with torch.linalg.eigvalsh of the dense float64 Hessian (or
Gauss-Newton matrix) built with torch.func; trace intervals are checked for coverage over
many seeds against the exact trace; verdicts on quadratics whose spectrum is known.
"""

from __future__ import annotations

import math

import pytest
import torch
from hessian_service.engine import ValidationError, make_objective
from hessian_service.engine.analysis.spectrum import (
    SpectrumOptions,
    _Counter,
    analyze_curvature,
    hutchinson_trace,
    hutchpp_trace,
)
from hessian_service.engine.curvature.products import hessian_product
from hessian_service.engine.linalg import classify

F64 = torch.float64
EIGEN_ONLY = {"trace_samples": 0, "density_probes": 0}


def _quadratic(eigenvalues):
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    a = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=F64)) @ q.T
    return make_objective("quadratic", {"A": (a + a.T) / 2, "b": torch.zeros(n, dtype=F64)})


def _assert_extremes(report, dense, k, rel):
    ev = torch.linalg.eigvalsh(dense)
    scale = float(ev.abs().max())
    want_top, want_bottom = ev[-k:].flip(0).tolist(), ev[:k].tolist()
    for got, want in zip(
        report.top_eigenvalues + report.bottom_eigenvalues, want_top + want_bottom, strict=True
    ):
        assert abs(got - want) <= rel * max(abs(want), 1e-3 * scale), (got, want)


def test_extremes_match_eigvalsh_on_least_squares_n500():
    # Column scales: a bulk in [1, 2] with three large and three small outliers, so the wanted
    # eigenvalues are separated and Lanczos converges in tens of products, not hundreds.
    scales = torch.cat(
        [
            torch.tensor([4.0, 3.5, 3.0]),
            torch.linspace(1, 2, 490),
            torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
        ]
    )
    x = torch.randn(900, 499, dtype=F64) * scales.to(F64)
    obj = make_objective(
        "least_squares",
        {"X": x, "y": torch.randn(900, dtype=F64)},
        {"l2": 0.05, "fit_intercept": True},
    )
    params = torch.randn(obj.num_params, dtype=F64)
    opts = SpectrumOptions(top_k=3, bottom_k=3, max_lanczos_iterations=500, **EIGEN_ONLY)
    report = analyze_curvature(obj, params, opts)
    assert obj.num_params == 500 and report.eigenvalues_converged
    _assert_extremes(report, torch.func.hessian(obj.loss)(params), 3, 1e-6)
    assert report.verdict == "minimum" and report.products == report.products_by_part["lanczos"]
    # b = 4 products per block step, the last block cut to the Krylov dimension cap
    assert 4 * (report.lanczos_iterations - 1) < report.products <= 4 * report.lanczos_iterations


@pytest.mark.parametrize("hvp_mode", ["forward_over_reverse", "reverse_over_reverse"])
def test_extremes_match_eigvalsh_on_an_indefinite_mlp_n500(hvp_mode):
    x = torch.randn(40, 5, dtype=F64)
    obj = make_objective(
        "mlp", {"X": x, "y": torch.randn(40, 3, dtype=F64)}, {"layer_sizes": [5, 30, 10, 3]}
    )
    params = 3 * obj.init_params(torch.Generator().manual_seed(0))
    opts = SpectrumOptions(
        top_k=3, bottom_k=3, max_lanczos_iterations=523, hvp_mode=hvp_mode, **EIGEN_ONLY
    )
    report = analyze_curvature(obj, params, opts)
    assert obj.num_params == 523 and report.eigenvalues_converged
    h = torch.func.hessian(obj.loss)(params)
    _assert_extremes(report, h, 3, 1e-6)
    assert report.verdict == "saddle" and not report.stationary
    assert "not a stationary point" in report.verdict_reason


def _designed(top, bulk, bottom):
    """A quadratic whose spectrum is top + bulk + bottom (in a random orthonormal basis)."""
    return _quadratic(list(top) + torch.linspace(*bulk).tolist() + list(bottom))


@pytest.mark.parametrize(
    "top,bulk,bottom",
    [
        ([5.0, 5.0, 5.0, 4.2], (1.0, 3.0, 52), [0.2, 0.2, 0.2, 0.5]),  # a minimum
        ([7.0, 7.0, 6.0, 6.0], (-1.0, 2.0, 60), [-2.0, -2.0, -2.0, -1.5]),  # a saddle
    ],
)
def test_block_lanczos_returns_repeated_eigenvalues_with_their_multiplicity(top, bulk, bottom):
    obj = _designed(top, bulk, bottom)
    n = obj.num_params
    opts = SpectrumOptions(top_k=4, bottom_k=4, max_lanczos_iterations=n, **EIGEN_ONLY)
    report = analyze_curvature(obj, torch.randn(n, dtype=F64), opts)
    assert report.eigenvalues_converged
    _assert_extremes(report, obj.data["A"], 4, 1e-6)
    assert report.verdict == ("minimum" if bottom[0] > 0 else "saddle")


def test_block_lanczos_deflates_an_invariant_krylov_space_and_counts_products():
    # Two distinct eigenvalues: span(B^j Q_0) is invariant after two blocks (dimension 8),
    # so the third block deflates to nothing and the Ritz values are exact.
    obj = _quadratic([3.0] * 25 + [1.0] * 25)
    opts = SpectrumOptions(top_k=4, bottom_k=4, **EIGEN_ONLY)
    report = analyze_curvature(obj, torch.randn(50, dtype=F64), opts)
    assert report.eigenvalues_converged and report.lanczos_iterations == 2
    assert report.products == report.products_by_part["lanczos"] == 8
    for got in report.top_eigenvalues:
        assert math.isclose(got, 3.0, rel_tol=1e-12)
    for got in report.bottom_eigenvalues:
        assert math.isclose(got, 1.0, rel_tol=1e-12)
    # A start block wider than the space (n = 3 < b = 4) is rank deficient: 3 products.
    small = _quadratic([2.0, 2.0, -1.0])
    tiny = analyze_curvature(small, torch.zeros(3, dtype=F64), SpectrumOptions(**EIGEN_ONLY))
    assert tiny.products == 3 and tiny.lanczos_iterations == 1
    assert tiny.top_eigenvalues == pytest.approx([2.0]) and tiny.verdict == "saddle"


@pytest.mark.parametrize("spectrum", ["minimum", "saddle", "maximum"])
def test_an_unconverged_lanczos_claims_only_the_saddle_its_ritz_values_prove(spectrum):
    # a saddle whose one negative eigenvalue Lanczos has not found in 2 steps was reported
    # a minimum; Ritz values of both signs do prove a saddle
    n = 30
    eigenvalues = torch.linspace(0.5, 3.0, n)
    if spectrum == "saddle":
        eigenvalues[0] = -0.01
    elif spectrum == "maximum":
        eigenvalues = -eigenvalues
    obj = _quadratic(eigenvalues.tolist())
    params = torch.randn(n, dtype=F64)
    for iterations in (2, 3):
        opts = SpectrumOptions(max_lanczos_iterations=iterations, **EIGEN_ONLY)
        report = analyze_curvature(obj, params, opts)
        assert not report.eigenvalues_converged
        assert report.verdict == "" and report.verdict_reason.startswith("undetermined")
    mixed = _quadratic([-2.0, *torch.linspace(0.5, 3.0, n - 2).tolist(), 5.0])
    for seed in range(5):  # a Ritz value of each sign proves both signs, converged or not
        opts = SpectrumOptions(max_lanczos_iterations=4, seed=seed, **EIGEN_ONLY)
        report = analyze_curvature(mixed, params, opts)
        if report.bottom_eigenvalues[0] < -1e-3 and report.top_eigenvalues[0] > 1e-3:
            assert report.verdict == "saddle"
        elif not report.eigenvalues_converged:
            assert report.verdict == ""
    full = analyze_curvature(obj, params, SpectrumOptions(max_lanczos_iterations=n, **EIGEN_ONLY))
    assert full.eigenvalues_converged and full.verdict == spectrum


def test_an_unconverged_saddle_must_clear_the_zero_band_of_its_widened_ritz_values(rng):
    # the true extremes (-4.97, 10) are "flat" under relative_tolerance 0.5, but Ritz values
    # (-4.93, 9.66) cleared the band of the underestimated top and were called a saddle
    n = 300
    spectrum = [-4.97, *rng.uniform(0.0, 10.0, n - 2).tolist(), 10.0]
    obj = _quadratic(spectrum)
    assert classify(-4.97, 10.0, 0.5, 1e-10)[0] == "flat"
    for iterations in range(12, 40, 3):
        opts = SpectrumOptions(
            max_lanczos_iterations=iterations, relative_tolerance=0.5, seed=0, **EIGEN_ONLY
        )
        report = analyze_curvature(obj, torch.zeros(n, dtype=F64), opts)
        assert report.verdict in ("", "flat"), (iterations, report.verdict_reason)


def test_block_lanczos_never_exceeds_the_krylov_dimension_cap():
    obj = _quadratic(torch.linspace(-1, 3, 40).tolist())
    opts = SpectrumOptions(
        block_size=3, max_lanczos_iterations=10, eigen_tolerance=1e-14, **EIGEN_ONLY
    )
    report = analyze_curvature(obj, torch.randn(40, dtype=F64), opts)
    assert report.products == 10 and report.lanczos_iterations == 4  # 3 + 3 + 3 + 1
    assert not report.eigenvalues_converged and "did not converge" in report.verdict_reason
    ev = torch.linalg.eigvalsh(obj.data["A"])
    # Ritz values lie inside the spectrum (Cauchy interlacing)
    assert (
        float(ev[0]) <= report.bottom_eigenvalues[0] <= report.top_eigenvalues[0] <= float(ev[-1])
    )


def test_gauss_newton_spectrum_matches_the_dense_ggn():
    x = torch.randn(60, 4, dtype=F64)  # 120 outputs > 86 parameters: a full-rank GGN
    obj = make_objective(
        "mlp", {"X": x, "y": torch.randn(60, 2, dtype=F64)}, {"layer_sizes": [4, 12, 2], "l2": 0.01}
    )
    params = obj.init_params(torch.Generator().manual_seed(2))
    out = obj.outputs(params)
    jac = torch.func.jacrev(obj.outputs)(params).reshape(out.numel(), -1)
    h_out = torch.func.hessian(lambda o: obj.output_loss(o.reshape(out.shape)))(out.reshape(-1))
    ggn = jac.T @ h_out @ jac + 0.01 * torch.eye(obj.num_params, dtype=F64)
    opts = SpectrumOptions(
        curvature="gauss_newton", top_k=2, bottom_k=2, max_lanczos_iterations=200, **EIGEN_ONLY
    )
    report = analyze_curvature(obj, params, opts)
    _assert_extremes(report, ggn, 2, 1e-6)
    assert report.verdict == "minimum"  # a GGN plus l2 is positive definite


def _coverage(estimator, obj, params, samples, seeds):
    a = torch.func.hessian(obj.loss)(params)
    true = float(a.trace())
    hits, errors = 0, []
    for seed in range(seeds):
        counter = _Counter(hessian_product(obj, params), 16)
        gen = torch.Generator().manual_seed(seed)
        est = estimator(counter, obj.num_params, samples, gen, params, 0.95)
        assert est.products == samples == counter.count
        hits += abs(est.estimate - true) <= est.half_width
        errors.append(abs(est.estimate - true))
    return hits / seeds, sum(errors) / seeds


def test_hutchinson_and_hutchpp_intervals_cover_the_true_trace():
    # A few large eigenvalues over many small ones: the case Hutch++ is built for.
    eigs = torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, -25.0]), torch.rand(95) - 0.3])
    obj = _quadratic(eigs.tolist())
    params = torch.randn(100, dtype=F64)
    cover, err = _coverage(hutchinson_trace, obj, params, 30, 30)
    cover_pp, err_pp = _coverage(hutchpp_trace, obj, params, 30, 30)
    # 95% intervals: 30 runs with fewer than 24 hits has probability ~1e-4.
    assert cover >= 0.8 and cover_pp >= 0.8, (cover, cover_pp)
    assert err_pp < 0.5 * err, (err_pp, err)


def test_spectral_density_puts_its_mass_on_the_spectrum():
    eigs = [1.0 + 0.05 * i for i in range(60)] + [8.0 + 0.05 * i for i in range(20)]
    obj = _quadratic(eigs)
    opts = SpectrumOptions(density_probes=8, density_steps=25, trace_samples=0, grid_points=400)
    report = analyze_curvature(obj, torch.randn(80, dtype=F64), opts)
    grid, dens = report.density.grid, report.density.density
    step = float(grid[1] - grid[0])
    assert math.isclose(float(dens.sum()) * step, 1.0, abs_tol=1e-3)
    low = float(dens[(grid > 0.5) & (grid < 4.5)].sum()) * step
    high = float(dens[(grid > 7.5) & (grid < 9.5)].sum()) * step
    assert abs(low - 0.75) < 0.15 and abs(high - 0.25) < 0.15, (low, high)
    assert float(dens[(grid > 4.5) & (grid < 7.0)].max()) < 0.05 * float(dens.max())
    assert abs(report.density.trace - sum(eigs)) < 0.15 * sum(eigs)
    assert report.products_by_part["density"] == 8 * 25


@pytest.mark.parametrize("sigma", [1e-8, 1e-3, 0.2])
def test_a_kernel_narrower_than_the_grid_is_widened_to_it_and_the_density_still_integrates(
    sigma,
):
    # density_sigma=1e-8 fell between the grid's points: every value 0, its integral 0
    eigs = [1.0 + 0.1 * i for i in range(40)]
    opts = SpectrumOptions(
        density_probes=4, density_steps=20, trace_samples=0, grid_points=200, density_sigma=sigma
    )
    report = analyze_curvature(_quadratic(eigs), torch.randn(40, dtype=F64), opts)
    grid, dens = report.density.grid, report.density.density
    step = float(grid[1] - grid[0])
    assert report.density.sigma == max(sigma, step)  # the width used, as reported
    assert math.isclose(float(dens.sum()) * step, 1.0, abs_tol=1e-3)
    used = report.density.sigma  # the mass sits on [1, 4.9], widened by the kernel
    assert float(dens[(grid > 1.0 - 4 * used) & (grid < 4.9 + 4 * used)].sum()) * step > 0.99


@pytest.mark.parametrize(
    "eigenvalues,verdict",
    [
        ([2.0, -2.0], "saddle"),  # f = x^2 - y^2 at its critical point
        ([3.0, 1.0, 0.5], "minimum"),
        ([-1.0, -4.0], "maximum"),
        ([1.0, 0.0], "flat"),  # semi-definite: flat along one direction
        ([0.0, 0.0, 0.0], "flat"),
    ],
)
def test_verdict_at_a_critical_point(eigenvalues, verdict):
    obj = _quadratic(eigenvalues)
    report = analyze_curvature(obj, torch.zeros(len(eigenvalues), dtype=F64))
    assert report.verdict == verdict, report.verdict_reason
    assert report.stationary and report.eigenvalues_converged


def test_tolerances_of_zero_make_the_verdict_exact():
    # diag(1, 1e-8) in a random basis: the default relative tolerance 1e-6 counts 1e-8 as 0
    obj = _quadratic([1.0, 1e-8])
    origin = torch.zeros(2, dtype=F64)
    assert analyze_curvature(obj, origin, SpectrumOptions(**EIGEN_ONLY)).verdict == "flat"
    exact = SpectrumOptions(
        relative_tolerance=0.0, absolute_tolerance=0.0, gradient_tolerance=0.0, **EIGEN_ONLY
    )
    report = analyze_curvature(obj, origin, exact)
    assert report.verdict == "minimum" and report.stationary, report.verdict_reason
    assert report.bottom_eigenvalues[0] == pytest.approx(1e-8, rel=1e-6)
    # max|g| of 1e-300 is no longer 0
    assert not analyze_curvature(obj, torch.full((2,), 1e-300, dtype=F64), exact).stationary


def test_an_eigen_tolerance_of_zero_runs_lanczos_to_its_cap():
    obj = _quadratic(torch.linspace(-1, 3, 40).tolist())
    params = torch.randn(40, dtype=F64)
    opts = SpectrumOptions(eigen_tolerance=0.0, max_lanczos_iterations=12, **EIGEN_ONLY)
    report = analyze_curvature(obj, params, opts)
    assert report.products == 12 and not report.eigenvalues_converged
    full = SpectrumOptions(eigen_tolerance=0.0, max_lanczos_iterations=40, **EIGEN_ONLY)
    report = analyze_curvature(obj, params, full)  # the whole space: exact, so converged
    assert report.eigenvalues_converged
    assert report.top_eigenvalues[0] == pytest.approx(3.0, rel=1e-12)
    assert report.bottom_eigenvalues[0] == pytest.approx(-1.0, rel=1e-12)


def test_rosenbrock_minimum_is_a_minimum_and_its_start_is_not_stationary():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    at_min = analyze_curvature(obj, torch.ones(2, dtype=F64), SpectrumOptions(**EIGEN_ONLY))
    h = torch.tensor([[802.0, -400.0], [-400.0, 200.0]], dtype=F64)
    ev = torch.linalg.eigvalsh(h)
    assert at_min.verdict == "minimum" and at_min.stationary
    assert math.isclose(at_min.top_eigenvalues[0], float(ev[1]), rel_tol=1e-10)
    assert math.isclose(at_min.bottom_eigenvalues[0], float(ev[0]), rel_tol=1e-8)
    # (0.5, 1): 1200 x^2 - 400 y + 2 = -98 < 0 < the other eigenvalue: indefinite
    away = analyze_curvature(
        obj, torch.tensor([0.5, 1.0], dtype=F64), SpectrumOptions(**EIGEN_ONLY)
    )
    assert away.verdict == "saddle" and not away.stationary


def test_reports_are_deterministic_per_seed_and_count_products():
    obj = _quadratic(torch.linspace(-1, 3, 40).tolist())
    params = torch.randn(40, dtype=F64)
    small = {"density_probes": 2, "density_steps": 10}
    first = analyze_curvature(obj, params, SpectrumOptions(seed=5, **small))
    again = analyze_curvature(obj, params, SpectrumOptions(seed=5, **small))
    other = analyze_curvature(obj, params, SpectrumOptions(seed=6, **small))
    assert first.trace_hutchinson == again.trace_hutchinson
    assert torch.equal(first.density.density, again.density.density)
    assert first.trace_hutchinson != other.trace_hutchinson
    assert first.products == sum(first.products_by_part.values())
    assert first.products_by_part["hutchinson"] == first.products_by_part["hutchpp"] == 30
    assert first.to_dict()["verdict"] == "saddle"


@pytest.mark.parametrize(
    "values,field",
    [
        ({"top_k": 0}, "options.top_k"),
        ({"bottom_k": 1.5}, "options.bottom_k"),
        ({"block_size": 0}, "options.block_size"),
        ({"block_size": 2.0}, "options.block_size"),
        ({"curvature": "fisher"}, "options.curvature"),
        ({"max_lanczos_iterations": 1}, "options.max_lanczos_iterations"),
        ({"eigen_tolerance": -1e-300}, "options.eigen_tolerance"),
        ({"eigen_tolerance": 1.0}, "options.eigen_tolerance"),
        ({"gradient_tolerance": -1e-9}, "options.gradient_tolerance"),
        ({"absolute_tolerance": math.inf}, "options.absolute_tolerance"),
        ({"trace_samples": 2}, "options.trace_samples"),
        ({"confidence": 1.0}, "options.confidence"),
        ({"density_probes": -1}, "options.density_probes"),
        ({"density_sigma": -0.1}, "options.density_sigma"),
        ({"grid_points": 1}, "options.grid_points"),
        ({"batch_size": 0}, "options.batch_size"),
        ({"relative_tolerance": 2.0}, "options.relative_tolerance"),
        ({"seed": -3}, "options.seed"),
        ({"hvp_mode": "symbolic"}, "options.hvp_mode"),
        ({"colour": "red"}, "options.colour"),
    ],
)
def test_bad_options_name_the_field(values, field):
    with pytest.raises(ValidationError) as err:
        SpectrumOptions.from_dict(values)
    assert err.value.field == field


def test_gauss_newton_on_an_objective_without_it_names_the_field():
    obj = make_objective("rosenbrock", {}, {"dim": 2})
    with pytest.raises(ValidationError) as err:
        analyze_curvature(obj, torch.ones(2, dtype=F64), SpectrumOptions(curvature="gauss_newton"))
    assert err.value.field == "options.curvature"


def test_block_lanczos_matches_eigvalsh_on_logistic_regression_of_breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=F64)
    x = (x - x.mean(dim=0)) / x.std(dim=0)
    obj = make_objective(
        "logistic_regression",
        {"X": x, "y": torch.tensor(data.target, dtype=F64)},
        {"l2": 1e-3, "fit_intercept": True},
    )
    params = 0.1 * torch.randn(obj.num_params, dtype=F64)
    opts = SpectrumOptions(top_k=3, bottom_k=3, max_lanczos_iterations=obj.num_params, **EIGEN_ONLY)
    report = analyze_curvature(obj, params, opts)
    assert obj.num_params == 31 and report.eigenvalues_converged
    _assert_extremes(report, torch.func.hessian(obj.loss)(params), 3, 1e-6)
    assert report.verdict == "minimum"  # logistic loss + l2 is strictly convex
