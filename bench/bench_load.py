"""Speed under load: a noisy neighbour, concurrent clients, the run loop's own cost, whole jobs.

Every table times its peers in the same run, interleaved round by round, and reports medians;
each verdict is computed from the numbers printed next to it. The load average before and
after says how busy the machine was. HESSIAN_BENCH_QUICK=1 runs a few-second smoke version.
"""

from __future__ import annotations

import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from common import format_seconds, markdown_table

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TITLE = "Speed under load: noisy neighbour, concurrency, run-loop cost, whole jobs"
QUICK = os.environ.get("HESSIAN_BENCH_QUICK", "") not in ("", "0")
NOISY_TARGET = 2.0
CONCURRENCY_TARGET = 1.2
TAIL_TARGET = 3.0
LOOP_TARGETS = {"in process": 1.1, "through the service": 1.3}
JOB_TARGET = 1.5
GD_ITERATIONS = 2_000
GD_LR = 1e-4


def _progress(message: str) -> None:
    print(f"[bench load] {message}", file=sys.stderr, flush=True)


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


@contextmanager
def burner() -> Iterator[None]:
    """A second process per usable CPU spinning in pure Python until the block ends."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    try:
        time.sleep(0.2)  # let them reach the run queue
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _per_call(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call of `fn`, looping until `min_time` has passed (after one warm call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def _verdict(ok: bool, target: str, measured: str) -> str:
    return f"target {target}: **{'met' if ok else 'missed'}** ({measured})"


# ---------------------------------------------------------------- 1. noisy neighbour


def noisy_neighbour() -> str:
    """Each catalogue row's engine step, quiet and next to a burner, with torch's default
    thread count and with the server's thread policy, quiet and loaded rounds alternating."""
    from bench_native import _problems
    from hessian_service.engine import MethodOptions, take_step
    from hessian_service.server import ServerConfig
    from hessian_service.server.threads import thread_policy

    policy = thread_policy(ServerConfig())
    default_threads = torch.get_num_threads()
    rows = _problems()
    if QUICK:
        rows = [r for r in rows if r[1].num_params <= 201 and "n=1600" not in r[0]][:5]
    options = MethodOptions(method="newton", learning_rate=1.0, step_policy="fixed")
    rounds = 1 if QUICK else 3
    min_time = 0.05 if QUICK else 0.3
    samples: dict[tuple[str, str, bool], list[float]] = {}

    def measure(loaded: bool) -> None:
        for name, objective, x in rows:
            for label, threads in (
                ("default", default_threads),
                ("policy", policy.threads_for(objective)),
            ):
                torch.set_num_threads(threads)
                t = _per_call(lambda o=objective, p=x: take_step(o, p, options), min_time)
                samples.setdefault((name, label, loaded), []).append(t)
        torch.set_num_threads(default_threads)

    for r in range(rounds):
        _progress(f"noisy neighbour round {r + 1}/{rounds}")
        measure(False)
        with burner():
            measure(True)
    table, worst = [], 0.0
    for name, objective, _ in rows:
        med = {k[1:]: statistics.median(v) for k, v in samples.items() if k[0] == name}
        ratio_default = med[("default", True)] / med[("default", False)]
        ratio_policy = med[("policy", True)] / med[("policy", False)]
        worst = max(worst, ratio_policy)
        table.append(
            [
                name,
                format_seconds(med[("default", False)]),
                format_seconds(med[("default", True)]),
                f"{ratio_default:.1f}x",
                str(policy.threads_for(objective)),
                format_seconds(med[("policy", False)]),
                format_seconds(med[("policy", True)]),
                f"{ratio_policy:.2f}x",
            ]
        )
    header = [
        "problem (Newton step, engine)",
        f"quiet, {default_threads} threads",
        "loaded",
        "ratio",
        "policy threads",
        "quiet, policy",
        "loaded, policy",
        "ratio",
    ]
    verdict = _verdict(
        worst <= NOISY_TARGET, f"loaded <= {NOISY_TARGET}x quiet (policy)", f"worst {worst:.2f}x"
    )
    return (
        f"During the loaded rounds {len(os.sched_getaffinity(0))} pure-Python processes (one "
        f"per usable CPU) spin. The policy is the server's default "
        f"(`{policy.cpus}` usable CPUs / 2 workers = {policy.threads} threads, one thread "
        f"below size {policy.single_thread_below}). Medians of {rounds} rounds.\n\n"
        f"{markdown_table(header, table)}\n\n{verdict}."
    )


# ---------------------------------------------------------------- a server subprocess


@contextmanager
def server(*flags: str) -> Iterator[str]:
    """A `hessian-server` subprocess on a free loopback port; yields its address."""
    sys.path.insert(0, str(HERE))
    from bench_service import _free_port, _spawn, _wait_ready

    address = f"127.0.0.1:{_free_port()}"
    data = tempfile.mkdtemp(prefix="bench-load-")
    proc = _spawn(
        ["-m", "hessian_service.server", "--address", address, "--data-dir", data, *flags]
    )
    try:
        _wait_ready(address, proc)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


def _breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    return StandardScaler().fit_transform(data.data), data.target.astype(np.float64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16.0, data.target.astype(np.int64)


# ---------------------------------------------------------------- 2. concurrency


def _clients(n: int, seconds: float, call: Callable[[], object]) -> tuple[float, list[float]]:
    """`n` threads calling `call` back to back for `seconds`: calls/s and every latency."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    start_gate = threading.Barrier(n + 1)
    deadline = [0.0]

    def worker(mine: list[float]) -> None:
        start_gate.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(latencies[i],)) for i in range(n)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start_gate.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    flat = [x for lat in latencies for x in lat]
    return len(flat) / wall, flat


PROCESSES = "--run-processes"  # runs iterate in worker processes (a lone one moves there)
IN_WORKERS = (PROCESSES, "--process-after-ms", "0")  # every run starts in a worker process


def _concurrency_rounds(
    flags: tuple[str, ...], calls: dict[str, Callable[[Any], None]], counts, seconds, rounds
) -> dict[tuple[str, int], list[tuple[float, list[float]]]]:
    """Every call at every client count, `rounds` times, against one server with `flags`."""
    from hessian_client import Client

    results: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    with (
        server("--max-concurrent-runs", "256", *flags) as address,
        Client(address, timeout=120) as client,
    ):
        bound = {name: (lambda call=call: call(client)) for name, call in calls.items()}
        for r in range(rounds):
            for n in counts:
                _progress(f"concurrency {' '.join(flags) or 'default'}, round {r + 1}, {n}")
                for name, call in bound.items():
                    results.setdefault((name, n), []).append(_clients(n, seconds, call))
    return results


def concurrency() -> str:
    """N clients of NewtonStep (logistic, breast cancer, n = 31) and of StartRun + WatchRun,
    against the default server and, for the runs, one with --run-processes."""
    from hessian_client import problems

    x, y = _breast_cancer()
    counts = (1, 4, 16) if QUICK else (1, 4, 16, 64)
    seconds = 1.0 if QUICK else 4.0
    rounds = 1 if QUICK else 3
    problem = problems.logistic_regression(x, y, l2=1e-3)
    w0 = np.zeros(x.shape[1] + 1)
    pids: dict[int, str] = {}

    def pid(client) -> str:
        return pids.setdefault(id(client), client.create_problem(problem))

    def step(client) -> None:
        client.newton_step(pid(client), w0, method="newton", step_policy="fixed")

    def job(client, watch: bool = False) -> None:
        run = client.start_run(pid(client), w0, method="newton", stopping={"max_iterations": 10},
                               watch=watch)  # fmt: skip
        for _ in run.stream():
            pass

    runs = {"StartRun + WatchRun": job, "StartAndWatchRun": lambda c: job(c, watch=True)}
    results = _concurrency_rounds((), {"NewtonStep": step, **runs}, counts, seconds, rounds)
    for flags in ((PROCESSES,), IN_WORKERS):
        for (name, n), samples in _concurrency_rounds(flags, runs, counts, seconds, rounds).items():
            results[(f"{name}, {' '.join(flags)}", n)] = samples
    table, verdicts = [], []
    for name in dict.fromkeys(name for name, _ in results):
        base = None
        for n in counts:
            throughput = statistics.median(t for t, _ in results[(name, n)])
            lat = sorted(x for _, lats in results[(name, n)] for x in lats)
            p50 = lat[len(lat) // 2]
            p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)]
            base = base or throughput
            table.append(
                [
                    name,
                    str(n),
                    f"{throughput:,.0f}/s",
                    f"{throughput / base:.2f}x",
                    format_seconds(p50),
                    format_seconds(p99),
                    f"{p99 / p50:.1f}",
                ]
            )
            if n == 16:
                verdicts.append(
                    f"{name}: "
                    + _verdict(
                        throughput >= CONCURRENCY_TARGET * base,
                        f"16 clients >= {CONCURRENCY_TARGET}x one",
                        f"{throughput / base:.2f}x",
                    )
                )
            verdicts.append(
                f"{name}, {n} clients: "
                + _verdict(
                    p99 <= TAIL_TARGET * p50, f"p99 <= {TAIL_TARGET}x p50", f"{p99 / p50:.1f}x"
                )
            )
    header = ["call", "clients", "throughput", "vs 1 client", "p50", "p99", "p99/p50"]
    return (
        f"Client threads in this process, the server (default flags, `--max-concurrent-runs "
        f"256`; the rows marked `{PROCESSES}` add that flag: runs iterate in `--workers` child "
        f"processes, except that a run starting while no other is live begins on a server "
        f"thread and moves to a child after `--process-after-ms` 20; with "
        f"`{' '.join(IN_WORKERS[1:])}` every run starts in a child) in another; each client "
        f"calls back to back for {seconds:g} s; throughput "
        f"is the median of {rounds} rounds, percentiles over all rounds' calls. A job is a "
        "10-iteration Newton run streamed to its end (StartAndWatchRun: on one call). Each "
        "row's ratio is against one client of the same server.\n\n"
        f"{markdown_table(header, table)}\n\n" + "\n".join(f"- {v}" for v in verdicts)
    )


# ---------------------------------------------------------------- 3. the run loop's cost


def _plain_gd(objective, x0: torch.Tensor, iterations: int) -> float:
    """The loop a user would write: loss, gradient, update, the loss as a float."""
    x = x0.clone()
    loss = math.nan
    for _ in range(iterations + 1):
        x.requires_grad_(True)
        value = objective.loss(x)
        (g,) = torch.autograd.grad(value, x)
        loss = float(value.detach())
        with torch.no_grad():
            x = x - GD_LR * g
    return loss


def run_loop() -> str:
    """2,000 GD iterations of Rosenbrock n = 25: plain torch, the engine's Run, the service."""
    from hessian_client import Client, problems
    from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective

    iterations = 200 if QUICK else GD_ITERATIONS
    rounds = 2 if QUICK else 7
    objective = make_objective("rosenbrock", {}, {"dim": 25})
    x0 = objective.init_params()
    stopping = {
        "max_iterations": iterations,
        "gradient_tolerance": 0.0,
        "function_tolerance": 0.0,
        "parameter_tolerance": 0.0,
    }
    options = MethodOptions(method="gradient_descent", learning_rate=GD_LR)
    samples: dict[str, list[float]] = {}
    served = "StartRun + WatchRun"
    with (
        server() as address,
        server(PROCESSES) as other,
        server(*IN_WORKERS) as third,
        Client(address, timeout=120) as client,
        Client(other, timeout=120) as processes,
        Client(third, timeout=120) as in_workers,
    ):

        def service(client: Client) -> Callable[[], None]:
            pid = client.create_problem(problems.rosenbrock(dim=25))

            def call() -> None:
                run = client.start_run(pid, x0.numpy(), method="gradient_descent",
                                       learning_rate=GD_LR, stopping=stopping)  # fmt: skip
                records = sum(1 for _ in run.stream())
                assert records == iterations + 1, records

            return call

        def plain() -> None:
            _plain_gd(objective, x0, iterations)

        def engine() -> None:
            records = sum(1 for _ in Run(objective, x0, options, StopCriteria(**stopping)))
            assert records == iterations + 1, records

        calls = {
            "plain torch loop": plain,
            "engine Run": engine,
            served: service(client),
            f"{served}, {PROCESSES}": service(processes),
            f"{served}, {' '.join(IN_WORKERS)}": service(in_workers),
        }
        for fn in calls.values():
            fn()
        for r in range(rounds):
            _progress(f"run loop round {r + 1}/{rounds}")
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                samples.setdefault(name, []).append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["plain torch loop"]
    table = [
        [name, format_seconds(t), f"{(iterations + 1) / t:,.0f}", f"{t / base:.2f}x"]
        for name, t in med.items()
    ]
    verdicts = [
        _verdict(
            med["engine Run"] / base <= LOOP_TARGETS["in process"],
            f"in process <= {LOOP_TARGETS['in process']}x",
            f"{med['engine Run'] / base:.3f}x",
        ),
    ] + [
        f"{name}: "
        + _verdict(
            med[name] / base <= LOOP_TARGETS["through the service"],
            f"through the service <= {LOOP_TARGETS['through the service']}x",
            f"{med[name] / base:.3f}x",
        )
        for name in (served, f"{served}, {PROCESSES}", f"{served}, {' '.join(IN_WORKERS)}")
    ]
    header = [f"{iterations:,} GD iterations, Rosenbrock n = 25", "median", "iterations/s", "ratio"]
    return (
        f"Medians of {rounds} interleaved rounds; the service rows are StartRun + streaming "
        f"every record (server subprocess, default flags; `{PROCESSES}`: the run starts on a "
        f"server thread and moves to a child process of the server after 20 ms; "
        f"`{' '.join(IN_WORKERS)}`: it iterates in a child from its start)."
        f"\n\n{markdown_table(header, table)}"
        "\n\n" + "\n".join(f"- {v}" for v in verdicts)
    )


# ---------------------------------------------------------------- 4. whole jobs


def whole_jobs() -> str:
    """CreateProblem + StartRun + streaming to the end against scikit-learn's newton-cholesky."""
    from hessian_client import Client, problems
    from sklearn.linear_model import LogisticRegression

    rounds = 5 if QUICK else 10  # a multiple of the 5 peers: every order equally often
    tol = 1e-8
    stopping = {
        "max_iterations": 100,
        "gradient_tolerance": tol,
        "function_tolerance": 0.0,
        "parameter_tolerance": 0.0,
    }
    cases = []
    x, y = _breast_cancer()
    n_rows = x.shape[0]
    # sklearn: C sum(loss) + 0.5 ||w||^2, i.e. mean(loss) + 0.5 l2 ||w||^2 with l2 = 1/(C N)
    cases.append(
        (
            "logistic, breast cancer (n = 31, N = 569)",
            problems.logistic_regression(x, y, l2=1.0 / n_rows),
            np.zeros(x.shape[1] + 1),
            lambda x=x, y=y: LogisticRegression(solver="newton-cholesky", C=1.0, tol=tol).fit(x, y),
        )
    )
    xd, labels = _digits()
    cases.append(
        (
            "softmax, digits (n = 650, N = 1797)",
            problems.softmax_regression(xd, labels, num_classes=10, l2=1.0 / xd.shape[0]),
            np.zeros((xd.shape[1] + 1, 10)),
            lambda: LogisticRegression(solver="newton-cholesky", C=1.0, tol=tol).fit(xd, labels),
        )
    )
    samples: dict[tuple[str, str], list[float]] = {}
    final: dict[tuple[str, str], float] = {}
    with (
        server() as address,
        server(PROCESSES) as other,
        Client(address, timeout=120) as client,
        Client(other, timeout=120) as processes,
    ):
        ways = {
            # the job: three calls
            "CreateProblem + StartRun + WatchRun": lambda p, w: client.start_run(
                client.create_problem(p), w, method="newton", stopping=stopping
            ),
            "CreateProblem + StartAndWatchRun": lambda p, w: client.start_run(
                client.create_problem(p), w, method="newton", stopping=stopping, watch=True
            ),
            "StartAndWatchRun, problem inline": lambda p, w: client.start_run(
                p, w, method="newton", stopping=stopping, watch=True
            ),
            f"StartAndWatchRun, problem inline, {PROCESSES}": lambda p, w: processes.start_run(
                p, w, method="newton", stopping=stopping, watch=True
            ),
        }

        def served(name: str, way: str, problem, w0) -> Callable[[], None]:
            def job() -> None:
                records = list(ways[way](problem, w0).stream())
                final[(name, way)] = records[-1].loss

            return job

        for name, problem, w0, fit in cases:
            # a case's peers in rounds of their own: a fit of the other case just before
            # (BLAS and OpenMP threads still spinning) would slow whichever call came next
            calls = [((name, way), served(name, way, problem, w0)) for way in ways]
            calls.append(((name, "sklearn"), fit))
            for _, fn in calls:  # warm-up, untimed
                fn()
            for r in range(rounds):
                _progress(f"whole jobs, {name}, round {r + 1}/{rounds}")
                # each round starts one call later: no peer always follows the same one
                for key, fn in calls[r % len(calls) :] + calls[: r % len(calls)]:
                    start = time.perf_counter()
                    fn()
                    samples.setdefault(key, []).append(time.perf_counter() - start)
    table, verdicts = [], []
    for name, *_ in cases:
        peer = statistics.median(samples[(name, "sklearn")])
        for way in ways:
            ours = statistics.median(samples[(name, way)])
            table.append(
                [
                    name,
                    way,
                    format_seconds(ours),
                    format_seconds(peer),
                    f"{ours / peer:.2f}x",
                    f"{final[(name, way)]:.10g}",
                ]
            )
            if name.startswith("logistic"):
                verdicts.append(
                    f"logistic, {way}: "
                    + _verdict(
                        ours / peer <= JOB_TARGET,
                        f"<= {JOB_TARGET}x scikit-learn",
                        f"{ours / peer:.2f}x",
                    )
                )
    header = [
        "job",
        "calls",
        "service (to the last record)",
        "scikit-learn fit",
        "ratio",
        "final loss",
    ]
    return (
        f"Medians of {rounds} interleaved rounds per case, after one untimed call of each peer "
        f"(each round starts one call later, so no call always follows the same one; a case's "
        f"rounds are not mixed with the other's); standardised breast-cancer features, digits / "
        f"16; both stop at max |gradient| <= {tol:g} (the same objective: l2 = 1/(C N), C = 1). "
        f"Newton from zeros, the server's default step policy. The issue's job is the three "
        f"calls; StartAndWatchRun starts the run and streams it on one call (`start_run(..., "
        f"watch=True)`), and a problem sent inline needs no CreateProblem. The `{PROCESSES}` "
        f"row is a server with that flag (the compose deployment's setting): a lone short run "
        f"stays on a server thread."
        f"\n\n{markdown_table(header, table)}\n\n" + "\n".join(f"- {v}" for v in verdicts)
    )


def run() -> str:
    """Measure and return the markdown section."""
    before = _load()
    parts = []
    for title, section in (
        ("Noisy neighbour", noisy_neighbour),
        ("Concurrent clients", concurrency),
        ("The run loop's own cost", run_loop),
        ("A whole job end to end", whole_jobs),
    ):
        _progress(title)
        parts.append(f"### {title}\n\n{section()}")
    after = _load()
    mode = " (HESSIAN_BENCH_QUICK: a smoke run, too short to judge)" if QUICK else ""
    return f"Load average (1/5/15 min) before: {before}; after: {after}{mode}.\n\n" + "\n\n".join(
        parts
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(run())
