"""`hessian`: the command line over the client SDK (address from --address or HESSIAN_ADDRESS)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from . import problems, seed
from .client import DEFAULT_ADDRESS, Client, Run, status_name
from .errors import HessianError
from .options import enum_label
from .proto import optimize_pb2, problem_pb2

BAR_WIDTH = 24


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_problem(args: argparse.Namespace) -> problem_pb2.Problem | str:
    """The problem a `run` names: an id, or an objective with an .npz of data and options."""
    if args.problem_id:
        return args.problem_id
    if not args.objective:
        raise SystemExit("run: give --problem-id or --objective")
    data: dict[str, np.ndarray] = {}
    if args.data:
        with np.load(args.data) as npz:
            data = {k: npz[k] for k in npz.files}
    options = dict(args.option or [])
    builder = getattr(problems, args.objective, None)
    if builder is None or args.objective.startswith("_"):
        raise SystemExit(f"run: unknown objective {args.objective!r}")
    try:
        return builder(**data, **options)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"run: bad --data or --option for {args.objective}: {exc}") from None


class ProgressBar:
    """One self-overwriting line: iteration, a bar, loss and gradient norm (at most 10 Hz)."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = max(total, 1)
        self.out = out
        self.last_draw = 0.0

    def update(self, record: optimize_pb2.StepRecord, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        done = min(record.iteration / self.total, 1.0)
        fill = int(done * BAR_WIDTH)
        bar = "#" * fill + "." * (BAR_WIDTH - fill)
        self.out.write(
            f"\rit {record.iteration:>6}/{self.total} [{bar}] loss {record.loss:.6e} "
            f"|g| {record.gradient_norm:.3e}"
        )
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _summary(info: Any) -> str:
    reason = enum_label_stop(info.stop_reason)
    return (
        f"{info.run_id} {status_name(info)} stop={reason or '-'} records={info.num_records} "
        f"loss={info.last_record.loss:.6e} {info.message}"
    )


def enum_label_stop(value: int) -> str:
    """Engine name of a StopReason value."""
    name = optimize_pb2.StopReason.Name(value)
    return "" if value == 0 else name.removeprefix("STOP_REASON_").lower()


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    lim = info.limits
    print(f"hessian-server {info.version} (torch {info.torch_version}) at {client.address}")
    native = "available" if info.native_available else "unavailable"
    print(f"backend: {info.default_backend}; native {native}: {info.native_reason}")
    print(f"devices: {', '.join(info.devices)}")
    print(f"objectives: {', '.join(info.objectives)}")
    print(f"methods: {', '.join(info.methods)}")
    print(
        f"limits: message {lim.max_message_bytes} B, params {lim.max_params}, dense Hessian "
        f"{lim.dense_budget_bytes} B, iterations {lim.max_iterations}, concurrent runs "
        f"{lim.max_concurrent_runs}, workers {lim.workers}"
    )
    print(
        f"        data {lim.max_data_bytes} B per problem, runs per token "
        f"{lim.max_runs_per_token or 'unlimited'}, stored runs "
        f"{lim.max_stored_runs or 'unlimited'}, store "
        f"{f'{lim.max_store_bytes} B' if lim.max_store_bytes else 'unlimited'}, curvature "
        f"products {lim.max_spectrum_products} per call, ListRuns page "
        f"{lim.max_list_page_size}, sampled values {lim.max_sample_elements} per call"
    )
    print(
        f"threads: {lim.usable_cpus} usable CPUs, {lim.intra_op_threads} torch threads per call, "
        f"one thread below size {lim.single_thread_below} (max(rows, params) x params^2)"
    )
    return 0


def _follow(run: Run, total: int, quiet: bool) -> int:
    bar = None if quiet else ProgressBar(total, sys.stderr)
    last = None
    for record in run.stream():
        last = record
        if bar:
            bar.update(record)
    if bar:
        if last is not None:
            bar.update(last, force=True)
        bar.close()
    assert run.final is not None
    print(_summary(run.final))
    return 0 if status_name(run.final) == "FINISHED" else 1


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    params = np.load(args.params) if args.params else None
    stopping = {"max_iterations": args.max_iterations}
    for key in ("gradient_tolerance", "function_tolerance", "parameter_tolerance"):
        value = getattr(args, key)
        if value is not None:
            stopping[key] = value
    run = client.start_run(
        build_problem(args),
        params,
        seed=args.seed,
        name=args.name,
        stopping=stopping,
        method=args.method,
        learning_rate=args.lr,
        damping=args.damping,
        step_policy=args.step_policy,
        curvature=args.curvature,
        backend=args.backend,
        dense_budget_bytes=args.dense_budget_bytes,
        cg_max_iterations=args.cg_max_iterations,
        cg_tolerance=args.cg_tolerance,
        trust_radius=args.trust_radius,
        curvature_fraction=args.curvature_fraction,
        gradient_fraction=args.gradient_fraction,
        hvp_mode=args.hvp_mode,
    )
    print(f"run {run.id}", file=sys.stderr)
    note = run.info().method_note
    if note:
        print(note, file=sys.stderr)
    if args.detach:
        print(run.id)
        return 0
    return _follow(run, args.max_iterations, args.quiet)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def cmd_curvature(client: Client, args: argparse.Namespace) -> int:
    result = client.analyze_curvature(
        build_problem(args),
        np.load(args.params),
        top_k=args.top_k,
        bottom_k=args.bottom_k,
        block_size=args.block_size,
        curvature=args.curvature,
        backend=args.backend,
        trace_samples=args.trace_samples,
        density_probes=args.density_probes,
        seed=args.seed,
    )
    if args.json:
        json.dump(dataclasses.asdict(result), sys.stdout, default=_json_default)
        sys.stdout.write("\n")
        return 0
    print(f"verdict: {result.verdict} ({result.verdict_reason})")
    print(f"top eigenvalues: {', '.join(f'{v:.9g}' for v in result.top_eigenvalues)}")
    print(f"bottom eigenvalues: {', '.join(f'{v:.9g}' for v in result.bottom_eigenvalues)}")
    for label, t in (("Hutchinson", result.trace_hutchinson), ("Hutch++", result.trace_hutchpp)):
        if t is not None:
            print(
                f"trace ({label}): {t.estimate:.6g} +- {t.half_width:.3g} "
                f"at {t.confidence:.0%} ({t.products} products)"
            )
    parts = ", ".join(f"{k} {v}" for k, v in result.products_by_part.items())
    print(
        f"{result.num_params} parameters, loss {result.loss:.9g}, max|g| "
        f"{result.gradient_max_norm:.3g}; {result.products} Hessian-vector products ({parts}); "
        f"{result.seconds:.3f} s, backend {result.backend}"
    )
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    run = client.run(args.run_id)
    info = run.info()
    if args.progress:
        return _follow(run, info.stopping.max_iterations or 100, False)
    for r in run.stream(args.from_iteration):
        print(
            f"{r.iteration:>7} loss {r.loss:.9e} |g| {r.gradient_norm:.3e} "
            f"step {r.step_norm:.3e} {r.iteration_seconds * 1e3:.2f} ms"
        )
    assert run.final is not None
    print(_summary(run.final))
    return 0


def cmd_runs(client: Client, args: argparse.Namespace) -> int:
    print(f"{'run_id':<34} {'status':<11} {'method':<16} {'records':>8} {'last loss':>13}  name")
    for i, info in enumerate(client.list_runs(args.status or ())):
        if i >= args.limit:
            break
        method = enum_label("method", info.options.method) or "-"
        print(
            f"{info.run_id:<34} {status_name(info):<11} {method:<16} {info.num_records:>8} "
            f"{info.last_record.loss:>13.6e}  {info.name}"
        )
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    info = client.cancel_run(args.run_id)
    print(f"cancel requested: {info.run_id} ({status_name(info)})")
    return 0


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    run = client.resume_run(args.run_id)
    return _follow(run, run.info().stopping.max_iterations or 100, args.quiet)


def cmd_delete_problem(client: Client, args: argparse.Namespace) -> int:
    client.delete_problem(args.problem_id)
    print(f"deleted: {args.problem_id}")
    return 0


def cmd_seed(client: Client, args: argparse.Namespace) -> int:
    losses = seed.seed_losses(client)
    if args.json:
        json.dump(losses, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(seed.format_table(losses))
    return 0


def cmd_plot(client: Client, args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot needs matplotlib: pip install 'hessian-client[plot]'", file=sys.stderr)
        return 2
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_id in args.run_ids:
        run = client.run(run_id)
        losses = [r.loss for r in run.stream()]
        info = run.final
        label = info.name or run_id if info is not None else run_id
        ax.semilogy(losses, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print(f"plot written to {args.output}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per verb)."""
    p = argparse.ArgumentParser(prog="hessian", description=__doc__)
    p.add_argument(
        "--address",
        default=os.environ.get("HESSIAN_ADDRESS", DEFAULT_ADDRESS),
        help="host:port of the server (env HESSIAN_ADDRESS)",
    )
    p.add_argument(
        "--token", default=os.environ.get("HESSIAN_TOKEN"), help="bearer token (env HESSIAN_TOKEN)"
    )
    p.add_argument(
        "--ca-file",
        default=os.environ.get("HESSIAN_CA_FILE"),
        help="PEM CA of the server's TLS certificate; turns TLS on (env HESSIAN_CA_FILE)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of unary calls, s")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="server version, backend, devices, limits")
    r = sub.add_parser("run", help="start a run and follow it with a progress bar")
    r.add_argument("--problem-id")
    r.add_argument("--objective", help="catalogue name (with --data FILE.npz, --option K=V)")
    r.add_argument("--data", help=".npz of the named data tensors")
    r.add_argument("--option", action="append", type=_parse_option, help="objective option")
    r.add_argument("--params", help=".npy of initial parameters (else --seed draws them)")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--method", default="newton")
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--damping", type=float, default=None)
    r.add_argument("--step-policy", default=None)
    r.add_argument("--curvature", default=None)
    r.add_argument("--backend", default=None)
    r.add_argument("--dense-budget-bytes", type=int, default=None, help="for --method auto")
    r.add_argument("--cg-max-iterations", type=int, default=None)
    r.add_argument("--cg-tolerance", type=float, default=None)
    r.add_argument("--trust-radius", type=float, default=None)
    r.add_argument("--curvature-fraction", type=float, default=None)
    r.add_argument(
        "--gradient-fraction", type=float, default=None, help="Hessian-free mini-batch gradient"
    )
    r.add_argument("--hvp-mode", default=None)
    r.add_argument("--max-iterations", type=int, default=100)
    r.add_argument("--gradient-tolerance", type=float, default=None)
    r.add_argument("--function-tolerance", type=float, default=None)
    r.add_argument("--parameter-tolerance", type=float, default=None)
    r.add_argument("--name", default="")
    r.add_argument("--detach", action="store_true", help="print the run id and return")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    cv = sub.add_parser(
        "curvature", help="eigenvalue extremes, trace and verdict (minimum/saddle/...) at a point"
    )
    cv.add_argument("--problem-id")
    cv.add_argument("--objective", help="catalogue name (with --data FILE.npz, --option K=V)")
    cv.add_argument("--data", help=".npz of the named data tensors")
    cv.add_argument("--option", action="append", type=_parse_option, help="objective option")
    cv.add_argument("--params", required=True, help=".npy of the parameters to analyse")
    cv.add_argument("--top-k", type=int, default=None)
    cv.add_argument("--bottom-k", type=int, default=None)
    cv.add_argument(
        "--block-size", type=int, default=None, help="Lanczos block: multiplicities up to it"
    )
    cv.add_argument("--curvature", default=None, help="hessian or gauss_newton")
    cv.add_argument("--backend", default=None, help="auto, native or autograd products")
    cv.add_argument("--trace-samples", type=int, default=None, help="0: no trace")
    cv.add_argument("--density-probes", type=int, default=None, help="0: no density")
    cv.add_argument("--seed", type=int, default=None, help="the probes' seed")
    cv.add_argument("--json", action="store_true", help="the whole answer as JSON")
    w = sub.add_parser("watch", help="print a run's records as they come")
    w.add_argument("run_id")
    w.add_argument("--from", dest="from_iteration", type=int, default=0)
    w.add_argument("--progress", action="store_true", help="a progress bar instead of lines")
    ls = sub.add_parser("runs", help="list runs, newest first")
    ls.add_argument("--status", action="append", help="filter (repeatable): RUNNING, FINISHED...")
    ls.add_argument("--limit", type=int, default=50)
    c = sub.add_parser("cancel", help="stop a run before its next iteration")
    c.add_argument("run_id")
    rs = sub.add_parser("resume", help="continue an INTERRUPTED run")
    rs.add_argument("run_id")
    rs.add_argument("--quiet", action="store_true")
    dp = sub.add_parser("delete-problem", help="delete a stored problem no live run uses")
    dp.add_argument("problem_id")
    s = sub.add_parser("seed", help="the seed notebook's GD-vs-Newton table, on the server")
    s.add_argument("--json", action="store_true")
    pl = sub.add_parser("plot", help="loss curves of runs (needs matplotlib)")
    pl.add_argument("run_ids", nargs="+")
    pl.add_argument("-o", "--output", default="losses.png")
    return p


COMMANDS = {
    "info": cmd_info,
    "run": cmd_run,
    "curvature": cmd_curvature,
    "watch": cmd_watch,
    "runs": cmd_runs,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
    "delete-problem": cmd_delete_problem,
    "seed": cmd_seed,
    "plot": cmd_plot,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = parser().parse_args(argv)
    with Client(
        args.address, token=args.token, timeout=args.timeout, ca_file=args.ca_file
    ) as client:
        try:
            return COMMANDS[args.command](client, args)
        except HessianError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
