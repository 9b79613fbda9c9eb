"""GPU timing of csrc/cuda/'s kernels against the ATen path and torch.func (not a bench section).

Run by bench/gpu_check.sh on a machine with a CUDA GPU; prints a markdown report (and writes
it to the path given as the first argument). Not a `bench_*` module: `make bench` runs on
CPU machines and would overwrite GPU numbers; a session with a GPU copies this report into
BENCHMARKS.md. Each cell is the median latency of one call until its result is usable on
the host side (the fused ops return their stats on the CPU, so they sync themselves; the
solve is followed by torch.cuda.synchronize()). "ATen path" is the same op with
HESSIAN_CUDA_KERNELS=0; torch.func is grad + hessian + Cholesky solve of the same problem.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable
from functools import partial

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from common import format_seconds, markdown_table, median_seconds

TITLE = "CUDA kernels (csrc/cuda/) vs the ATen path and torch.func"
F64 = torch.float64
LR, DAMPING, ATTEMPTS = 1.0, 1e-3, 60


def _timed(fn: Callable[[], object]) -> float:
    def call() -> None:
        fn()
        torch.cuda.synchronize()

    return median_seconds(call, repeats=15, warmup=5, min_time=0.02)


def _aten(fn: Callable[[], object]) -> float:
    """`fn` timed with the CUDA kernels switched off (the op's ATen path)."""
    os.environ["HESSIAN_CUDA_KERNELS"] = "0"
    try:
        return _timed(fn)
    finally:
        del os.environ["HESSIAN_CUDA_KERNELS"]


def _func_step(loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], object]:
    def step(x: torch.Tensor) -> torch.Tensor:
        g = torch.func.grad(loss)(x)
        h = torch.func.hessian(loss)(x)
        h = h + DAMPING * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        d = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(h)).squeeze(1)
        return x - LR * d

    return step


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return (q * (1.0 + 9.0 * torch.rand(n, generator=gen, dtype=F64))) @ q.T


def _rows() -> list[tuple[str, dict[str, float | None]]]:
    from hessian_service.engine import linalg
    from hessian_service.engine.backends.native.ops import ops

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (25, 1_000_000):
        x, t = torch.randn(n, generator=gen, dtype=F64), torch.rand(n, generator=gen, dtype=F64)
        xc, tc = x.cuda(), t.cuda()

        def mse(x: torch.Tensor, t: torch.Tensor = tc) -> torch.Tensor:
            return ((x - t) ** 2).mean()

        def native(x=xc, t=tc):
            return ops.mse_newton_step(x, t, LR, DAMPING, ATTEMPTS)

        def cpu(x=x, t=t):
            return ops.mse_newton_step(x, t, LR, DAMPING, ATTEMPTS)

        rows.append(
            (
                f"mse step n={n:,}" + (" (seed)" if n == 25 else ""),
                {
                    "kernel": _timed(native),
                    "ATen path": _aten(native),
                    "torch.func": _timed(partial(_func_step(mse), xc)) if n <= 64 else None,
                    "CPU op": _timed(cpu),
                },
            )
        )
    for n in (25, 64):
        a = _spd(n, gen)
        b, x = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
        ac, bc, xc = a.cuda(), b.cuda(), x.cuda()

        def quad(x: torch.Tensor, a: torch.Tensor = ac, b: torch.Tensor = bc) -> torch.Tensor:
            return 0.5 * x @ (a @ x) - b @ x

        def native(x=xc, a=ac, b=bc):
            return ops.quadratic_newton_step(x, a, b, LR, DAMPING, ATTEMPTS)

        def cpu(x=x, a=a, b=b):
            return ops.quadratic_newton_step(x, a, b, LR, DAMPING, ATTEMPTS)

        rows.append(
            (
                f"quadratic step n={n}",
                {
                    "kernel": _timed(native),
                    "ATen path": _aten(native),
                    "torch.func": _timed(partial(_func_step(quad), xc)),
                    "CPU op": _timed(cpu),
                },
            )
        )
    for n, kind in ((25, "SPD"), (64, "SPD"), (25, "indefinite")):
        h = _spd(n, gen)
        if kind == "indefinite":
            h = h - 5.5 * torch.eye(n, dtype=F64)  # about half the spectrum negative
        g = torch.randn(n, generator=gen, dtype=F64)
        hc, gc = h.cuda(), g.cuda()
        attempts = int(ops.damped_cholesky(hc, gc, 0.0, ATTEMPTS)[2])

        def solve(h=hc, g=gc):
            return ops.damped_cholesky(h, g, 0.0, ATTEMPTS)

        rows.append(
            (
                f"damped Cholesky n={n} {kind}, attempts: {attempts}",
                {
                    "kernel": _timed(solve),
                    "ATen path": _aten(solve),
                    "torch.func": None,
                    "engine autograd solve": _timed(
                        lambda h=hc, g=gc: linalg.damped_cholesky_solve(h, g, 0.0)
                    ),
                    "CPU op": _timed(lambda h=h, g=g: ops.damped_cholesky(h, g, 0.0, ATTEMPTS)),
                },
            )
        )
    return rows


def run() -> str:
    """The markdown report (a one-line note where no CUDA device is present)."""
    if not torch.cuda.is_available():
        return "No CUDA device: nothing measured."
    rows = _rows()
    peers = ["kernel", "ATen path", "torch.func", "engine autograd solve", "CPU op"]
    table = []
    for label, cells in rows:
        fastest = min(v for v in cells.values() if v is not None)
        line = [label]
        for peer in peers:
            v = cells.get(peer)
            line.append("-" if v is None else f"{format_seconds(v)} ({v / fastest:.1f}x)")
        table.append(line)
    device = torch.cuda.get_device_name()
    return (
        f"Device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}; float64, "
        f"median latency per call (ratio to the row's fastest).\n\n"
        + markdown_table(["row", *peers], table)
    )


if __name__ == "__main__":
    report = f"## {TITLE}\n\n{run()}\n"
    print(report)
    if len(sys.argv) > 1:
        pathlib.Path(sys.argv[1]).write_text(report)
