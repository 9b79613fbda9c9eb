"""AnalyzeCurvature's memory: the Lanczos block is clamped to what can be used before anything
is sized, every allocation that grows with the options is in the budget, and a refusal names
the option that drives the size.

Before: block_size 1e5 on a 10-parameter problem asked the allocator for 80 GB (a (b, b)
matrix of the block's SVD) and came back INTERNAL; block_size 2**62 was blamed on
max_lanczos_iterations and batch_size 10**6 on density_steps. References are numpy / scipy
in float64 on fresh random inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.optimize
import torch
from hessian_service.engine import make_objective
from hessian_service.engine.analysis import spectrum
from hessian_service.engine.analysis.block_lanczos import block_lanczos_extremes
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature
from hessian_service.engine.errors import ResourceLimitError

F64 = torch.float64
BUDGET = 2 * 1024**3  # the server's default dense_budget_bytes


def _report(report: spectrum.CurvatureReport) -> dict:
    out = report.to_dict()
    del out["seconds"]
    return out


@pytest.mark.parametrize("block_size", [11, 3000, 10**5, 2**62])
def test_a_block_wider_than_the_problem_is_clamped_before_anything_is_sized(block_size, rng):
    objective = make_objective("rosenbrock", {}, {"dim": 10})
    x = rng.uniform(-1.5, 1.5, size=10)
    options = {"top_k": 3, "bottom_k": 3, "density_steps": 10}
    wide = analyze_curvature(
        objective, torch.tensor(x), SpectrumOptions(block_size=block_size, **options)
    )
    want = np.linalg.eigvalsh(scipy.optimize.rosen_hess(x))
    scale = np.abs(want).max()
    np.testing.assert_allclose(wide.top_eigenvalues, want[::-1][:3], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(wide.bottom_eigenvalues, want[:3], rtol=0, atol=1e-10 * scale)
    assert wide.products_by_part["lanczos"] == 10  # the Krylov dimension, whatever the block
    # the block is the problem's 10 columns: the same report, the probes drawn after it alike
    exact = analyze_curvature(objective, torch.tensor(x), SpectrumOptions(block_size=10, **options))
    assert _report(wide) == _report(exact)


def test_a_wide_start_block_allocates_nothing_block_by_block(monkeypatch):
    """block_lanczos_extremes from an (n, b) block with b >> n: its SVDs are of at most n x b
    values (a full SVD held a (b, b) factor: 8 b^2 bytes), its eigenvalues exact."""
    n, b = 10, 4000
    m = torch.randn(n, n, dtype=F64)
    a = m @ m.T + torch.eye(n, dtype=F64)
    sizes: list[int] = []
    svd = torch.linalg.svd

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = svd(*args, **kwargs)
        sizes.append(max(t.numel() for t in out))
        return out

    monkeypatch.setattr(torch.linalg, "svd", spy)
    start = torch.randn(n, b, dtype=F64)
    top, bottom, _, _, products, converged = block_lanczos_extremes(
        lambda v: a @ v, start, 2, 2, 100, 1e-12
    )
    assert sizes and max(sizes) <= n * b
    assert converged and products == n
    want = np.linalg.eigvalsh(a.numpy())
    np.testing.assert_allclose(top, want[::-1][:2], rtol=1e-12)
    np.testing.assert_allclose(bottom, want[:2], rtol=1e-12)


def test_the_budget_counts_a_block_only_as_wide_as_it_can_be():
    """block_size ~16000 on 10 parameters passed the old check by its arithmetic and really
    allocated ~2 GB; now it costs what block_size 10 costs, and that cost is counted whole."""
    n, itemsize = 10, 8
    for block_size in (16_000, 2**62):  # counted as 32,000 and 2**63 working vectors before
        options = SpectrumOptions(block_size=block_size, trace_samples=0, density_probes=0)
        options.check_cost(n, itemsize, 100_000, 10**5)
    # basis and projected matrix (10 x 10, float64, and its eigenvectors), then the block
    need = n * n * itemsize + 2 * n * n * 8 + spectrum.BLOCK_VECTORS * n * n * itemsize
    need += 4 * n * n * 8
    for block_size in (10, 16_000, 2**62):
        options = SpectrumOptions(block_size=block_size, trace_samples=0, density_probes=0)
        options.check_cost(n, itemsize, need, 10**5)
        with pytest.raises(ResourceLimitError) as info:
            options.check_cost(n, itemsize, need - 1, 10**5)
        assert info.value.field == "options.block_size"
        assert f"need {need} bytes" in str(info.value)


@pytest.mark.parametrize("itemsize", [4, 8])
def test_a_huge_block_size_is_named_not_max_lanczos_iterations(itemsize):
    n = 10**6
    options = SpectrumOptions(block_size=2**62, trace_samples=0, density_probes=0)
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(n, itemsize, BUDGET, 10**5)
    assert info.value.field == "options.block_size"
    b = m = options.max_lanczos_iterations  # the block is clamped to the Krylov dimension
    need = m * n * itemsize + 2 * m * m * 8 + spectrum.BLOCK_VECTORS * b * n * itemsize
    need += 4 * b * b * 8
    assert f"need {need} bytes" in str(info.value)
    # the default block of 4 fits the same budget: the block drove the size
    SpectrumOptions(trace_samples=0, density_probes=0).check_cost(n, itemsize, BUDGET, 10**5)


def test_a_huge_batch_size_is_named_not_density_steps():
    n = 10**6
    options = SpectrumOptions(batch_size=3000, density_probes=3000, density_steps=30)
    need = 3000 * (options.density_steps + 1 + spectrum.DENSITY_VECTORS) * n * 8
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(n, 8, BUDGET, 10**5)
    assert info.value.field == "options.batch_size"
    message = str(info.value)
    assert f"need {need} bytes" in message and "options.density_steps + 1 = 31" in message
    # more probes a batch than there are probes: the probes are what a batch holds
    fewer = SpectrumOptions(batch_size=10**6, density_probes=3000, density_steps=30)
    with pytest.raises(ResourceLimitError) as info:
        fewer.check_cost(n, 8, BUDGET, 10**5)
    assert info.value.field == "options.density_probes" and f"need {need} bytes" in str(info.value)
    # long Lanczos runs with small batches: density_steps drives it
    steps = SpectrumOptions(density_steps=10**4, density_probes=4)
    with pytest.raises(ResourceLimitError) as info:
        steps.check_cost(10**5, 8, BUDGET, 10**5)
    assert info.value.field == "options.density_steps"


def test_a_batch_is_sized_by_the_probes_it_can_hold(monkeypatch, rng):
    """The density's batch holds min(batch_size, density_probes) probes: the defaults (16 a
    batch, 4 probes) on a million float64 parameters need 1.4 GB, which the budget refused
    as 4 GB (16 probes) before. The batches the density actually forms are checked too."""
    n = 10**6
    options = SpectrumOptions(trace_samples=0, max_lanczos_iterations=10)
    assert options.batch_size > options.density_probes
    options.check_cost(n, 8, BUDGET, 10**5)  # refused before
    per_probe = options.density_steps + 1 + spectrum.DENSITY_VECTORS
    assert options.batch_size * (options.density_steps + 1) * n * 8 > BUDGET
    assert options.density_probes * per_probe * n * 8 <= BUDGET
    seen: list[int] = []
    real = spectrum._batched_lanczos

    def spy(counter: Any, probes: torch.Tensor, steps: int) -> Any:
        seen.append(probes.shape[0])
        return real(counter, probes, steps)

    monkeypatch.setattr(spectrum, "_batched_lanczos", spy)
    a = rng.standard_normal((6, 6))
    data = {"A": torch.tensor(a @ a.T), "b": torch.zeros(6, dtype=F64)}
    small = make_objective("quadratic", data)
    analyze_curvature(small, torch.zeros(6, dtype=F64), SpectrumOptions(density_steps=3))
    assert seen and max(seen) <= min(options.batch_size, options.density_probes)


DENSITY_PEAK = """
import sys, torch
from hessian_service.engine import make_objective
from hessian_service.engine.analysis.spectrum import SpectrumOptions, analyze_curvature
n, probes, steps, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def options(steps):
    return SpectrumOptions(trace_samples=0, max_lanczos_iterations=2, block_size=1,
                           density_probes=probes, density_steps=steps, hvp_mode=mode)
small = make_objective("rosenbrock", {}, {"dim": 10})
analyze_curvature(small, torch.zeros(10, dtype=torch.float64), options(3))  # warm
big = make_objective("rosenbrock", {}, {"dim": n})
x = torch.full((n,), 0.5, dtype=torch.float64)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS:")
analyze_curvature(big, x, options(steps))
print((status("VmHWM:") - before) / (8 * n))
"""


@pytest.mark.parametrize("mode", ["forward_over_reverse", "reverse_over_reverse"])
def test_the_density_budget_covers_what_the_density_holds_at_its_peak(mode):
    """Peak resident memory of a density on 100,000 parameters (a child process whose peak
    is reset just before it; glibc returns every freed block over 64 KB to the system, so
    the peak is what was held at once), in n-vectors, against what check_cost counts. The count was
    16 x (density_steps + 1) whatever the probes, then probes x (density_steps + 1),
    which missed the product's own temporaries (79 held against 44 counted here)."""
    import os
    import subprocess
    import sys

    n, probes, steps = 100_000, 4, 10
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", DENSITY_PEAK, str(n), str(probes), str(steps), mode],
        env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    held = float(out.stdout.split()[-1])
    counted = min(16, probes) * (steps + 1 + spectrum.DENSITY_VECTORS)
    assert probes * (steps + 1) < held <= counted, (held, counted)


def test_the_trace_counts_every_probe_it_holds():
    """Hutchinson holds its trace_samples probes, their products and the products'
    concatenation at once: 3000 samples of 10**5 parameters are 7 GB, not the 0.8 GB of
    Hutch++'s sketch (trace_samples / 3) counted before."""
    n, samples = 10**5, 3000
    options = SpectrumOptions(trace_samples=samples, density_probes=0)
    with pytest.raises(ResourceLimitError) as info:
        options.check_cost(n, 8, BUDGET, 10**5)
    need = spectrum.TRACE_VECTORS * samples * n * 8
    assert info.value.field == "options.trace_samples" and f"need {need} bytes" in str(info.value)
    assert need >= 3 * samples * n * 8 > BUDGET
    SpectrumOptions(trace_samples=samples // 10, density_probes=0).check_cost(n, 8, BUDGET, 10**5)


def test_the_density_smooths_through_the_grid_in_pieces(monkeypatch, rng):
    """The Gaussian smoothing held grid_points x density_steps values at once (grid_points up
    to the message limit); now at most KERNEL_VALUES, with the same density."""
    n = 40
    m = rng.normal(size=(n, n))
    a = m @ m.T / n + np.eye(n)
    objective = make_objective("quadratic", {"A": torch.tensor(a), "b": torch.zeros(n, dtype=F64)})
    options = SpectrumOptions(
        trace_samples=0, density_probes=1, density_steps=n, grid_points=50_000, batch_size=1
    )
    largest: list[int] = []
    exp = torch.exp

    def spy(t: torch.Tensor) -> torch.Tensor:
        largest.append(t.numel())
        return exp(t)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "exp", spy)
        pieces = analyze_curvature(objective, torch.zeros(n, dtype=F64), options).density
    assert max(largest) < 50_000 * n  # never the whole grid x Ritz values at once
    assert 50_000 * n > spectrum.KERNEL_VALUES >= max(largest)
    monkeypatch.setattr(spectrum, "KERNEL_VALUES", 50_000 * n)  # the whole grid at once
    whole = analyze_curvature(objective, torch.zeros(n, dtype=F64), options).density
    torch.testing.assert_close(pieces.density, whole.density, rtol=0, atol=0)
    # a probability density whose mean is SLQ's trace / n, the exact trace's estimate
    grid, density = whole.grid.numpy(), whole.density.numpy()
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-9)
    mean = np.trapezoid(grid * density, grid)
    assert mean == pytest.approx(whole.trace / n, rel=1e-9)
    assert np.linalg.eigvalsh(a).min() <= mean <= np.linalg.eigvalsh(a).max()
