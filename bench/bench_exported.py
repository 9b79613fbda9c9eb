"""Exported programs: an mlp sent as a torch.export program against the catalogue `mlp`.

Times, in process on the engine (what a server request runs, without the transport), a
Newton step (dense Hessian + solve, autograd backend for both, and the catalogue's default
backend) and one Hessian-vector product, for the catalogue mlp and for the same network
written in torch and exported; and the exported program against torch.func on the same
eager function (grad, and an HVP as the vjp of the gradient). HESSIAN_BENCH_QUICK=1 runs a
few-second smoke version.
"""

from __future__ import annotations

import os
import pathlib
import sys
from itertools import pairwise

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import format_seconds, markdown_table, median_seconds  # noqa: E402
from hessian_client import problems  # noqa: E402
from hessian_service.engine import MethodOptions, make_objective, take_step  # noqa: E402
from hessian_service.engine.curvature.autograd import hvp, loss_and_grad  # noqa: E402
from hessian_service.server.codec import decode_tensor  # noqa: E402

TITLE = "Exported programs against the catalogue"
QUICK = os.environ.get("HESSIAN_BENCH_QUICK", "") not in ("", "0")
SIZES = [16, 16, 4] if QUICK else [32, 32, 4]
ROWS = 64 if QUICK else 256
REPEATS = 3 if QUICK else 21


def mlp_function(sizes: list[int]):
    """The catalogue mlp's loss (tanh hidden layers, mse) written in torch."""

    def loss(params: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, at = X, 0
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            w = params[at : at + fan_in * fan_out].reshape(fan_out, fan_in)
            at += fan_in * fan_out
            h = torch.nn.functional.linear(h, w, params[at : at + fan_out])
            at += fan_out
            h = torch.tanh(h) if i < len(sizes) - 2 else h
        return torch.mean((h - y) ** 2)

    return loss


def run() -> str:
    """Markdown: a table of medians and the ratios."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(ROWS, SIZES[0], generator=gen, dtype=torch.float64)
    y = torch.randn(ROWS, SIZES[-1], generator=gen, dtype=torch.float64)
    catalogue = make_objective("mlp", {"X": X, "y": y}, {"layer_sizes": SIZES})
    x = catalogue.init_params(gen)
    fn = mlp_function(SIZES)
    problem = problems.exported(fn, x, {"X": X, "y": y})
    spec = problem.exported
    data = {k: decode_tensor(v, k) for k, v in problem.data.items()}
    options = {"program": spec.program, "param_shape": list(spec.param_shape)}
    exported = make_objective("exported", data, options)
    v = torch.randn_like(x)
    autograd = MethodOptions(method="newton", backend="autograd")
    default = MethodOptions(method="newton")

    def func_hvp() -> torch.Tensor:
        _, vjp = torch.func.vjp(torch.func.grad(lambda p: fn(p, X, y)), x)
        return vjp(v)[0]

    timings = {
        ("Newton step (autograd)", "catalogue"): lambda: take_step(catalogue, x, autograd),
        ("Newton step (autograd)", "exported"): lambda: take_step(exported, x, autograd),
        ("Newton step (default backend)", "catalogue"): lambda: take_step(catalogue, x, default),
        ("Newton step (default backend)", "exported"): lambda: take_step(exported, x, default),
        ("HVP", "catalogue"): lambda: hvp(catalogue, x, v),
        ("HVP", "exported"): lambda: hvp(exported, x, v),
        ("HVP", "torch.func eager"): func_hvp,
        ("loss + gradient", "catalogue"): lambda: loss_and_grad(catalogue, x),
        ("loss + gradient", "exported"): lambda: loss_and_grad(exported, x),
        ("loss + gradient", "torch.func eager"): lambda: torch.func.grad_and_value(
            lambda p: fn(p, X, y)
        )(x),
    }
    seconds = {
        key: median_seconds(f, repeats=REPEATS, warmup=1 if QUICK else 3)
        for key, f in timings.items()
    }
    rows = []
    for (what, who), s in seconds.items():
        base = seconds.get((what, "catalogue"))
        ratio = f"{s / base:.2f}x" if base else "n/a"
        rows.append([what, who, format_seconds(s), ratio])
    mode = " (HESSIAN_BENCH_QUICK: a smoke run, too short to judge)" if QUICK else ""
    n = catalogue.num_params
    return (
        f"mlp {SIZES}, {ROWS} rows, float64, {n} parameters, {len(exported.program.nodes)} "
        f"graph nodes; medians of {REPEATS}{mode}.\n\n"
        + markdown_table(["computation", "objective", "median", "vs catalogue"], rows)
        + "\n\nThe exported program is interpreted node by node (one Python dispatch per ATen "
        "call, plus a cancel/deadline check and a declared-shape check per node), so its "
        "overhead is per node, not per flop: the ratio shrinks as layers grow."
    )


if __name__ == "__main__":
    print(run())
