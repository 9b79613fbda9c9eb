"""Exported programs: an mlp sent as a torch.export program against the catalogue `mlp`.

Times, in process on the engine (what a server request runs, without the transport), a
Newton step (dense Hessian + solve, autograd backend for both, and the catalogue's default
backend), one Hessian-vector product, a loss with its gradient and a loss alone, for the
catalogue mlp and for the same network written in torch and exported, interpreted and
compiled (`--exported-compile`); and the exported program against torch.func on the same
eager function (grad, and an HVP as the vjp of the gradient). Each computation's variants
are timed interleaved. HESSIAN_BENCH_QUICK=1 runs a few-second smoke version.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from itertools import pairwise

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    format_seconds,
    interleaved_medians,
    markdown_table,
    quick,
    rounds_for,
)
from hessian_client import problems  # noqa: E402
from hessian_service.engine import MethodOptions, make_objective, take_step  # noqa: E402
from hessian_service.engine.curvature.autograd import hvp, loss_and_grad, loss_value  # noqa: E402
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


WAVES = 4 if QUICK else 16  # terms of the elementwise-heavy program (~14 graph nodes each)


def waves_function(terms: int):
    """A sum of damped sine waves fitted by mse: many small elementwise nodes, the case the
    interpreter's per-node dispatch costs most and Inductor fuses into one loop."""

    def loss(params: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = params.reshape(terms, 3)
        model = torch.zeros_like(t)
        for k in range(terms):
            model = model + p[k, 0] * torch.sin(p[k, 1] * t + p[k, 2]) * torch.exp(-0.1 * k * t)
        return torch.mean((model - y) ** 2)

    return loss


def build_pair(fn, x: torch.Tensor, tensors: dict[str, torch.Tensor]):
    """(interpreted, compiled, compile seconds) objectives of `fn` exported at `x`."""
    problem = problems.exported(fn, x, tensors)
    spec = problem.exported
    data = {k: decode_tensor(v, k) for k, v in problem.data.items()}
    options = {"program": spec.program, "param_shape": list(spec.param_shape)}
    start = time.perf_counter()
    compiled = make_objective("exported", data, {**options, "compile": True})
    seconds = time.perf_counter() - start
    return make_objective("exported", data, options), compiled, seconds


def waves_rows() -> tuple[list[list[str]], int, float]:
    """Rows for the elementwise-heavy program (interpreted vs compiled vs torch.func), its
    node count and compile seconds."""
    t = torch.linspace(0, 10, ROWS, dtype=torch.float64)
    y = torch.sin(t)
    x = 0.3 * torch.randn(3 * WAVES, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
    fn = waves_function(WAVES)
    interpreted, compiled, seconds = build_pair(fn, x, {"t": t, "y": y})
    groups = {
        "loss + gradient": {
            "exported": lambda: loss_and_grad(interpreted, x),
            "exported, compiled": lambda: loss_and_grad(compiled, x),
            "torch.func eager": lambda: torch.func.grad_and_value(lambda p: fn(p, t, y))(x),
        },
        "loss (no autograd)": {
            "exported": lambda: loss_value(interpreted, x),
            "exported, compiled": lambda: loss_value(compiled, x),
        },
    }
    rows = []
    for what, calls in groups.items():
        rounds = rounds_for(calls, budget=quick(10.0, 1.0), most=REPEATS)
        medians = interleaved_medians(calls, rounds=rounds, min_time=quick(0.05, 0.0))
        for who, s in medians.items():
            rows.append([what, who, format_seconds(s), f"{s / medians['exported']:.2f}x"])
    return rows, len(interpreted.program.nodes), seconds


def run() -> str:
    """Markdown: a table of interleaved medians and the ratios, then the compile times."""
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
    builds = []
    for _ in range(2):  # the second build of the same graph finds Inductor's cache
        start = time.perf_counter()
        compiled = make_objective("exported", data, {**options, "compile": True})
        builds.append(time.perf_counter() - start)
    v = torch.randn_like(x)
    autograd = MethodOptions(method="newton", backend="autograd")
    default = MethodOptions(method="newton")

    def func_hvp() -> torch.Tensor:
        _, vjp = torch.func.vjp(torch.func.grad(lambda p: fn(p, X, y)), x)
        return vjp(v)[0]

    def each(call) -> dict[str, object]:
        return {
            "catalogue": lambda: call(catalogue),
            "exported": lambda: call(exported),
            "exported, compiled": lambda: call(compiled),
        }

    groups = {
        "Newton step (autograd)": each(lambda o: take_step(o, x, autograd)),
        "Newton step (default backend)": each(lambda o: take_step(o, x, default)),
        "HVP": {**each(lambda o: hvp(o, x, v)), "torch.func eager": func_hvp},
        "loss + gradient": {
            **each(lambda o: loss_and_grad(o, x)),
            "torch.func eager": lambda: torch.func.grad_and_value(lambda p: fn(p, X, y))(x),
        },
        "loss (no autograd: a line-search trial)": each(lambda o: loss_value(o, x)),
    }
    rows = []
    for what, calls in groups.items():
        rounds = rounds_for(calls, budget=quick(20.0, 1.0), most=REPEATS)
        seconds = interleaved_medians(calls, rounds=rounds, min_time=quick(0.05, 0.0))
        for who, s in seconds.items():
            rows.append([what, who, format_seconds(s), f"{s / seconds['catalogue']:.2f}x"])
    mode = " (HESSIAN_BENCH_QUICK: a smoke run, too short to judge)" if QUICK else ""
    n = catalogue.num_params
    return (
        f"mlp {SIZES}, {ROWS} rows, float64, {n} parameters, {len(exported.program.nodes)} "
        f"graph nodes; interleaved medians (up to {REPEATS} rounds){mode}.\n\n"
        + markdown_table(["computation", "objective", "median", "vs catalogue"], rows)
        + "\n\nThe exported program is interpreted node by node (one Python dispatch per ATen "
        "call, plus a cancel/deadline check and a declared-shape check per node), so its "
        "overhead is per node, not per flop: the ratio shrinks as layers grow. With "
        "`--exported-compile` the loss and the loss-and-gradient are one Inductor call each; "
        "second derivatives (Newton's dense Hessian, HVPs) still run the interpreter. "
        f"Compiling is a one-off cost per built problem (kept in the server's problem cache): "
        f"{builds[0]:.1f} s for the first build in this process, {builds[1]:.1f} s for a "
        "rebuild of the same graph (Inductor's on-disk cache)." + waves_section()
    )


def waves_section() -> str:
    """The elementwise-heavy program's table, in markdown."""
    rows, nodes, seconds = waves_rows()
    return (
        f"\n\nSum of {WAVES} damped sine waves (mse, {ROWS} points, {3 * WAVES} parameters, "
        f"{nodes} graph nodes; compiled in {seconds:.1f} s), ratios against the interpreter:\n\n"
        + markdown_table(["computation", "objective", "median", "vs interpreted"], rows)
    )


if __name__ == "__main__":
    print(run())
