"""`hessian`: the command line over the client SDK (address from --address or HESSIAN_ADDRESS).

Errors are one line on stderr: exit 2 for usage mistakes (checked here or by the SDK before
sending), 1 for the server's errors, 130 after Ctrl-C. `--json` on every subcommand prints
one JSON object, or JSON lines for streams of records or runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import itertools
import json
import math
import os
import pathlib
import queue
import shutil
import sys
import threading
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from . import problems, seed
from ._version import API_VERSION, __version__
from .client import DEFAULT_ADDRESS, DISTRIBUTIONS, STATUSES, Client, Run, address_problem
from .errors import HessianError, InvalidArgument, ResourceExhausted, RunFailed
from .options import choices
from .proto import problem_pb2
from .results import RunInfo, RunStatus, StepRecord, _jsonable

OBJECTIVES = [f.name for f in problem_pb2.Problem.DESCRIPTOR.oneofs_by_name["objective"].fields]
RECORD_FIELDS = [f for f in StepRecord.__dataclass_fields__ if f != "raw"]
# CSV's empty value per field: nan for a float not computed, "" for a verdict not given
CSV_MISSING = {
    n: "nan" if f.type is float else "" for n, f in StepRecord.__dataclass_fields__.items()
}
PLOT_Y = ("loss", "gradient_norm", "loss_gap")
FORMATS = ("csv", "jsonl", "parquet")
EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 2, 1, 130
MAX_TIMEOUT = 86400.0  # seconds (a day): gRPC turns a deadline near 1e30 into an instant one
MAX_COUNT = 2**63 - 1  # the largest --limit: islice refuses counts past sys.maxsize


class UsageError(Exception):
    """A mistake on the command line (exit 2)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except the uninformative None/False/"" (server default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default  # by identity: a default of 0 (== False) is shown
        if any(default is v for v in (None, False, argparse.SUPPRESS)) or default == "":
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and defaults shown in every help text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    """An argparse type: a whole number in [1, 2**63 - 1] (a count; past it nothing fits)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_COUNT}], got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0 and at most MAX_TIMEOUT."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds > 0 and at most {MAX_TIMEOUT:g}, got {text!r}"
        )
    return value


def _count(n: int, noun: str) -> str:
    """`n noun`, plural unless n is 1 ("1 torch thread", "2 usable CPUs")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_address(address: str) -> str | None:
    """Why `address` cannot be dialled as meant (client.address_problem), or None."""
    problem = address_problem(address)
    return None if problem is None else f"expected {problem}, got {address!r}"


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# what np.load raises on a file that is not numpy data (a truncated or damaged archive,
# a pickle, text, object arrays that would need allow_pickle)
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _load(path: str, flag: str, *, archive: bool) -> Any:
    """The numpy data of a file named on the command line: an .npz's arrays by name
    (`archive`) or an .npy's one array; a usage error naming `flag` otherwise."""
    want = "an .npz of named arrays (np.savez)" if archive else "an .npy of one array (np.save)"
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY" and not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            # numpy takes anything else for a pickle: "pickled (object) data" of a text file
            raise UsageError(f"{flag}: expected {want}, got a file of neither kind in {path!r}")
        loaded = np.load(path)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if not archive:
                    got = f"an .npz of the arrays {loaded.files}"
                    raise UsageError(f"{flag}: expected {want}, got {got} in {path!r}")
                return {k: loaded[k] for k in loaded.files}
    except FileNotFoundError:
        raise UsageError(f"{flag}: no such file {path!r}") from None
    except UNREADABLE as exc:
        raise UsageError(f"{flag}: cannot read {path!r} as {want}: {exc}") from None
    if archive:
        got = f"an .npy of one array of shape {list(loaded.shape)}"
        raise UsageError(f"{flag}: expected {want}, got {got} in {path!r}")
    return loaded


def _builder_error(exc: Exception, objective: str, options: dict[str, Any]) -> UsageError:
    """A problem builder's refusal as a usage error naming the flag at fault: --option for
    an option's key, --data for a data array (data.NAME), --exported for the program."""
    if not isinstance(exc, InvalidArgument):  # e.g. a data array or option missing, unknown
        return UsageError(f"bad --data or --option for {objective}: {exc}")
    if exc.field in options:
        flag = "--option"
    elif exc.field.startswith("data."):
        flag = "--data"
    else:
        flag = "--exported" if exc.field == "program" else "--data or --option"
    return UsageError(f"bad {flag} for {objective}: {exc.message}")


def build_problem(args: argparse.Namespace) -> problem_pb2.Problem | str:
    """The problem a command names: an id, or a catalogue objective or an exported program
    (--exported FILE.pt2) with an .npz of data and options."""
    given = [flag for flag, value in (("--problem-id", args.problem_id), ("--objective",
             args.objective), ("--exported", args.exported)) if value is not None]  # fmt: skip
    if args.exported == "":
        raise UsageError("--exported: expected a FILE.pt2 (torch.export.save's), got ''")
    if args.objective == "exported" or (args.exported and args.objective):
        raise UsageError("an exported program comes with --exported FILE.pt2, not --objective")
    if len(given) > 1:  # --problem-id with another was taken alone, the other ignored
        raise UsageError(f"give one of --problem-id, --objective or --exported, not {given}")
    if args.problem_id is not None:
        if not args.problem_id:
            raise UsageError("--problem-id: expected a problem id (CreateProblem's), got ''")
        if args.data or args.option:
            raise UsageError("--data and --option describe a problem sent, not --problem-id")
        return args.problem_id
    if not given:
        raise UsageError("give --problem-id, --objective or --exported")
    data = _load(args.data, "--data", archive=True) if args.data else {}
    keys = [key for key, _ in args.option or []]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:  # the last one was taken, silently
        raise UsageError(f"--option {repeated[0]} given more than once")
    options = dict(args.option or [])
    if args.exported:
        try:
            with open(args.exported, "rb") as f:
                program = f.read()
        except OSError as exc:
            raise UsageError(f"--exported: cannot read {args.exported!r}: {exc.strerror}") from None
        _refuse_unknown_options(
            problems.exported_archive, options, {}, "the --exported program", keyword_only=True
        )
        try:
            return problems.exported_archive(program, data, **options)
        except (TypeError, ValueError) as exc:
            raise _builder_error(exc, "the --exported program", options) from None
    builder = getattr(problems, args.objective)
    takes = inspect.signature(builder).parameters
    _refuse_unknown_options(builder, options, data, args.objective)
    arrays = [  # the data a builder takes: its positional parameters without a default
        n
        for n, p in takes.items()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty
    ]
    if set(data) - set(takes) or set(arrays) - set(data) - set(options):
        raise UsageError(
            f"bad --data for {args.objective}: expected an .npz of the arrays {arrays}, "
            f"got {sorted(data)}"
        )
    try:
        return builder(**data, **options)
    except (TypeError, ValueError) as exc:
        raise _builder_error(exc, args.objective, options) from None


def _status_word(text: str) -> str:
    """A run status in any case, as the SDK takes it (an unknown word is echoed as typed)."""
    return text.upper() if text.upper() in STATUSES else text


def _refuse_unknown_options(
    builder: Callable[..., Any],
    options: dict[str, Any],
    data: dict[str, Any],
    what: str,
    keyword_only: bool = False,
) -> None:
    """Name an --option the builder has no parameter for (Python's TypeError names the
    builder function, not the flag), listing its names (`keyword_only`: only those, the
    options of a builder whose other arguments are no --option's)."""
    takes = inspect.signature(builder).parameters
    names = [
        n for n, p in takes.items() if p.kind is inspect.Parameter.KEYWORD_ONLY or not keyword_only
    ]
    unknown = sorted(set(options) - set(names) - set(data))
    if unknown:
        raise UsageError(f"bad --option for {what}: {unknown[0]!r} is none of its names {names}")


def emit(value: Any) -> None:
    """One JSON value on a line of stdout."""
    sys.stdout.write(json.dumps(_jsonable(value), allow_nan=False) + "\n")


class Progress:
    """A tqdm bar over a run's iterations (rate, ETA, loss and |g|); off when not a tty."""

    def __init__(self, total: int | None, enabled: bool = True) -> None:
        size = shutil.get_terminal_size((100, 24))  # the fallback where a tty reports 0 x 0
        self.bar = tqdm(
            total=total,
            unit="it",
            file=sys.stderr,
            disable=not (enabled and sys.stderr.isatty()),
            ncols=size.columns,
            nrows=size.lines,
            mininterval=0.1,
        )

    def update(self, record: StepRecord) -> None:
        """Move to the record's iteration with its loss and gradient norm."""
        self.bar.set_postfix_str(
            f"loss {record.loss:.6e} |g| {record.gradient_norm:.3e}", refresh=False
        )
        self.bar.update(record.iteration - self.bar.n)

    def close(self, finished: bool) -> None:
        """An early finish shows n/n (the run stopped there), not n/max_iterations."""
        if finished and self.bar.total is not None:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def _summary(info: RunInfo) -> str:
    last = f"{info.last_record.loss:.6e}" if info.last_record else "-"
    return (
        f"{info.run_id} {info.status} stop={info.stop_reason or '-'} "
        f"records={info.num_records} loss={last} {info.message}"
    )


def records_in_background(run: Run, from_iteration: int = 0) -> Iterator[StepRecord]:
    """The run's records, streamed by a daemon thread: Ctrl-C then interrupts only this
    thread's wait on a queue, never gRPC's internals (a KeyboardInterrupt landing inside
    them can leave a lock held and hang the exit). `run.final` is set when this ends."""
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    end = object()

    def pump() -> None:
        try:
            for record in run.stream(from_iteration):
                items.put(record)
            items.put(end)
        except BaseException as exc:  # handed to the main thread, raised there
            items.put(exc)

    threading.Thread(target=pump, name=f"watch-{run.id}", daemon=True).start()
    while (item := items.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _interrupted(client: Client, run_id: str, detach: bool) -> int:
    """Ctrl-C: cancel the run (or, detached, leave it running), say which, exit 130."""
    if detach:
        print(
            f"interrupted: run {run_id} keeps running on the server "
            f"(hessian watch {run_id}; hessian cancel {run_id})",
            file=sys.stderr,
        )
    else:
        info = client.cancel_run(run_id)
        print(f"interrupted: cancel requested for run {run_id} ({info.status})", file=sys.stderr)
    return EXIT_INTERRUPTED


def _follow(client: Client, run: Run, args: argparse.Namespace, from_iteration: int = 0) -> int:
    """Stream a run with a progress bar (or JSON lines), then its final state."""
    total = (run._info or run.info()).max_iterations or 100
    progress = Progress(total, enabled=not (args.quiet or args.json))
    finished = False
    try:
        for record in records_in_background(run, from_iteration):
            progress.update(record)
            if args.json:
                emit(record)
        finished = True
    except KeyboardInterrupt:
        progress.close(False)
        return _interrupted(client, run.id, args.detach_on_interrupt)
    progress.close(finished)
    assert run.final is not None
    if args.json:
        emit(run.final)
    else:
        print(_summary(run.final))
    return 0 if run.final.status == RunStatus.FINISHED else 1


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.info()
    if args.json:
        emit(info)
        return 0
    lim = info.limits
    print(
        f"hessian-server {info.version} (API {info.api_version or '1.0'}, torch "
        f"{info.torch_version}) at {client.address}; hessian-client {__version__} (API "
        f"{API_VERSION})"
    )
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
        f"threads: {_count(lim.usable_cpus, 'usable CPU')}, "
        f"{_count(lim.intra_op_threads, 'torch thread')} per call"
        + (
            f", one thread below size {lim.single_thread_below} (max(rows, params) x params^2)"
            if lim.single_thread_below
            else " at every size (no single-thread threshold)"
        )
    )
    return 0


def _flag_of(field: str, args: argparse.Namespace) -> str | None:
    """The command-line flag a refused field stands for (options.learning_rate: --lr,
    stopping.max_iterations: --max-iterations, initial_params: --params), or None."""
    if field == "initial_params" or field.startswith("initial_params."):
        return "--params"
    if field == "options.seed":  # the sub-samples' seed: no flag (--seed draws the start)
        return None
    if field.startswith(("problem.data.", "data.")):
        return "--data"
    objective = getattr(args, "objective", None)
    if objective and field.startswith(f"problem.{objective}."):  # an objective's option
        return f"--option {field.removeprefix(f'problem.{objective}.')}"
    key = field.rsplit(".", 1)[-1] if field.startswith(("options.", "stopping.")) else field
    key = "lr" if key == "learning_rate" else key
    return f"--{key.replace('_', '-')}" if key in vars(args) else None


def _as_usage(exc: HessianError, args: argparse.Namespace) -> HessianError:
    """A refusal of a flag's value as the usage mistake it is (exit 2), naming the flag
    (`--lr -1` said `options.learning_rate: expected ...` and exited 1); others as they are."""
    flag = _flag_of(exc.field, args) if exc.field else None
    if flag is None:
        return exc
    said = exc.message.removeprefix(f"{exc.field}: ").replace(exc.field, flag)  # "pass ..."
    return UsageError(f"{flag}: {said}")


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    params = _load(args.params, "--params", archive=False) if args.params else None
    problem = build_problem(args)
    stopping = {}  # what is not given keeps the server's default (max_iterations: 100)
    for key in (
        "max_iterations",
        "gradient_tolerance",
        "function_tolerance",
        "parameter_tolerance",
    ):
        value = getattr(args, key)
        if value is not None:
            stopping[key] = value
    try:
        run = _start(client, args, problem, params, stopping)
    except (InvalidArgument, ResourceExhausted) as exc:  # a flag's value, refused
        raise _as_usage(exc, args) from None
    if not args.json:
        print(f"run {run.id}", file=sys.stderr)
        if run._info is not None and run._info.method_note:
            print(run._info.method_note, file=sys.stderr)
    if args.detach:
        if args.json:
            emit(run._info)
        else:
            print(run.id)
        return 0
    args.detach_on_interrupt = False
    return _follow(client, run, args)


def _start(
    client: Client, args: argparse.Namespace, problem: Any, params: Any, stopping: dict
) -> Run:
    """StartRun with the run command's flags."""
    return client.start_run(
        problem,
        params,
        seed=args.seed,
        init=args.init,
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


def cmd_curvature(client: Client, args: argparse.Namespace) -> int:
    problem = build_problem(args)
    result = client.analyze_curvature(
        problem,
        _load(args.params, "--params", archive=False),
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
        emit(result.to_dict())
        return 0
    print(f"verdict: {result.verdict or 'none'} ({result.verdict_reason})")
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
    args.detach_on_interrupt = args.detach
    if args.progress or args.json:
        args.quiet = args.json
        return _follow(client, run, args, args.from_iteration)
    try:
        for r in records_in_background(run, args.from_iteration):
            print(
                f"{r.iteration:>7} loss {r.loss:.9e} |g| {r.gradient_norm:.3e} "
                f"step {r.step_norm:.3e} {r.iteration_seconds * 1e3:.2f} ms",
                flush=True,
            )
    except KeyboardInterrupt:
        return _interrupted(client, run.id, args.detach)
    assert run.final is not None
    print(_summary(run.final))
    return 0 if run.final.status == RunStatus.FINISHED else 1  # as --json and --progress


def cmd_runs(client: Client, args: argparse.Namespace) -> int:
    runs = itertools.islice(client.list_runs(args.status or ()), args.limit)
    first = next(runs, None)  # asked before the header: a refused call prints no table
    if not args.json:
        print(
            f"{'run_id':<34} {'status':<11} {'method':<16} {'records':>8} {'last loss':>13}  name"
        )
    for info in itertools.chain([first] if first is not None else [], runs):
        if args.json:
            emit(info)
            continue
        last = f"{info.last_record.loss:>13.6e}" if info.last_record else f"{'-':>13}"
        print(
            f"{info.run_id:<34} {info.status:<11} {info.method or '-':<16} "
            f"{info.num_records:>8} {last}  {printable(info.name)}"
        )
    return 0


def printable(text: str) -> str:
    """`text` with control and format characters escaped (a name stored by an older server
    may hold terminal escapes; the table is printed to a terminal)."""
    return "".join(
        c.encode("unicode_escape").decode()
        if unicodedata.category(c)[0] in "CZ" and c != " "
        else c
        for c in text
    )


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    info = client.cancel_run(args.run_id)
    if args.json:
        emit(info)
    elif info.status in ("FINISHED", "FAILED"):  # CancelRun leaves an ended run as it is
        print(f"run {info.run_id} had already ended ({info.status}): nothing to cancel")
    else:
        print(f"cancel requested: {info.run_id} ({info.status})")
    return 0


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    """Resume and follow the run's new records: those it had were printed when it ran (a
    resumed run of 34,701 records printed them all again first)."""
    run = client.resume_run(args.run_id)
    args.detach_on_interrupt = args.detach
    return _follow(client, run, args, run._info.num_records)


def cmd_delete_problem(client: Client, args: argparse.Namespace) -> int:
    deleted = client.delete_problem(args.problem_id)
    if args.json:
        emit({"problem_id": args.problem_id, "deleted": deleted})
    else:
        print(f"deleted: {args.problem_id}")
    return 0


def cmd_seed(client: Client, args: argparse.Namespace) -> int:
    losses = seed.seed_losses(client)
    if args.json:
        emit(losses)
    else:
        print(seed.format_table(losses))
    return 0


def _write_records(records: Iterable[StepRecord], fmt: str, output: str | None) -> None:
    rows = [r.to_dict() for r in records]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("--format parquet needs pyarrow: pip install pyarrow") from None
        if not output:
            raise UsageError("--format parquet needs --output FILE")
        try:
            pq.write_table(pa.Table.from_pylist(rows), output)
        except OSError as exc:
            raise UsageError(f"--output {output}: cannot write it ({exc})") from None
        return
    try:
        # entered below: opened here so a path that cannot be written is named as --output
        out = open(output, "w", newline="") if output else contextlib.nullcontext(sys.stdout)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"--output {output}: cannot write it ({exc.strerror})") from None
    with out as fh:
        if fmt == "csv":
            writer = csv.DictWriter(fh, fieldnames=RECORD_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(
                {k: (CSV_MISSING[k] if v is None else v) for k, v in r.items()} for r in rows
            )
        else:
            for row in rows:
                fh.write(json.dumps(row, allow_nan=False) + "\n")


def cmd_records(client: Client, args: argparse.Namespace) -> int:
    fmt = "jsonl" if args.json else args.format
    _write_records(client.run(args.run_id).stream(args.from_iteration), fmt, args.output)
    if args.output and not args.json:
        print(f"records of {args.run_id} written to {args.output}", file=sys.stderr)
    return 0


def plot_series(
    losses: np.ndarray, gradient_norms: np.ndarray, y: str, best: float | None = None
) -> np.ndarray:
    """The plotted values: the loss, the gradient norm, or loss - `best` (the lowest loss of
    every run plotted, so runs are measured from one level; default: these losses' lowest),
    the gap that shows Newton's quadratic convergence near a non-zero minimum; <= 0 is NaN."""
    values = {"loss": losses, "gradient_norm": gradient_norms}.get(y)
    if values is None:
        values = losses - (losses.min() if best is None else best)
    values = np.asarray(values, dtype=np.float64).copy()
    values[values <= 0] = np.nan
    return values


def cmd_plot(client: Client, args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the file's format is its suffix (matplotlib's rule), checked before any run is read;
    # without one it is PNG, written to NAME.png as matplotlib does, and said so
    suffix = pathlib.Path(args.output).suffix.lower().lstrip(".")
    formats = fig.canvas.get_supported_filetypes()
    if not suffix:
        args.output += ".png"
    elif suffix not in formats:
        plt.close(fig)
        raise UsageError(
            f"--output {args.output}: expected a file name ending in one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )
    series = []
    for run_id in args.run_ids:
        run = client.run(run_id)
        records = list(run.stream())
        label = (run.final.name if run.final is not None else "") or run_id
        series.append((label, records, np.array([r.loss for r in records])))
    best = min((float(np.nanmin(losses)) for _, _, losses in series if losses.size), default=0.0)
    for label, records, losses in series:
        norms = np.array([r.gradient_norm for r in records])
        ax.semilogy(
            [r.iteration for r in records],
            plot_series(losses, norms, args.y, best),
            "o-",
            markersize=3,
            label=label,
        )
    ax.set_xlabel("iteration")
    gap = "loss - best loss of the runs plotted"
    ax.set_ylabel({"loss_gap": gap}.get(args.y, args.y) + " (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    if args.json:
        emit({"output": args.output, "y": args.y, "runs": list(args.run_ids)})
    else:
        print(f"plot written to {args.output}")
    return 0


def cmd_completion(client: Client, args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError:
        raise UsageError("completion needs argcomplete: pip install argcomplete") from None
    script = argcomplete.shellcode(["hessian"], shell=args.shell)
    if args.json:
        emit({"shell": args.shell, "script": script})
    else:
        sys.stdout.write(script)
    return 0


def _problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem-id", help="a problem uploaded before (else --objective)")
    p.add_argument("--objective", choices=OBJECTIVES, help="catalogue objective")
    p.add_argument(
        "--exported",
        metavar="FILE.pt2",
        help="your own objective: a torch.export.save archive of loss(params, **data) "
        "(options: loss=mse|cross_entropy for outputs, target=NAME, param_shape=[...])",
    )
    p.add_argument("--data", help=".npz of the objective's named data tensors (X, y, ...)")
    p.add_argument(
        "--option", action="append", type=_parse_option, help="objective option KEY=VALUE"
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per verb)."""
    p = Parser(prog="hessian", description=__doc__)
    p.add_argument(
        "--version", action="version", version=f"hessian-client {__version__} (API {API_VERSION})"
    )
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
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=60.0,
        help=f"deadline of unary calls, s (at most {MAX_TIMEOUT:g})",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="JSON output (objects or lines)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            parents=[common],
            formatter_class=HelpFormatter,
        )

    command("info", "server and API versions, backend, devices, limits")
    r = command("run", "start a run and follow it (Ctrl-C cancels it)")
    _problem_args(r)
    r.add_argument("--params", help=".npy of initial parameters (else --seed draws them)")
    r.add_argument(
        "--seed",
        type=int,
        default=None,
        help="server-side draw of the start (not with --params; with --init objective_default "
        "the objective's own initialiser, a fixed start for Rosenbrock)",
    )
    r.add_argument(
        "--init",
        default="objective_default",
        choices=DISTRIBUTIONS,
        help="the --seed draw's distribution",
    )
    r.add_argument("--method", default="newton", choices=choices("method"))
    r.add_argument("--lr", type=float, default=None, help="learning rate (server default)")
    r.add_argument("--damping", type=float, default=None)
    r.add_argument("--step-policy", default=None, choices=choices("step_policy"))
    r.add_argument("--curvature", default=None, choices=choices("curvature"))
    r.add_argument("--backend", default=None, choices=choices("backend"))
    r.add_argument("--dense-budget-bytes", type=int, default=None, help="for --method auto")
    r.add_argument("--cg-max-iterations", type=int, default=None)
    r.add_argument("--cg-tolerance", type=float, default=None)
    r.add_argument("--trust-radius", type=float, default=None)
    r.add_argument("--curvature-fraction", type=float, default=None)
    r.add_argument(
        "--gradient-fraction", type=float, default=None, help="Hessian-free mini-batch gradient"
    )
    r.add_argument("--hvp-mode", default=None, choices=choices("hvp_mode"))
    r.add_argument("--max-iterations", type=int, default=None, help="default: 100")
    r.add_argument("--gradient-tolerance", type=float, default=None)
    r.add_argument("--function-tolerance", type=float, default=None)
    r.add_argument("--parameter-tolerance", type=float, default=None)
    r.add_argument("--name", default="", help="a label shown by `hessian runs`")
    r.add_argument("--detach", action="store_true", help="print the run id and return")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    cv = command("curvature", "eigenvalue extremes, trace and verdict (minimum/saddle/...)")
    _problem_args(cv)
    cv.add_argument("--params", required=True, help=".npy of the parameters to analyse")
    cv.add_argument("--top-k", type=int, default=None)
    cv.add_argument("--bottom-k", type=int, default=None)
    cv.add_argument("--block-size", type=int, default=None, help="Lanczos block size")
    cv.add_argument("--curvature", default=None, choices=choices("curvature"))
    cv.add_argument("--backend", default=None, choices=choices("backend"))
    cv.add_argument("--trace-samples", type=int, default=None, help="0: no trace")
    cv.add_argument("--density-probes", type=int, default=None, help="0: no density")
    cv.add_argument("--seed", type=int, default=None, help="the probes' seed")
    w = command("watch", "print a run's records as they come (Ctrl-C cancels the run)")
    w.add_argument("run_id")
    w.add_argument("--from", dest="from_iteration", type=int, default=0)
    w.add_argument("--progress", action="store_true", help="a progress bar instead of lines")
    w.add_argument("--detach", action="store_true", help="Ctrl-C leaves the run running")
    ls = command("runs", "list runs, newest first")
    ls.add_argument("--status", action="append", choices=STATUSES, type=_status_word,
                    help="filter (repeatable; any case)")  # fmt: skip
    ls.add_argument("--limit", type=_positive_int, default=50)
    c = command("cancel", "stop a run before its next iteration")
    c.add_argument("run_id")
    rs = command("resume", "continue an INTERRUPTED run (Ctrl-C cancels it)")
    rs.add_argument("run_id")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.add_argument("--detach", action="store_true", help="Ctrl-C leaves the run running")
    dp = command(
        "delete-problem",
        "delete a stored problem no queued, running or interrupted run of yours uses",
    )
    dp.add_argument("problem_id")
    command("seed", "the seed notebook's GD-vs-Newton table, on the server")
    rec = command("records", "export a run's records (waits for its end)")
    rec.add_argument("run_id")
    rec.add_argument("--format", default="csv", choices=FORMATS, help="parquet needs pyarrow")
    rec.add_argument("-o", "--output", default=None, help="file (default: stdout)")
    rec.add_argument("--from", dest="from_iteration", type=int, default=0)
    pl = command("plot", "convergence curves of runs on a log scale (needs matplotlib)")
    pl.add_argument("run_ids", nargs="+")
    pl.add_argument(
        "--y",
        default="loss",
        choices=PLOT_Y,
        help="loss_gap: loss - the lowest loss of the runs plotted",
    )
    pl.add_argument("-o", "--output", default="losses.png")
    comp = command("completion", "print the shell completion script (needs argcomplete)")
    comp.add_argument("shell", nargs="?", default="bash", choices=("bash", "zsh", "fish"))
    for action in (a for sp in [p, *sub.choices.values()] for a in sp._actions):
        if action.help is None:  # every option says what it is, its choices and default
            action.help = action.dest.replace("_", " ")
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
    "records": cmd_records,
    "plot": cmd_plot,
    "completion": cmd_completion,
}


def _one_line_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    """Warnings (e.g. a client/server API version mismatch) as one line on stderr."""
    print(f"hessian: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one-line errors, exit 2 usage, 1 server, 130 interrupted."""
    p = parser()
    with contextlib.suppress(ImportError):
        import argcomplete

        argcomplete.autocomplete(p)
    args = p.parse_args(argv)
    address_problem = _check_address(args.address)
    if address_problem is not None:
        p.error(f"--address (or HESSIAN_ADDRESS): {address_problem}")
    try:
        with (
            warnings.catch_warnings(),
            Client(
                args.address, token=args.token, timeout=args.timeout, ca_file=args.ca_file
            ) as client,
        ):
            warnings.showwarning = _one_line_warning
            return COMMANDS[args.command](client, args)
    except UsageError as exc:
        print(f"hessian {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:  # the run's outcome, not a status code (it has none)
        reason = f" ({exc.info.stop_reason})" if exc.info.stop_reason else ""
        print(f"hessian {args.command}: error: FAILED{reason}: {exc.message}", file=sys.stderr)
        return EXIT_SERVER
    except HessianError as exc:
        print(f"hessian {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_SERVER if exc.from_server else EXIT_USAGE
    except BrokenPipeError:  # the reader went away (`hessian runs | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except OSError as exc:
        print(f"hessian {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"hessian {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
