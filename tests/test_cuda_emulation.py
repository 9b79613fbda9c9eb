"""csrc/cuda/'s kernels run on the CPU (tests/cuda_emulation/) against the CPU op and float64.

No GPU needed: the device source itself (step_kernels.cuh, block_cholesky.cuh) is compiled
with g++ against a stand-in for the CUDA runtime (one thread per CUDA thread, real barriers,
shared memory poisoned with NaN) and launched with the host wrappers' shapes. This checks the
kernels' arithmetic, indexing, escalation policy and barrier placement; a ThreadSanitizer
build checks that no two threads touch the same shared slot between barriers. It cannot
check the GPU build, launch configuration limits or speed: tests/test_cuda_kernels.py on a
GPU (bench/gpu_check.sh) does. Fresh random inputs each run; tolerances as
test_native_ops.py (1e-12 / 1e-5 relative, times the condition number where one enters).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from native_support import (
    F32,
    F64,
    TOL,
    damped_at_rounding,
    rel_err,
    require_native,
    spd,
    symmetric_with,
)

require_native()
ops = torch.ops.hessian
ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cuda_emulation" / "run_kernels.cpp"
DTYPES = (F64, F32)
SIZES = (1, 2, 25, 64)


def _compile(out: pathlib.Path, *flags: str) -> pathlib.Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", *flags, f"-I{ROOT / 'csrc' / 'cuda'}"]
    cmd += [f"-I{SOURCE.parent}", str(SOURCE), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> pathlib.Path:
    return _compile(tmp_path_factory.mktemp("emu") / "run_kernels")


def _case(kind: str, dtype: torch.dtype, header: tuple, *arrays: torch.Tensor) -> str:
    values = " ".join(f"{float(v):.17g}" for a in arrays for v in a.double().reshape(-1))
    head = " ".join(str(h) for h in header)
    return f"{kind} {'d' if dtype == F64 else 'f'} {head} {values}\n"


def _run(binary: pathlib.Path, cases: list[str]) -> list[torch.Tensor]:
    done = subprocess.run(
        [str(binary)], input="".join(cases), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases)
    return [torch.tensor([float(v) for v in line.split()[1:]], dtype=F64) for line in lines]


def _solve_cases(n: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(label, H, g): asymmetric SPD, indefinite, exactly singular, zero."""
    g = torch.randn(n, dtype=F64).to(dtype)
    h_spd = spd(n) + 1e-3 * torch.randn(n, n, dtype=F64) * (n > 1)
    evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
    evals[: max(1, n // 3)] *= -1
    diag = torch.rand(n, dtype=F64) + 0.5
    diag[torch.randperm(n)[: max(1, n // 2)]] = 0.0
    perm = torch.randperm(n)
    return [
        ("spd", h_spd.to(dtype), g),
        ("indefinite", symmetric_with(evals, dtype), g),
        ("singular", torch.diag(diag)[perm][:, perm].to(dtype), g),
        ("zero", torch.zeros(n, n, dtype=dtype), g),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_damped_cholesky_matches_cpu_op(kernels, dtype):
    systems = [(n, *c) for n in SIZES for c in _solve_cases(n, dtype)]
    cases = [_case("solve", dtype, (n, 0.0, 60), h, g) for n, _, h, g in systems]
    h5, g5 = spd(5, dtype), torch.randn(5, dtype=dtype)
    cases.append(_case("solve", dtype, (5, 2.5, 60), h5, g5))
    outs = _run(kernels, cases)
    tol = TOL[dtype]
    for (n, label, h, g), out in zip(systems, outs[:-1], strict=True):
        attempts, lam, d = int(out[0]), float(out[1]), out[2:]
        d_cpu, lam_cpu, attempts_cpu = ops.damped_cholesky(h, g, 0.0, 60)
        assert (attempts, lam) == (int(attempts_cpu), pytest.approx(float(lam_cpu), rel=1e-12))
        assert bool(torch.isfinite(d).all()), (n, label)
        assert rel_err(d, d_cpu) <= 100 * tol, (n, label)
        sym = (h.double() + h.double().T) / 2 + lam * torch.eye(n, dtype=F64)
        if label == "spd":
            assert attempts == 1 and rel_err(d, -torch.linalg.solve(sym, g.double())) <= 10 * tol
        else:
            assert attempts > 1 and bool(torch.linalg.eigvalsh(sym).min() > 0)
            residual = float((sym @ d + g.double()).norm())
            scale = float(torch.linalg.matrix_norm(sym, 2) * d.norm() + g.double().norm())
            assert residual <= 50 * tol * scale, (n, label)
    attempts, lam, d = int(outs[-1][0]), float(outs[-1][1]), outs[-1][2:]
    ref = -torch.linalg.solve(h5.double() + 2.5 * torch.eye(5, dtype=F64), g5.double())
    assert (attempts, lam) == (1, 2.5) and rel_err(d, ref) <= 10 * tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_damping_within_rounding_escalates_like_cpu_op(kernels, dtype):
    """A lambda ulps above -lambda_min(H) gives a pivot of rounding noise: the kernel goes
    on to 10 lambda, as the CPU op does."""
    systems = [damped_at_rounding(n, dtype, ulps) for n in (2, 9, 40) for ulps in (1, 2, 3)]
    outs = _run(kernels, [_case("solve", dtype, (len(g), lam, 60), h, g) for h, g, lam in systems])
    for (h, g, lam), out in zip(systems, outs, strict=True):
        attempts, used, d = int(out[0]), float(out[1]), out[2:]
        d_cpu, lam_cpu, attempts_cpu = ops.damped_cholesky(h, g, lam, 60)
        assert (attempts, used) == (int(attempts_cpu), pytest.approx(float(lam_cpu), rel=1e-12))
        assert attempts >= 2 and used == pytest.approx(10 * lam, rel=1e-12)
        assert rel_err(d, d_cpu) <= 100 * TOL[dtype]


def test_emulated_damped_cholesky_reports_failure_with_zero_direction(kernels):
    nan = torch.full((3, 3), float("nan"), dtype=F64)
    (out,) = _run(kernels, [_case("solve", F64, (3, 0.0, 5), nan, torch.ones(3, dtype=F64))])
    _, lam_cpu, _ = ops.damped_cholesky(nan, torch.ones(3, dtype=F64), 0.0, 5)
    assert int(out[0]) == 0 and float(out[1]) == pytest.approx(float(lam_cpu), rel=1e-12)
    assert torch.equal(out[2:], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_quadratic_step_matches_cpu_op(kernels, dtype):
    lr, damping = 0.7, 0.05
    problems = []
    for n in SIZES:
        evals = torch.empty(n, dtype=F64).uniform_(0.5, 5.0)
        indefinite = evals.clone()
        indefinite[: max(1, n // 3)] *= -1
        for a in (spd(n, dtype), symmetric_with(indefinite, dtype)):
            problems.append((a, torch.randn(n, dtype=dtype), 0.3 * torch.randn(n, dtype=dtype)))
    bad = problems[4][0].clone()
    bad[-1, 0] = float("nan")  # lower triangle: read by the solve, caught by the check first
    problems.append((bad, *problems[4][1:]))
    cases = [
        _case("quadratic", dtype, (a.shape[0], lr, damping, 60), a, b, x) for a, b, x in problems
    ]
    tol = TOL[dtype]
    for (a, b, x), out in zip(problems, _run(kernels, cases), strict=True):
        stats, x_new = out[:7], out[7:].to(dtype)
        x_cpu, stats_cpu = ops.quadratic_newton_step(x, a, b, lr, damping, 60)
        if not bool(torch.isfinite(a).all()):
            assert stats[6] == 0.0 and stats[5] == 0.0 and torch.equal(x_new, x)
            continue
        assert (float(stats[5]), float(stats[6])) == (float(stats_cpu[5]), 1.0)  # attempts
        assert float(stats[4]) == pytest.approx(float(stats_cpu[4]), rel=1e-12)
        assert torch.allclose(stats[:4], stats_cpu[:4], rtol=100 * tol, atol=0.0)
        assert rel_err(x_new - x, x_cpu - x) <= 100 * tol
        a64, lam = a.double(), float(stats[4])
        g64 = a64 @ x.double() - b.double()
        ref = -lr * torch.linalg.solve(a64 + lam * torch.eye(a.shape[0], dtype=F64), g64)
        assert rel_err(x_new.double() - x.double(), ref) <= 100 * tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_mse_step_sums_and_step(kernels, dtype):
    lr, damping = 0.7, 0.05
    runs = [(1, 1), (25, 1), (600, 1), (600, 3)]  # several blocks: the atomic reduction
    problems = [(torch.randn(n, dtype=dtype), torch.rand(n, dtype=dtype), b) for n, b in runs]
    inf_x = problems[1][0].clone()
    inf_x[3] = float("inf")
    problems.append((inf_x, problems[1][1], 1))
    cases = [_case("mse", dtype, (x.numel(), lr, damping, b), x, t) for x, t, b in problems]
    for (x, t, _), out in zip(problems, _run(kernels, cases), strict=True):
        sums, x_new = out[:5], out[5:].to(dtype)
        n = x.numel()
        r = (x - t).double()  # the kernel's roundings: r, g, d in the storage type
        g = (r * (2.0 / n)).to(dtype).double()
        d = (-g * (1.0 / (2.0 / n + damping))).to(dtype).double()
        finite = bool(torch.isfinite(g).all())
        assert int(sums[4]) == int((~torch.isfinite(g)).sum())
        x_cpu, stats_cpu = ops.mse_newton_step(x, t, lr, damping, 60)
        if not finite:
            assert stats_cpu[6] == 0.0
            continue
        ref = torch.stack([r.square().sum(), g.square().sum(), g.abs().max(), d.square().sum()])
        assert rel_err(sums[:4], ref) <= 1e-13
        assert torch.equal(x_new, x_cpu)


def test_emulated_kernels_have_no_shared_memory_races(tmp_path):
    """ThreadSanitizer over the emulated block: every shared access ordered by a barrier."""
    binary = _compile(tmp_path / "run_kernels_tsan", "-g", "-fsanitize=thread")
    a, g = symmetric_with(torch.tensor([-2.0, 1.0, 3.0, 0.5] * 16, dtype=F64)), torch.randn(64)
    cases = [
        _case("solve", F64, (64, 0.0, 60), a, g.double()),
        _case("solve", F32, (25, 0.0, 60), a[:25, :25].float(), g[:25]),
        _case("quadratic", F64, (25, 1.0, 0.0, 60), a[:25, :25], g[:25].double(), g[25:50]),
        _case("mse", F32, (600, 1.0, 0.0, 3), torch.randn(600), torch.randn(600)),
    ]
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}
    done = subprocess.run(
        [str(binary)], input="".join(cases), capture_output=True, text=True, env=env, timeout=300
    )
    if "FATAL: ThreadSanitizer" in done.stderr:  # the sanitizer could not start here
        pytest.skip(f"ThreadSanitizer unavailable: {done.stderr.strip()[:200]}")
    assert "WARNING: ThreadSanitizer" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 0 and len(done.stdout.splitlines()) == len(cases)
