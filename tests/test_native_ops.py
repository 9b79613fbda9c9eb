"""torch.ops.hessian.* against float64 references, on fresh random inputs every run.

Solves: directions against a float64 solve on well-conditioned SPD matrices; indefinite and
singular H escalate the damping like the autograd reference and (H + lambda I) d = -g
holds. Assembly: loss, gradient and Hessian against torch.func on the float64 problem.
Tolerances: float64 1e-12, float32 1e-5 relative (Frobenius / 2-norm). Every op also
passes torch.library.opcheck.
"""

from __future__ import annotations

import pytest
import torch
from hessian_service.engine import linalg
from native_support import (
    F32,
    F64,
    SIZES,
    TOL,
    damped_at_rounding,
    objective_of_size,
    rel_err,
    require_native,
    spd,
    symmetric_with,
    upcast,
)

require_native()
ops = torch.ops.hessian
DTYPES = (F64, F32)
ASSEMBLED = ("mse", "quadratic", "least_squares", "logistic_regression", "softmax_regression")


def _system_args(objective):
    o = objective.options
    if objective.name == "mse":
        return (objective.data["target"],)
    if objective.name == "quadratic":
        return objective.data["A"], objective.data["b"]
    if objective.name == "softmax_regression":
        return (
            objective.data["X"],
            objective.data["labels"],
            o["num_classes"],
            o["l2"],
            o["fit_intercept"],
        )
    return objective.data["X"], objective.data["y"], o["l2"], o["fit_intercept"]


def _system_op(name):
    return getattr(ops, f"{name}_system")


def _reference_system(objective, x):
    ref = upcast(objective)
    x64 = x.double()
    return ref.loss(x64), torch.func.grad(ref.loss)(x64), torch.func.hessian(ref.loss)(x64)


# ---------------------------------------------------------------- damped Cholesky


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_damped_cholesky_spd_matches_float64_solve(n, dtype):
    h64 = spd(n)
    h64 = h64 + 1e-3 * torch.randn(n, n, dtype=F64) * (n > 1)  # asymmetric: must symmetrise
    g64 = torch.randn(n, dtype=F64)
    sym = (h64 + h64.T) / 2
    ref = -torch.linalg.solve(sym, g64)
    d, lam, attempts = ops.damped_cholesky(h64.to(dtype), g64.to(dtype), 0.0, 60)
    assert d.dtype == dtype and d.shape == (n,)
    assert int(attempts) == 1 and float(lam) == 0.0
    assert rel_err(d, ref) <= TOL[dtype] * 10  # cond(H) <= 10 on top of the op's rounding
    auto = linalg.damped_cholesky_solve(h64.to(dtype), g64.to(dtype), 0.0)
    assert rel_err(d, auto.direction) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_damped_cholesky_initial_damping_is_applied(n, dtype):
    h64, g64 = spd(n), torch.randn(n, dtype=F64)
    d, lam, attempts = ops.damped_cholesky(h64.to(dtype), g64.to(dtype), 2.5, 60)
    ref = -torch.linalg.solve(h64 + 2.5 * torch.eye(n, dtype=F64), g64)
    assert float(lam) == 2.5 and int(attempts) == 1
    assert rel_err(d, ref) <= TOL[dtype] * 10


def _check_damped(h, g, dtype, d, lam, attempts):
    """No NaN, damping escalated, and (sym(H) + lambda I) d = -g to rounding."""
    assert int(attempts) > 1 and float(lam) > 0
    assert bool(torch.isfinite(d).all())
    h64, g64, d64 = h.double(), g.double(), d.double()
    a = (h64 + h64.T) / 2 + float(lam) * torch.eye(h.shape[0], dtype=F64)
    residual = float((a @ d64 + g64).norm())
    scale = float(torch.linalg.matrix_norm(a, 2)) * float(d64.norm()) + float(g64.norm())
    assert residual <= 50 * TOL[dtype] * scale, (residual, scale)


# Large n (the parallel symmetrise / restore passes around LAPACK's potrf): an SPD matrix with
# initial damping, an indefinite one whose retries restore the matrix from the triangle potrf
# leaves alone, a singular one.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [512, 700])
def test_large_damped_cholesky_matches_reference(n, dtype):
    h64 = spd(n) + 1e-3 * torch.randn(n, n, dtype=F64)
    g64 = torch.randn(n, dtype=F64)
    sym = (h64 + h64.T) / 2 + 0.5 * torch.eye(n, dtype=F64)
    d, lam, attempts = ops.damped_cholesky(h64.to(dtype), g64.to(dtype), 0.5, 60)
    assert float(lam) == 0.5 and int(attempts) == 1
    assert rel_err(d, -torch.linalg.solve(sym, g64)) <= TOL[dtype] * 10
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
    evals[torch.randperm(n)[: n // 5]] *= -1
    h = symmetric_with(evals, dtype)
    g = torch.randn(n, dtype=dtype)
    d, lam, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    _check_damped(h, g, dtype, d, lam, attempts)
    ref = linalg.damped_cholesky_solve(h, g, 0.0)
    assert int(attempts) == ref.attempts and float(lam) == pytest.approx(ref.damping, rel=1e-12)
    assert rel_err(d, ref.direction) <= TOL[dtype] * 100
    singular = torch.diag(torch.rand(n, dtype=F64) * (torch.rand(n) < 0.5)).to(dtype)
    _check_damped(singular, g, dtype, *ops.damped_cholesky(singular, g, 0.0, 60))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 7, 40, 100])  # the hand-written loops, then LAPACK
@pytest.mark.parametrize("ulps", [1, 2, 3])
def test_damping_within_rounding_of_the_lowest_eigenvalue_escalates(n, dtype, ulps):
    """A lambda a few ulps above -lambda_min(H) factors (its pivot is rounding noise) and
    its solve is a step of 1e13: every solve must go on to 10 lambda, whose direction is the
    float64 solve's. H: -mu on a random diagonal position, a random SPD block elsewhere, so
    that pivot is exactly H_ii + lambda (native_support.damped_at_rounding)."""
    h, g, lam = damped_at_rounding(n, dtype, ulps)
    auto = linalg.damped_cholesky_solve(h, g, lam)
    for name, (d, used, attempts) in (
        ("native", ops.damped_cholesky(h, g, lam, 60)),
        ("autograd", (auto.direction, auto.damping, auto.attempts)),
    ):
        assert int(attempts) >= 2 and float(used) == pytest.approx(10 * lam, rel=1e-12), name
        a = h.double() + float(used) * torch.eye(n, dtype=F64)
        ref = -torch.linalg.solve(a, g.double())
        assert rel_err(d, ref) <= TOL[dtype] * 100, name


def test_a_well_posed_float32_matrix_is_not_damped_for_its_size():
    """The pivot bar is 16 eps, not the worst case n eps: float32 at n = 2000 with condition
    1e6 and spread eigenvectors (its smallest pivot ratio about 1.6e-4, under n eps =
    2.4e-4) factors accurately and is solved undamped on both paths, to within the float64
    solve's cond x eps (a damped solve missed it by 99%)."""
    n = 2000
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64))
    h = ((q * torch.logspace(0, -6, n, dtype=F64)) @ q.T).to(F32)
    g = torch.randn(n, dtype=F32)
    ref = -torch.linalg.solve(h.double(), g.double())
    auto = linalg.damped_cholesky_solve(h, g, 0.0)
    d, lam, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    for direction, used, tries in (
        (auto.direction, auto.damping, auto.attempts),
        (d, lam, attempts),
    ):
        assert float(used) == 0.0 and int(tries) == 1
        assert rel_err(direction, ref) <= 0.1  # cond 1e6 x eps 1.2e-7, with room


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [s for s in SIZES if s > 1])
def test_damped_cholesky_indefinite_escalates_like_reference(n, dtype):
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
    evals[: max(1, n // 3)] *= -1  # a third of the spectrum negative
    h = symmetric_with(evals, dtype)
    g = torch.randn(n, dtype=dtype)
    d, lam, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    _check_damped(h, g, dtype, d, lam, attempts)
    ref = linalg.damped_cholesky_solve(h, g, 0.0)
    assert int(attempts) == ref.attempts
    assert float(lam) == pytest.approx(ref.damping, rel=1e-12)
    assert rel_err(d, ref.direction) <= TOL[dtype] * 100


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_damped_cholesky_singular_escalates(n, dtype):
    diag = torch.rand(n, dtype=F64) + 0.5
    diag[torch.randperm(n)[: max(1, n // 2)]] = 0.0  # exactly singular
    perm = torch.randperm(n)
    h = torch.diag(diag)[perm][:, perm].to(dtype)  # P D P^T: still exactly singular
    g = torch.randn(n, dtype=dtype)
    d, lam, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    _check_damped(h, g, dtype, d, lam, attempts)
    floor = torch.finfo(dtype).eps ** 0.5 * (float(diag.max()) or 1.0)  # relative (1 for 0)
    assert float(lam) == pytest.approx(floor, rel=1e-6)  # the first escalation suffices
    zero = torch.zeros(n, n, dtype=dtype)
    d0, lam0, attempts0 = ops.damped_cholesky(zero, g, 0.0, 60)
    _check_damped(zero, g, dtype, d0, lam0, attempts0)


def test_damped_cholesky_reports_failure_and_rejects_bad_input():
    h = torch.full((3, 3), float("nan"), dtype=F64)
    _, _, attempts = ops.damped_cholesky(h, torch.ones(3, dtype=F64), 0.0, 5)
    assert int(attempts) == 0  # no lambda helps a NaN matrix: reported, not NaN returned
    big = torch.full((100, 100), float("nan"), dtype=F64)
    _, _, attempts = ops.damped_cholesky(big, torch.ones(100, dtype=F64), 0.0, 5)
    assert int(attempts) == 0
    with pytest.raises(RuntimeError, match="square"):
        ops.damped_cholesky(torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64), 0.0, 5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.damped_cholesky(torch.eye(2, dtype=F64), torch.ones(2, dtype=F32), 0.0, 5)
    with pytest.raises(RuntimeError, match="damping"):
        ops.damped_cholesky(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), -1.0, 5)


# ---------------------------------------------------------------- saddle-free


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_saddle_free_matches_float64_reference(n, dtype):
    evals = torch.empty(n, dtype=F64).uniform_(1.0, 10.0)
    negative = int(torch.randint(0, n + 1, ()))
    evals[:negative] *= -1
    h = symmetric_with(evals, dtype)
    g = torch.randn(n, dtype=dtype)
    d, count = ops.saddle_free(h, g, 1e-8, float(h.shape[0]))
    assert int(count) == negative and count.dtype == torch.int64
    ref = linalg.saddle_free_direction(h.double(), g.double(), 1e-8)
    assert ref.negative_eigenvalues == negative
    assert rel_err(d, ref.direction) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotated", [False, True])
def test_saddle_free_counts_against_the_rounding_tolerance_like_python(dtype, rotated):
    """An eigenvalue of -1e-18 relative is below n eps max|lambda|: 0 negatives, natively
    and in Python (the op once counted it as 1); one clearly negative counts 1 on both."""
    n = 6
    base = torch.empty(n, dtype=F64).uniform_(1.0, 10.0)
    g = torch.randn(n, dtype=dtype)
    for tiny, expected in ((-1e-18 * float(base.max()), 0), (-0.5, 1)):
        evals = base.clone()
        evals[int(torch.randint(0, n, ()))] = tiny
        h = symmetric_with(evals, dtype) if rotated else torch.diag(evals).to(dtype)
        _, count = ops.saddle_free(h, g, 1e-8, float(h.shape[0]))
        assert int(count) == expected
        assert linalg.negative_eigenvalues(h) == expected
        assert linalg.saddle_free_direction(h, g, 1e-8).negative_eigenvalues == expected
    # over rows data rows the tolerance is log2(rows) eps max|lambda| once above n eps
    rows, evals = 10_000, base.clone()
    evals[0] = -10 * torch.finfo(dtype).eps * float(base.max())  # within log2(rows) = 13.3 eps
    h = torch.diag(evals).to(dtype)
    assert int(ops.saddle_free(h, g, 1e-8, linalg.rounding_factor(n, rows))[1]) == 0
    assert linalg.negative_eigenvalues(h, rows) == 0 and linalg.negative_eigenvalues(h) == 1
    assert linalg.saddle_free_direction(h, g, 1e-8, rows).negative_eigenvalues == 0


# ---------------------------------------------------------------- analytic assembly


def _cases():
    for name in ASSEMBLED:
        for n in SIZES:
            if name == "softmax_regression" and n == 1:
                continue
            for dtype in DTYPES:
                yield pytest.param(name, n, dtype, id=f"{name}-{n}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("name", "n", "dtype"), list(_cases()))
def test_system_matches_torch_func_float64(name, n, dtype):
    objective = objective_of_size(name, n, dtype)
    x = 0.5 * torch.randn(n, dtype=dtype)
    loss, g, h = _system_op(name)(x, *_system_args(objective))
    assert loss.shape == () and g.shape == (n,) and h.shape == (n, n)
    assert loss.dtype == g.dtype == h.dtype == dtype
    ref_loss, ref_g, ref_h = _reference_system(objective, x)
    tol = TOL[dtype]
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(g, ref_g) <= tol
    assert rel_err(h, ref_h) <= tol


@pytest.mark.parametrize("fit_intercept", [False, True])
def test_logistic_system_is_exact_for_large_logits(fit_intercept):
    x = torch.tensor([[40.0, -1.0], [-35.0, 2.0], [0.5, 30.0], [-60.0, -45.0]], dtype=F64)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F64)
    from hessian_service.engine import make_objective

    objective = make_objective(
        "logistic_regression", {"X": x, "y": y}, {"fit_intercept": fit_intercept}
    )
    p = torch.ones(objective.num_params, dtype=F64)
    loss, g, h = ops.logistic_regression_system(p, x, y, 0.0, fit_intercept)
    ref_loss, ref_g, ref_h = _reference_system(objective, p)
    assert rel_err(loss, ref_loss) <= 1e-14 and rel_err(g, ref_g) <= 1e-14
    assert bool(torch.isfinite(h).all()) and rel_err(h, ref_h) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fit_intercept", [False, True])
@pytest.mark.parametrize(("rows", "d"), [(1300, 37), (40000, 7)])
def test_logistic_system_row_pass_over_chunks_and_strided_data(dtype, fit_intercept, rows, d):
    """The CPU row pass of a small float64 problem sums rows in fixed chunks of 512: 1,300
    rows span three; 40,000 rows of 8 values are enough for both threads to take chunks.
    X is stored transposed (not contiguous). Against torch.func in float64 (float32 takes
    the ATen path), and in float64 the same bits whatever the thread count (the chunks'
    sums are added in order)."""
    from hessian_service.engine import make_objective

    x = (torch.randn(d, rows, dtype=F64) / d**0.5).T.to(dtype)  # a transposed view
    y = torch.randint(0, 2, (rows,)).to(dtype)
    assert not x.is_contiguous()
    options = {"l2": 0.05, "fit_intercept": fit_intercept}
    objective = make_objective("logistic_regression", {"X": x, "y": y}, options)
    p = torch.randn(objective.num_params, dtype=dtype)
    got = ops.logistic_regression_system(p, x, y, 0.05, fit_intercept)
    for value, ref in zip(got, _reference_system(objective, p), strict=True):
        assert rel_err(value, ref) <= TOL[dtype]
    assert torch.equal(got[2], got[2].T)
    if dtype != F64:
        return  # ATen's float32 reductions split by thread count
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.logistic_regression_system(p, x, y, 0.05, fit_intercept)
        torch.set_num_threads(2)
        pair = ops.logistic_regression_system(p, x, y, 0.05, fit_intercept)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(alone, pair, strict=True))


@pytest.mark.parametrize("rows", [8192, 8193])  # N n^2 = 2^23 (the tiled loop), then GEMM
def test_gauss_newton_at_the_tiled_product_threshold(rows):
    jac = torch.randn(rows, 32, dtype=F64) / rows**0.5
    w = torch.rand(rows, dtype=F64) + 0.1
    for weights, ref in ((None, jac.T @ jac), (w, jac.T @ (jac * w[:, None]))):
        out = ops.gauss_newton(jac, weights)
        assert rel_err(out, ref) <= 1e-13
        assert torch.equal(out, out.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gauss_newton_matches_float64(n, dtype, weighted):
    m = 2 * n + 3
    jac = torch.randn(m, n, dtype=F64) / m**0.5
    w = torch.rand(m, dtype=F64) + 0.1
    ref = jac.T @ (jac * w[:, None]) if weighted else jac.T @ jac
    out = ops.gauss_newton(jac.to(dtype), w.to(dtype) if weighted else None)
    assert out.shape == (n, n) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    assert torch.equal(out, out.T) or rel_err(out, out.T) <= TOL[dtype]


def test_gauss_newton_large_blocked_product_is_symmetric_and_exact():
    jac = torch.randn(700, 1000, dtype=F64)
    out = ops.gauss_newton(jac, None)
    assert rel_err(out, jac.T @ jac) <= 1e-13
    assert torch.equal(out, out.T)  # the mirrored blocks are copies


def test_system_ops_reject_mismatched_inputs():
    x = torch.zeros(3, dtype=F64)
    with pytest.raises(RuntimeError, match="target"):
        ops.mse_system(x, torch.zeros(3, dtype=F32))
    with pytest.raises(RuntimeError, match="params must have 4"):
        ops.least_squares_system(
            x, torch.ones(5, 3, dtype=F64), torch.ones(5, dtype=F64), 0.0, True
        )
    with pytest.raises(RuntimeError, match="labels"):
        ops.softmax_regression_system(
            torch.zeros(4, dtype=F64),
            torch.ones(5, 1, dtype=F64),
            torch.zeros(5, dtype=torch.int32),
            2,
            0.0,
            True,
        )


# ---------------------------------------------------------------- fused steps


@pytest.mark.parametrize(("name", "n", "dtype"), list(_cases()))
def test_fused_step_matches_reference_newton_step(name, n, dtype):
    objective = objective_of_size(name, n, dtype)
    x = 0.3 * torch.randn(n, dtype=dtype)
    lr, damping = 0.7, 0.05
    step = getattr(ops, f"{name}_newton_step")
    x_new, stats = step(x, *_system_args(objective), lr, damping, 60)
    ref_loss, ref_g, ref_h = _reference_system(objective, x)
    ref_d = -torch.linalg.solve(ref_h + damping * torch.eye(n, dtype=F64), ref_g)
    tol = TOL[dtype]
    assert x_new.shape == (n,) and x_new.dtype == dtype
    assert rel_err(x_new - x, lr * ref_d) <= 10 * tol
    loss, gnorm, gmax, step_norm, lam, attempts, finite, slope = stats.tolist()
    assert (lam, attempts, finite) == (damping, 1.0, 1.0)
    assert loss == pytest.approx(float(ref_loss), rel=tol)
    assert gnorm == pytest.approx(float(ref_g.norm()), rel=tol)
    assert gmax == pytest.approx(float(ref_g.abs().max()), rel=tol)
    assert step_norm == pytest.approx(lr * float(ref_d.norm()), rel=10 * tol)
    # the slope g.d of the unscaled direction (the line search's Armijo test), < 0 here
    assert slope == pytest.approx(float(ref_g @ ref_d), rel=10 * tol) and slope < 0


def test_fused_step_flags_non_finite_points():
    objective = objective_of_size("logistic_regression", 5)
    x = torch.zeros(5, dtype=F64)
    x[2] = float("nan")
    _, stats = ops.logistic_regression_newton_step(x, *_system_args(objective), 1.0, 0.0, 60)
    assert stats[6] == 0.0
    t = torch.rand(4, dtype=F64)
    _, stats = ops.mse_newton_step(
        torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=F64), t, 1.0, 0.0, 60
    )
    assert stats[6] == 0.0


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("n", [4, 65, 300])  # the hand-written loops, then LAPACK in place
def test_fused_quadratic_escalates_on_indefinite(n, damping):
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 3.0)
    evals[: max(1, n // 4)] *= -1
    a = symmetric_with(evals)
    b = torch.randn(n, dtype=F64)
    x = torch.randn(n, dtype=F64)
    x_new, stats = ops.quadratic_newton_step(x, a, b, 1.0, damping, 60)
    ref = linalg.damped_cholesky_solve(a, a @ x - b, damping)
    assert stats[5] == ref.attempts > 1 and stats[4] == pytest.approx(ref.damping, rel=1e-12)
    assert rel_err(x_new - x, ref.direction) <= 1e-10


# ---------------------------------------------------------------- opcheck


def _opcheck_cases():
    h = spd(6)
    g = torch.randn(6, dtype=F64)
    yield "damped_cholesky", (h, g, 0.0, 60)
    yield "damped_cholesky", (spd(130), torch.randn(130, dtype=F64), 0.1, 60)
    yield "saddle_free", (symmetric_with(torch.tensor([-1.0, 2.0, 3.0])), g[:3], 1e-8, 3.0)
    jac = torch.randn(9, 4, dtype=F64)
    yield "gauss_newton", (jac, torch.rand(9, dtype=F64))
    yield "gauss_newton", (jac, None)
    for name in ASSEMBLED:
        objective = objective_of_size(name, 25)
        x = 0.1 * torch.randn(25, dtype=F64)
        args = _system_args(objective)
        yield f"{name}_system", (x, *args)
        yield f"{name}_newton_step", (x, *args, 1.0, 0.0, 60)


@pytest.mark.parametrize(("op_name", "args"), list(_opcheck_cases()))
def test_opcheck(op_name, args):
    torch.library.opcheck(getattr(ops, op_name).default, args)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ASSEMBLED)
def test_cuda_ops_match_cpu(name):
    objective = objective_of_size(name, 25)
    x = 0.3 * torch.randn(25, dtype=F64)
    args = _system_args(objective)
    moved = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    cpu = _system_op(name)(x, *args)
    gpu = _system_op(name)(x.cuda(), *moved)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda and rel_err(b.cpu(), a) <= 1e-12
    step_cpu = getattr(ops, f"{name}_newton_step")(x, *args, 1.0, 0.1, 60)
    step_gpu = getattr(ops, f"{name}_newton_step")(x.cuda(), *moved, 1.0, 0.1, 60)
    assert rel_err(step_gpu[0].cpu(), step_cpu[0]) <= 1e-12
    h, g = spd(300).cuda(), torch.randn(300, dtype=F64).cuda()
    d, _, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    assert int(attempts) == 1 and rel_err(d.cpu(), -torch.linalg.solve(h, g).cpu()) <= 1e-11
    d, count = ops.saddle_free(h, g, 1e-8, float(h.shape[0]))
    assert int(count) == 0 and d.is_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_the_softmax_hessian_is_exactly_symmetric(dtype, fit_intercept):
    """Its terms round differently on either side of the diagonal, and the solves read one
    triangle or the other (the fused step's LAPACK call and damped_cholesky differ): an
    asymmetry of an ulp made the fused and general steps differ by an ulp."""
    x = torch.randn(300, 6, dtype=dtype)
    labels = torch.randint(0, 5, (300,))
    params = 0.5 * torch.randn((6 + fit_intercept) * 5, dtype=dtype)
    _, _, h = torch.ops.hessian.softmax_regression_system(params, x, labels, 5, 1e-3, fit_intercept)
    assert torch.equal(h, h.T)
