"""The CUDA kernels of csrc/cuda/ against the CPU op and float64 references (GPU only).

Every test here is marked `cuda` and skipped without a CUDA device. They were written on a
machine with no GPU: until `bench/gpu_check.sh` has run them on one, the kernels are only
compile-checked. Fresh random inputs every run; sizes 1, 2, 25, 64 (the kernels' range) plus
65 and 300 (handed to the ATen path); float64 and float32 with the tolerances of
test_native_ops.py (1e-12 / 1e-5 relative, times the condition number where one enters).
"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from hessian_service.engine import linalg
from native_support import (
    F32,
    F64,
    TOL,
    objective_of_size,
    rel_err,
    require_native,
    spd,
    symmetric_with,
    upcast,
)

require_native()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
ops = torch.ops.hessian
DTYPES = (F64, F32)
KERNEL_SIZES = (1, 2, 25, 64)
ATEN_SIZES = (65, 300)


def _cuda(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.cuda() for t in tensors)


def _assert_solves(h, g, dtype, d, lam, attempts) -> None:
    """d is finite and (sym(H) + lambda I) d = -g to the dtype's rounding."""
    assert int(attempts) >= 1 and bool(torch.isfinite(d).all())
    h64, g64, d64 = h.double().cpu(), g.double().cpu(), d.double().cpu()
    a = (h64 + h64.T) / 2 + float(lam) * torch.eye(h.shape[0], dtype=F64)
    residual = float((a @ d64 + g64).norm())
    scale = float(torch.linalg.matrix_norm(a, 2)) * float(d64.norm()) + float(g64.norm())
    assert residual <= 50 * TOL[dtype] * scale, (residual, scale)


def test_extension_holds_the_cuda_kernels():
    """The build compiled csrc/cuda/ (a CppExtension fallback would pass the rest vacuously)."""
    from hessian_service import _C

    image = pathlib.Path(_C.__file__).read_bytes()
    for kernel in (b"damped_cholesky_kernel", b"mse_step_kernel", b"quadratic_step_kernel"):
        assert kernel in image, kernel


# ---------------------------------------------------------------- damped Cholesky


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", KERNEL_SIZES + ATEN_SIZES)
def test_damped_cholesky_spd_matches_cpu_and_float64(n, dtype):
    h64 = spd(n) + 1e-3 * torch.randn(n, n, dtype=F64) * (n > 1)  # asymmetric: symmetrised
    g64 = torch.randn(n, dtype=F64)
    ref = -torch.linalg.solve((h64 + h64.T) / 2, g64)
    h, g = h64.to(dtype), g64.to(dtype)
    d, lam, attempts = ops.damped_cholesky(*_cuda(h, g), 0.0, 60)
    assert d.is_cuda and lam.is_cuda and attempts.is_cuda
    assert d.dtype == dtype and lam.dtype == F64 and attempts.dtype == torch.int64
    assert (int(attempts), float(lam)) == (1, 0.0)
    assert rel_err(d.cpu(), ref) <= TOL[dtype] * 10  # cond(H) <= 10
    d_cpu, _, _ = ops.damped_cholesky(h, g, 0.0, 60)
    assert rel_err(d.cpu(), d_cpu) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", KERNEL_SIZES)
def test_damped_cholesky_initial_damping_and_noncontiguous_input(n, dtype):
    h64, g64 = spd(n), torch.randn(n, dtype=F64)
    ref = -torch.linalg.solve(h64 + 2.5 * torch.eye(n, dtype=F64), g64)
    h_t = h64.to(dtype).cuda().T  # a transposed view: the op copies it contiguous
    g_strided = torch.stack([g64, g64], 1).to(dtype).cuda()[:, 0]
    d, lam, attempts = ops.damped_cholesky(h_t, g_strided, 2.5, 60)
    assert (int(attempts), float(lam)) == (1, 2.5)
    assert rel_err(d.cpu(), ref) <= TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (2, 25, 64, 65))
def test_damped_cholesky_indefinite_escalates_like_cpu(n, dtype):
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
    evals[: max(1, n // 3)] *= -1
    h = symmetric_with(evals, dtype)
    g = torch.randn(n, dtype=dtype)
    d, lam, attempts = ops.damped_cholesky(*_cuda(h, g), 0.0, 60)
    _assert_solves(h, g, dtype, d, lam, attempts)
    d_cpu, lam_cpu, attempts_cpu = ops.damped_cholesky(h, g, 0.0, 60)
    assert int(attempts) == int(attempts_cpu) > 1
    assert float(lam) == pytest.approx(float(lam_cpu), rel=1e-12)
    assert rel_err(d.cpu(), d_cpu) <= TOL[dtype] * 100


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", KERNEL_SIZES)
def test_damped_cholesky_singular_takes_the_floor(n, dtype):
    diag = torch.rand(n, dtype=F64) + 0.5
    diag[torch.randperm(n)[: max(1, n // 2)]] = 0.0
    perm = torch.randperm(n)
    h = torch.diag(diag)[perm][:, perm].to(dtype)
    g = torch.randn(n, dtype=dtype)
    d, lam, attempts = ops.damped_cholesky(*_cuda(h, g), 0.0, 60)
    _assert_solves(h, g, dtype, d, lam, attempts)
    floor = torch.finfo(dtype).eps ** 0.5 * max(1.0, float(diag.max()))
    # rel 1e-6: the op scales by diag(H) in the storage type, the floor here by float64 diag
    assert int(attempts) == 2 and float(lam) == pytest.approx(floor, rel=1e-6)
    zero = torch.zeros(n, n, dtype=dtype)
    d0, lam0, attempts0 = ops.damped_cholesky(*_cuda(zero, g), 0.0, 60)
    _assert_solves(zero, g, dtype, d0, lam0, attempts0)


def test_damped_cholesky_nan_reports_failure_with_a_zero_direction():
    h = torch.full((3, 3), float("nan"), dtype=F64).cuda()
    d, lam, attempts = ops.damped_cholesky(h, torch.ones(3, dtype=F64).cuda(), 0.0, 5)
    _, lam_cpu, _ = ops.damped_cholesky(h.cpu(), torch.ones(3, dtype=F64), 0.0, 5)
    assert int(attempts) == 0 and torch.equal(d.cpu(), torch.zeros(3, dtype=F64))
    assert float(lam) == pytest.approx(float(lam_cpu), rel=1e-12)


def test_damped_cholesky_bad_input_raises_the_cpu_errors_on_cuda():
    eye = torch.eye(2, dtype=F64).cuda()
    with pytest.raises(RuntimeError, match="square"):
        ops.damped_cholesky(torch.ones(2, 3, dtype=F64).cuda(), eye[0], 0.0, 5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.damped_cholesky(eye, torch.ones(2, dtype=F32).cuda(), 0.0, 5)
    with pytest.raises(RuntimeError, match="damping"):
        ops.damped_cholesky(eye, eye[0], -1.0, 5)
    with pytest.raises(RuntimeError, match="max_attempts"):
        ops.damped_cholesky(eye, eye[0], 0.0, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_damped_cholesky_batch_of_queued_systems(dtype):
    """48 mixed systems queued on one stream without a sync in between, each checked after."""
    cases = []
    for i in range(48):
        n = (1, 2, 7, 25, 33, 64)[i % 6]
        evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
        if i % 3 == 1:
            evals[: max(1, n // 2)] *= -1  # indefinite, |eigenvalues| >= 0.5
        h = symmetric_with(evals, dtype)
        if i % 3 == 2:  # exactly singular: a permuted diagonal with zeros
            evals[: max(1, n // 2)] = 0.0
            perm = torch.randperm(n)
            h = torch.diag(evals)[perm][:, perm].to(dtype)
        g = torch.randn(n, dtype=dtype)
        cases.append((h, g, ops.damped_cholesky(*_cuda(h, g), 0.0, 60)))
    torch.cuda.synchronize()
    for h, g, (d, lam, attempts) in cases:
        _assert_solves(h, g, dtype, d, lam, attempts)
        _, lam_cpu, attempts_cpu = ops.damped_cholesky(h, g, 0.0, 60)
        assert int(attempts) == int(attempts_cpu)
        assert float(lam) == pytest.approx(float(lam_cpu), rel=1e-12)


def test_damped_cholesky_runs_on_the_current_stream():
    h, g = spd(25), torch.randn(25, dtype=F64)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        hc, gc = _cuda(h, g)
        d, _, attempts = ops.damped_cholesky(hc, gc, 0.0, 60)
        out = d.cpu()  # ordered after the kernel on this stream
    assert int(attempts) == 1 and rel_err(out, -torch.linalg.solve(h, g)) <= 1e-11


def test_kernels_switch_off_to_the_same_answers(monkeypatch):
    """HESSIAN_CUDA_KERNELS=0 takes the ATen path; both agree to rounding."""
    evals = torch.tensor([-2.0, 1.0, 3.0, 0.5] * 6 + [4.0], dtype=F64)
    h, g = _cuda(symmetric_with(evals), torch.randn(25, dtype=F64))
    d, lam, attempts = ops.damped_cholesky(h, g, 0.0, 60)
    monkeypatch.setenv("HESSIAN_CUDA_KERNELS", "0")
    d_aten, lam_aten, attempts_aten = ops.damped_cholesky(h, g, 0.0, 60)
    assert int(attempts) == int(attempts_aten) > 1
    assert float(lam) == pytest.approx(float(lam_aten), rel=1e-12)
    assert rel_err(d.cpu(), d_aten.cpu()) <= 1e-10


# ---------------------------------------------------------------- fused steps


def _reference_step(objective, x, lr, damping):
    """(loss, g, lr d) of a damped Newton step from torch.func on the float64 problem."""
    ref = upcast(objective)
    x64 = x.double().cpu()
    g = torch.func.grad(ref.loss)(x64)
    h = torch.func.hessian(ref.loss)(x64)
    d = -torch.linalg.solve(h + damping * torch.eye(x64.numel(), dtype=F64), g)
    return ref.loss(x64), g, lr * d


def _step_args(objective):
    if objective.name == "mse":
        return (objective.data["target"],)
    return objective.data["A"], objective.data["b"]


# mse at 100000: several blocks, atomically reduced (quadratic stops at the ATen path's 65)
FUSED_CASES = [("mse", n) for n in (*KERNEL_SIZES, 65, 100_000)]
FUSED_CASES += [("quadratic", n) for n in (*KERNEL_SIZES, 65)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "n"), FUSED_CASES)
def test_fused_step_matches_torch_func_and_cpu(name, n, dtype):
    objective = objective_of_size(name, n, dtype)
    x = 0.3 * torch.randn(n, dtype=dtype)
    lr, damping = 0.7, 0.05
    args = _step_args(objective)
    step = getattr(ops, f"{name}_newton_step")
    x_new, stats = step(x.cuda(), *_cuda(*args), lr, damping, 60)
    assert x_new.is_cuda and x_new.dtype == dtype and x_new.shape == (n,)
    assert stats.device.type == "cpu" and stats.dtype == F64 and stats.shape == (8,)
    tol = TOL[dtype]
    loss, gnorm, gmax, step_norm, lam, attempts, finite, slope = stats.tolist()
    assert math.isnan(slope)  # the CUDA kernels leave the line search's slope to the CPU op
    assert (lam, attempts, finite) == (damping, 1.0, 1.0)
    if name == "quadratic" or n <= 64:  # torch.func's dense mse Hessian is n^2 memory
        ref_loss, ref_g, ref_step = _reference_step(objective, x, lr, damping)
        assert rel_err(x_new.cpu() - x, ref_step) <= 10 * tol
        assert loss == pytest.approx(float(ref_loss), rel=tol)
        assert gnorm == pytest.approx(float(ref_g.norm()), rel=tol)
        assert gmax == pytest.approx(float(ref_g.abs().max()), rel=tol)
        assert step_norm == pytest.approx(float(ref_step.norm()), rel=10 * tol)
    x_cpu, stats_cpu = step(x, *args, lr, damping, 60)
    assert rel_err(x_new.cpu(), x_cpu) <= 10 * tol
    assert torch.allclose(stats[:7], stats_cpu[:7], rtol=10 * tol, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (2, 25, 64))
def test_fused_quadratic_escalates_on_indefinite_like_cpu(n, dtype):
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
    evals[: max(1, n // 3)] *= -1
    a = symmetric_with(evals, dtype)
    b, x = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    x_new, stats = ops.quadratic_newton_step(*_cuda(x, a, b), 1.0, 0.0, 60)
    x_cpu, stats_cpu = ops.quadratic_newton_step(x, a, b, 1.0, 0.0, 60)
    assert stats[5] == stats_cpu[5] > 1 and stats[6] == 1.0
    assert float(stats[4]) == pytest.approx(float(stats_cpu[4]), rel=1e-12)
    assert bool(torch.isfinite(x_new).all())
    assert rel_err(x_new.cpu() - x, x_cpu - x) <= 100 * TOL[dtype]
    ref = linalg.damped_cholesky_solve(a.double(), a.double() @ x.double() - b.double(), 0.0)
    assert rel_err(x_new.cpu() - x, ref.direction) <= 100 * TOL[dtype]


def test_fused_steps_flag_non_finite_points():
    t = torch.rand(4, dtype=F64)
    bad = torch.tensor([0.0, float("inf"), 0.0, 0.0], dtype=F64)
    _, stats = ops.mse_newton_step(*_cuda(bad, t), 1.0, 0.0, 60)
    assert stats[6] == 0.0
    a, b = spd(4), torch.randn(4, dtype=F64)
    x_new, stats = ops.quadratic_newton_step(*_cuda(bad, a, b), 1.0, 0.0, 60)
    assert stats[6] == 0.0 and stats[5] == 0.0
    a_nan = a.clone()
    a_nan[3, 0] = float("nan")
    x = torch.randn(4, dtype=F64)
    x_new, stats = ops.quadratic_newton_step(*_cuda(x, a_nan, b), 1.0, 0.0, 60)
    assert stats[6] == 0.0 and torch.equal(x_new.cpu(), x)


def test_fused_steps_reject_bad_arguments_on_cuda():
    x, t = _cuda(torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(RuntimeError, match="learning_rate"):
        ops.mse_newton_step(x, t, 0.0, 0.0, 60)
    with pytest.raises(RuntimeError, match="target"):
        ops.mse_newton_step(x, t.float(), 1.0, 0.0, 60)
    with pytest.raises(RuntimeError, match="quadratic needs"):
        ops.quadratic_newton_step(x, torch.eye(4, dtype=F64).cuda(), t, 1.0, 0.0, 60)


# ---------------------------------------------------------------- opcheck


def _opcheck_cases():
    h, g = _cuda(spd(6), torch.randn(6, dtype=F64))
    yield "damped_cholesky", (h, g, 0.0, 60)
    yield "damped_cholesky", (*_cuda(spd(25).float(), torch.randn(25)), 0.1, 60)
    for name in ("mse", "quadratic"):
        objective = objective_of_size(name, 25)
        x = 0.1 * torch.randn(25, dtype=F64)
        yield f"{name}_newton_step", (x.cuda(), *_cuda(*_step_args(objective)), 1.0, 0.0, 60)


@pytest.mark.parametrize(
    ("op_name", "args"), list(_opcheck_cases()) if torch.cuda.is_available() else []
)
def test_opcheck_on_cuda(op_name, args):
    torch.library.opcheck(getattr(ops, op_name).default, args)
