"""--run-processes: runs iterate in worker processes. Their records (all but the timings),
stop reasons and final parameters are bit-identical to runs iterated on server threads;
cancelling works; a worker killed mid-run ends its run INTERRUPTED and resumable to exactly
the uninterrupted records, on a fresh worker; a killed server takes its workers with it; and
engine errors cross the process boundary with their type, message and field."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import free_port, spawn_server, start_server, wait_until
from hessian_client import Client, problems, status_name
from hessian_service.engine import errors
from hessian_service.engine.cancel import Cancelled

TIMINGS = ("iteration_seconds", "cumulative_seconds")


def _records(run) -> list[bytes]:
    """A run's records as wire bytes without the timings (the rest is deterministic)."""
    out = []
    for record in run.stream():
        for name in TIMINGS:
            record.raw.ClearField(name)
        out.append(record.raw.SerializeToString())
    return out


def _problems(rng, rows: int, cols: int, classes: int, l2: float, dim: int) -> tuple:
    """Logistic and softmax regressions on fresh data, Rosenbrock and a start for it."""
    x = rng.standard_normal((rows, cols))
    y = (rng.random(rows) < 0.5).astype(float)
    logistic = problems.logistic_regression(x, y, l2=l2)
    labels = rng.integers(0, classes, rows)
    softmax = problems.softmax_regression(x, labels, num_classes=classes, l2=l2)
    return logistic, softmax, problems.rosenbrock(dim=dim), rng.standard_normal(dim)


def _cases(rng):
    """(problem, starting point, options) across methods, step policies and backends."""
    logistic, softmax, rosen, start = _problems(rng, 80, 4, 3, 1e-2, 5)
    stop = {"stopping": {"max_iterations": 60}}
    return [
        (logistic, np.zeros(5), {"method": "newton", **stop}),
        (logistic, np.zeros(5), {"method": "newton", "backend": "autograd", **stop}),
        (softmax, np.zeros((5, 3)), {"method": "newton_cg", **stop}),
        (rosen, start, {"method": "newton", "step_policy": "levenberg_marquardt", **stop}),
        (rosen, start, {"method": "newton_cg", "step_policy": "trust_region", **stop}),
        (rosen, start, {"method": "gradient_descent", "learning_rate": 1e-3, **stop}),
    ]


def test_runs_in_worker_processes_equal_runs_on_threads(tmp_path, rng):
    cases = _cases(rng)
    results = {}
    for processes in (False, True):
        handle = start_server(tmp_path / str(processes), run_processes=processes,
                              process_after_ms=0)  # fmt: skip
        results[processes] = _outcomes(handle, cases)
    for (_, _, *threads), (_, _, *processes) in zip(results[False], results[True], strict=True):
        assert len(threads[0]) > 1
        assert threads == processes


def _outcomes(handle, cases) -> list[tuple]:
    """Each case run on the server `handle` (stopped after): (run id, seconds it iterated,
    its records without timings, status, stop reason, message, final parameters' bytes)."""
    try:
        with Client(handle.address) as c:
            out = []
            for problem, x0, options in cases:
                run = c.start_run(problem, x0, **options)
                records = _records(run)
                info, final = run.info(), run.result().params
                span = info.last_record.cumulative_seconds
                out.append((run.id, span, records, info.status, info.stop_reason, info.message,
                            np.asarray(final).tobytes()))  # fmt: skip
            return out
    finally:
        handle.stop()


SLOW = {
    "method": "gradient_descent",
    "learning_rate": 1e-5,
    "stopping": {
        "max_iterations": 4000,
        "gradient_tolerance": 0.0,
        "function_tolerance": 0.0,
        "parameter_tolerance": 0.0,
    },
}


@pytest.mark.parametrize("after_ms", [0, 5], ids=["in-a-worker", "moved"])
def test_a_cancelled_run_in_a_worker_ends_on_its_last_record(tmp_path, rng, after_ms):
    handle = start_server(tmp_path, run_processes=True, process_after_ms=after_ms)
    try:
        with Client(handle.address) as c:
            endless = {**SLOW, "stopping": {**SLOW["stopping"], "max_iterations": 10**6}}
            run = c.start_run(problems.rosenbrock(dim=20), rng.standard_normal(20), **endless)
            for seen, _ in enumerate(run.stream(), 1):
                if seen == 300:
                    c.cancel_run(run.id)
            info = run.info()
            assert status_name(info) == "CANCELLED" and info.stop_reason == "cancelled"
            assert 300 <= info.num_records < 10**6
            # the final parameters are the point of the last record
            x = run.result().params
            rosen = np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
            np.testing.assert_allclose(rosen, info.last_record.loss, rtol=1e-14)
    finally:
        handle.stop()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _dead(pid: int) -> bool:
    """Gone, or a zombie: dead but not yet reaped by its new parent (init here may reap
    orphans only every few seconds)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("after_ms", [0, 5], ids=["in-a-worker", "moved"])
def test_a_killed_worker_interrupts_its_run_which_resumes_exactly(tmp_path, rng, after_ms):
    x0 = rng.standard_normal(30)
    handle = start_server(tmp_path, run_processes=True, checkpoint_every=100,
                          process_after_ms=after_ms)  # fmt: skip
    try:
        with Client(handle.address) as c:
            pid = c.create_problem(problems.rosenbrock(dim=30))
            whole = _records(c.start_run(pid, x0, **SLOW))
            run = c.start_run(pid, x0, **SLOW)
            stream = run.stream()
            for _ in range(250):
                next(stream)
            for child in _children(os.getpid()):
                os.kill(child, signal.SIGKILL)  # both workers: the busy one and the idle one
            assert wait_until(lambda: status_name(c.get_run(run.id)) == "INTERRUPTED")
            info = c.get_run(run.id)
            assert "worker process" in info.message and "killed by signal 9" in info.message
            assert 250 <= info.num_records < len(whole)
            c.resume_run(run.id)  # on a fresh worker (the idle one may not look dead yet)
            assert _records(c.run(run.id)) == whole
            # the idle worker died too: the next run gets a new one
            assert _records(c.start_run(pid, x0, **SLOW)) == whole
    finally:
        handle.stop()


@pytest.mark.slow
def test_a_killed_server_takes_its_workers_with_it_even_mid_iteration(tmp_path, rng):
    port = free_port()
    proc = spawn_server(tmp_path, port, "--run-processes", "--workers", "2",
                        "--process-after-ms", "0")  # fmt: skip
    try:
        children = _children(proc.pid)
        assert len(children) == 2
        x = rng.standard_normal((3000, 1500))
        y = (rng.random(3000) < 0.5).astype(float)
        with Client(f"127.0.0.1:{port}") as c:  # a dense autograd Newton step of seconds
            run = c.start_run(problems.logistic_regression(x, y, l2=1e-2), np.zeros(1501),
                              method="newton", step_policy="fixed", backend="autograd")  # fmt: skip
            assert wait_until(lambda: status_name(c.get_run(run.id)) == "RUNNING")
            assert c.get_run(run.id).num_records == 0
    finally:
        proc.kill()
        proc.wait(30)
    killed = time.monotonic()
    assert wait_until(lambda: all(_dead(c) for c in children), 30)
    assert time.monotonic() - killed < 2.0  # not at the end of the iteration


def test_children_keep_the_objectives_the_server_chooses(rng):
    import gc

    from hessian_service.engine import CancelToken, MethodOptions, StopCriteria
    from hessian_service.server.problems import objective_bytes
    from hessian_service.server.workers import WorkerPool

    small = [_logistic_objective(rng, 50, 3) for _ in range(5)]
    big = _logistic_objective(rng, 2000, 20)
    budget = objective_bytes(big) + 2 * objective_bytes(small[0])
    options = MethodOptions(method="newton")
    stopping = StopCriteria(max_iterations=3)

    def solo(objective) -> list[float]:
        from hessian_service.engine import Run

        x0 = torch.zeros(objective.num_params, dtype=torch.float64)
        return [r.loss for r in Run(objective, x0, options, stopping)]

    pool = WorkerPool(1, 100, cache_bytes=budget)
    try:
        (worker,) = pool._all

        def losses(objective) -> list[float]:
            assert pool.takes(objective)
            x0 = torch.zeros(objective.num_params, dtype=torch.float64)
            with pool.worker() as start:
                run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
                return [r.loss for r in run]

        keys = {}
        for objective in [*small, big]:
            assert losses(objective) == solo(objective)
            keys[id(objective)] = pool._keys[objective][0]
        # at most 4 objectives, within the budget (the big one and two small): the newest
        assert list(worker.held) == [keys[id(o)] for o in (small[3], small[4], big)]
        assert sum(worker.held.values()) <= budget
        # a problem the server lets go of leaves the child at its next run
        gone = keys[id(big)]
        del big, objective
        gc.collect()
        assert losses(small[4]) == solo(small[4])  # (one the child keeps)
        assert gone not in worker.held
        assert pool._dead == set()  # the server forgets the keys no child keeps
        # a run of an objective it let go of sends it again, and computes the same
        assert losses(small[0]) == solo(small[0])
        assert list(worker.held) == [keys[id(o)] for o in (small[3], small[4], small[0])]
        # many problems come and go: the dead keys stay as few as the child keeps
        for _ in range(12):
            passing = _logistic_objective(rng, 50, 3)
            assert losses(passing) == solo(passing)
            del passing
            gc.collect()
            assert len(pool._dead) <= 1 and pool._dead <= set(worker.held)
        assert losses(small[1]) == solo(small[1])
        assert pool._dead == set()
    finally:
        pool.close()


@pytest.mark.parametrize(
    "exc",
    [
        errors.ValidationError("options.damping", "a number >= 0", -1.0),
        errors.EvaluationError("problem.exported", "a finite loss", "nan"),
        errors.UnknownNameError("options.method", "newtn", ["newton", "gradient_descent"]),
        errors.ResourceLimitError("options.dense_budget_bytes", "too big"),
        errors.UnavailableError("options.backend", "no native extension"),
        Cancelled("deadline", "in CG"),
    ],
)
def test_engine_errors_cross_processes_whole(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and vars(back) == vars(exc)


def test_optimize_runs_stay_on_threads_under_run_processes(tmp_path, rng):
    from hessian_client import minimize

    m = rng.standard_normal((6, 6))
    a, b = m @ m.T + 6 * np.eye(6), rng.standard_normal(6)
    handle = start_server(tmp_path, run_processes=True)
    try:
        res = minimize(lambda x: 0.5 * x @ a @ x - b @ x, rng.standard_normal(6),
                       jac=lambda x: a @ x - b, hess=lambda x: a, method="newton",
                       address=handle.address)  # fmt: skip
        assert res.success
        np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-12)
    finally:
        handle.stop()


def _logistic_objective(rng, rows: int, cols: int):
    from hessian_service.engine import make_objective

    x = torch.from_numpy(rng.standard_normal((rows, cols)))
    y = torch.from_numpy((rng.random(rows) < 0.5).astype(float))
    return make_objective("logistic_regression", {"X": x, "y": y}, {"l2": 1e-2})


def test_a_record_of_a_slow_iteration_arrives_before_the_next_is_computed(rng):
    from hessian_service.engine import CancelToken, MethodOptions, StopCriteria
    from hessian_service.server.workers import WorkerPool

    objective = _logistic_objective(rng, 6000, 300)  # a dense Newton step of ~12 ms
    stopping = StopCriteria(max_iterations=12, gradient_tolerance=0.0, function_tolerance=0.0,
                            parameter_tolerance=0.0)  # fmt: skip
    pool = WorkerPool(1, 100)
    try:
        assert pool.takes(objective)
        with pool.worker() as start:
            run = start(objective, torch.zeros(301, dtype=torch.float64),
                        MethodOptions(method="newton", step_policy="fixed"), stopping,
                        cancel=CancelToken(), resume=None)  # fmt: skip
            arrivals, records = [], []
            for record in run:
                arrivals.append(time.perf_counter())
                records.append(record)
    finally:
        pool.close()
    # record k comes as soon as it exists, not with record k + 1 (a batch waits at most
    # BATCH_SECONDS, counted from the last send): each arrives about one iteration after
    # the one before (the last record, the stop, has no step)
    gaps = np.diff(arrivals)[:-1]
    spans = np.array([r.iteration_seconds for r in records[1:-1]])
    assert len(spans) == 11 and spans.min() > 0.006, spans
    assert np.mean(gaps < 0.25 * spans) < 0.2, (gaps, spans)


def _gradient_descent_case(rng, iterations: int) -> tuple:
    """(objective, options, stopping, x0): gradient descent on a small logistic regression."""
    from hessian_service.engine import MethodOptions, StopCriteria

    stopping = StopCriteria(max_iterations=iterations, gradient_tolerance=0.0,
                            function_tolerance=0.0, parameter_tolerance=0.0)  # fmt: skip
    options = MethodOptions(method="gradient_descent", learning_rate=1e-2)
    return _logistic_objective(rng, 200, 5), options, stopping, torch.zeros(6, dtype=torch.float64)


def test_a_child_that_died_idle_unseen_hands_its_run_to_a_fresh_one(rng):
    """A killed child's exit takes milliseconds to show (poll() still says running): a run
    sent to it then is lost before it begins, and goes to a fresh child instead of ending
    INTERRUPTED (the resumed run of the killed-worker test did, now and then)."""
    from hessian_service.engine import CancelToken, Run
    from hessian_service.server.workers import WorkerPool

    objective, options, stopping, x0 = _gradient_descent_case(rng, 50)
    pool = WorkerPool(1, 100)
    try:
        assert pool.takes(objective)
        (dead,) = pool._all
        os.kill(dead.process.pid, signal.SIGKILL)
        dead.process.wait(10)
        dead.process.poll = lambda: None  # its exit not visible yet
        with pool.worker() as start:
            run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            got = [r.loss for r in run]
        (fresh,) = pool._all
        assert fresh is not dead and fresh.process.poll() is None
    finally:
        pool.close()
    assert got == [r.loss for r in Run(objective, x0, options, stopping)]


def test_a_late_cancel_of_an_ended_run_does_not_touch_the_next(rng):
    from hessian_service.engine import CancelToken
    from hessian_service.server.workers import WorkerPool

    objective, options, stopping, x0 = _gradient_descent_case(rng, 300)
    pool = WorkerPool(1, 100)
    try:
        pool.takes(objective)
        with pool.worker() as start:
            first = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            whole = [r.loss for r in first]
            first._send_cancel()  # after its end: names a run that is over
            second = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            again = [r.loss for r in second]
    finally:
        pool.close()
    assert len(whole) == 301 and again == whole
    assert second.stop_reason == "max_iterations"


@pytest.mark.slow
def test_an_interrupt_stops_the_server_and_its_runs_resumably(tmp_path, rng):
    port = free_port()
    x0 = rng.standard_normal(30)
    proc = spawn_server(tmp_path, port, "--run-processes", "--grace-seconds", "5")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            pid = c.create_problem(problems.rosenbrock(dim=30))
            run = c.start_run(pid, x0, **SLOW)
            stream = run.stream()
            for _ in range(100):
                next(stream)
            children = _children(proc.pid)
            for pid_ in [proc.pid, *children]:  # as a terminal's Ctrl-C to its process group
                os.kill(pid_, signal.SIGINT)
            assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = spawn_server(tmp_path, port, "--run-processes")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED" and info.stop_reason == "shutdown"
            c.resume_run(run.id)
            resumed = _records(c.run(run.id))
            whole = _records(c.start_run(pid, x0, **SLOW))
            assert resumed == whole
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_worker_process_logs_as_the_server_does(capfd, log_format):
    """A child's log lines have the server's format and level (its start line here; an
    engine warning inside a run goes the same way): JSON lines stay parseable with
    --log-format json."""
    import json
    import re

    from hessian_service.server.workers import WorkerPool

    WorkerPool(1, 100, logs=(log_format, "INFO")).close()
    WorkerPool(1, 100, logs=(log_format, "WARNING")).close()  # its INFO line is not shown
    lines = [line for line in capfd.readouterr().err.splitlines() if "run worker" in line]
    assert len(lines) == 1, lines
    if log_format == "json":
        record = json.loads(lines[0])
        assert (record["level"], record["logger"]) == ("INFO", "hessian_service.server.workers")
        assert re.fullmatch(r"run worker process \d+ of server \d+ ready", record["msg"])
    else:
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d [\d:,]+ INFO hessian_service.server.workers: "
            r"run worker process \d+ of server \d+ ready",
            lines[0],
        ), lines


def _untimed(record) -> str:
    """A record without its timings, as its repr: every float exact, NaN equal to NaN."""
    import dataclasses

    return repr(dataclasses.replace(record, iteration_seconds=0.0, cumulative_seconds=0.0))


def _moved(caplog) -> dict[str, int]:
    """Run id -> the iteration it moved to a worker at, from the server's log lines."""
    import re

    out = {}
    for record in caplog.records:
        found = re.match(r"run (\S+) moved to worker process \d+ at iteration (\d+)", record.msg
                         % record.args)  # fmt: skip
        if found:
            out[found[1]] = int(found[2])
    return out


def _long_cases(rng):
    """(problem, starting point, options) whose runs last long enough to move: methods, step
    policies (their state: damping, trust radius, step size) and both backends."""
    logistic, softmax, rosen, start = _problems(rng, 400, 8, 4, 1e-4, 12)
    off = {"gradient_tolerance": 0.0, "function_tolerance": 0.0, "parameter_tolerance": 0.0}
    return [
        (rosen, start, {"method": "gradient_descent", "learning_rate": 1e-4,
                        "stopping": {"max_iterations": 600, **off}}),
        (rosen, start, {"method": "gradient_descent", "step_policy": "line_search",
                        "stopping": {"max_iterations": 300, **off}}),
        (rosen, start, {"method": "newton", "step_policy": "levenberg_marquardt",
                        "stopping": {"max_iterations": 200, "gradient_tolerance": 1e-10}}),
        (rosen, start, {"method": "newton_cg", "step_policy": "trust_region",
                        "stopping": {"max_iterations": 200, "gradient_tolerance": 1e-10}}),
        (logistic, np.zeros(9), {"method": "gradient_descent", "learning_rate": 0.5,
                                 "backend": "autograd",
                                 "stopping": {"max_iterations": 400, **off}}),
        (softmax, np.zeros((9, 4)), {"method": "newton_cg", "stopping": {"max_iterations": 100,
                                                                         **off}}),
        (softmax, np.zeros((9, 4)), {"method": "newton_cg", "curvature_fraction": 0.3,
                                     "gradient_fraction": 0.5, "curvature_seed": 7,
                                     "stopping": {"max_iterations": 150, **off}}),
    ]  # fmt: skip


@pytest.mark.parametrize("threads", [{}, {"intra_op_threads": 2, "single_thread_below": 0}],
                         ids=["policy", "two-threads"])  # fmt: skip
def test_a_run_moved_to_a_worker_midway_equals_a_run_on_a_thread(tmp_path, rng, caplog, threads):
    """With --process-after-ms a lone run starts on a server thread and moves to a worker
    from its checkpoint: its records (all but the timings), stop, message and final
    parameters are those of a run that stayed on its thread, bit for bit (torch's threads
    as the policy sets them on both sides, one or two)."""
    caplog.set_level(logging.INFO, logger="hessian_service.server.workers")
    cases = _long_cases(rng)
    results = {}
    for placement, kw in (("thread", {}), ("moved", {"run_processes": True,
                                                     "process_after_ms": 5})):  # fmt: skip
        results[placement] = _outcomes(start_server(tmp_path / placement, **kw, **threads), cases)
    moved = _moved(caplog)
    spans = [span for _, span, *_ in results["thread"]]
    for (_, span, *thread), (run_id, _, *elsewhere) in zip(*results.values(), strict=True):
        assert len(thread[0]) > 10
        assert thread == elsewhere
        if span > 0.05:  # ran 10 times the 5 ms it may iterate on its thread: it moved
            assert moved[run_id] < len(thread[0]) - 1, (run_id, moved)
    assert sum(s > 0.05 for s in spans) >= 4, spans  # the comparison covers moved runs
    assert sum(k > 0 for k in moved.values()) >= 2, moved  # some after a step on the thread


def test_a_moved_run_keeps_its_clock_and_time_limit(tmp_path, rng, caplog):
    """The worker goes on from the seconds the run spent on its thread: cumulative_seconds
    never go back, and the time limit counts the whole run."""
    caplog.set_level(logging.INFO, logger="hessian_service.server.workers")
    handle = start_server(tmp_path, run_processes=True, process_after_ms=150)
    try:
        with Client(handle.address) as c:
            endless = {**SLOW, "stopping": {**SLOW["stopping"], "max_iterations": 10**6,
                                            "time_limit_seconds": 0.4}}  # fmt: skip
            run = c.start_run(problems.rosenbrock(dim=20), rng.standard_normal(20), **endless)
            started = time.monotonic()
            seconds = [r.cumulative_seconds for r in run.stream()]
            took = time.monotonic() - started
            info = run.info()
    finally:
        handle.stop()
    assert info.stop_reason == "time_limit"
    assert run.id in _moved(caplog)
    assert all(b >= a for a, b in itertools.pairwise(seconds))
    assert 0.4 <= seconds[-1] < took


def test_a_run_starting_while_another_iterates_goes_to_a_worker_at_once(tmp_path, rng, caplog):
    """Only a lone run starts on a server thread; one that starts while another is live
    there would share its interpreter lock, and goes to a worker (records unchanged)."""
    caplog.set_level(logging.DEBUG, logger="hessian_service.server.runs")
    handle = start_server(tmp_path, run_processes=True, process_after_ms=60_000)
    try:
        with Client(handle.address) as c:
            pid = c.create_problem(problems.rosenbrock(dim=20))
            endless = {**SLOW, "stopping": {**SLOW["stopping"], "max_iterations": 10**6}}
            first = c.start_run(pid, rng.standard_normal(20), **endless)
            assert wait_until(lambda: c.get_run(first.id).num_records > 0)
            x0 = rng.standard_normal(20)
            second = c.start_run(pid, x0, **SLOW)
            records = _records(second)
            c.cancel_run(first.id)
            assert wait_until(lambda: handle.runs.live(first.id) is None)
            alone = _records(c.start_run(pid, x0, **SLOW))  # the first has ended: a thread
    finally:
        handle.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "hessian_service.server.runs"]
    assert f"run {first.id} starts on a server thread" in lines
    assert f"run {second.id} starts in a worker process" in lines
    assert sum("starts on a server thread" in line for line in lines) == 2
    assert records == alone


def test_a_moving_run_waits_for_an_idle_worker_and_stays_if_none_takes_it(rng, monkeypatch):
    """No idle worker: the run goes on on its thread and looks again later, and moves once
    one is idle; a worker that cannot take it (lost as the run begins, twice) leaves it on
    its thread for good. Its records are the engine Run's either way."""
    from hessian_service.engine import CancelToken, Run
    from hessian_service.server import workers
    from hessian_service.server.workers import WorkerPool

    objective, options, stopping, x0 = _gradient_descent_case(rng, 3000)
    whole = [_untimed(r) for r in Run(objective, x0, options, stopping)]
    pool = WorkerPool(1, 100)
    try:
        assert pool.takes(objective)
        with pool.moving(0.001, "r-waits") as start:
            run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            with pool.worker() as held:  # its only worker is busy
                assert held is not None
                first = [_untimed(next(run)) for _ in range(1500)]
                assert not run.moved
            rest = [_untimed(r) for r in run]  # idle again: the run moves
            assert run.moved and run.stop_reason == "max_iterations"

        def lost(self):
            raise self._worker.lose("died as its run began")

        monkeypatch.setattr(workers.ProcessRun, "begin", lost)
        with pool.moving(0.001, "r-stays") as start:
            run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            stayed = [_untimed(r) for r in run]
            assert not run.moved
        monkeypatch.undo()
        assert wait_until(lambda: pool._all[0].process.poll() is None and not pool._all[0].lost)
        with pool.worker() as start:  # the lost child's replacement
            run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
            again = [_untimed(r) for r in run]
    finally:
        pool.close()
    assert first + rest == whole
    assert stayed == whole and again == whole


def test_a_run_with_long_iterations_or_cancelled_stays_on_its_thread(rng):
    """A move repeats an iteration: a run whose iterations each take over a tenth of the
    time it has iterated stays on its thread, as does a cancelled one."""
    from hessian_service.engine import CancelToken, MethodOptions, StopCriteria
    from hessian_service.server.workers import WorkerPool

    objective = _logistic_objective(rng, 3000, 300)  # a dense Newton step of milliseconds
    stopping = StopCriteria(max_iterations=6, gradient_tolerance=0.0, function_tolerance=0.0,
                            parameter_tolerance=0.0)  # fmt: skip
    newton = MethodOptions(method="newton", step_policy="fixed")
    quick, gd, gd_stop, x0 = _gradient_descent_case(rng, 3000)
    pool = WorkerPool(1, 100)
    try:
        assert pool.takes(objective) and pool.takes(quick)
        with pool.moving(0.002, "r-long") as start:
            run = start(objective, torch.zeros(301, dtype=torch.float64), newton, stopping,
                        cancel=CancelToken(), resume=None)  # fmt: skip
            records = list(run)
            assert not run.moved
            # each step (the last record has none) took over a tenth of the run so far
            assert all(10 * r.iteration_seconds > r.cumulative_seconds for r in records[:-1])
        token = CancelToken()
        with pool.moving(0.001, "r-cancelled") as start:
            run = start(quick, x0, gd, gd_stop, cancel=token, resume=None)
            next(run)
            token.cancel()
            time.sleep(0.002)
            assert [r.iteration for r in run] == [1] and not run.moved
            assert run.stop_reason == "cancelled"
        with pool.moving(0.001, "r-short") as start:  # the same pool moves a quick run
            run = start(quick, x0, gd, gd_stop, cancel=CancelToken(), resume=None)
            assert sum(1 for _ in run) == 3001 and run.moved
    finally:
        pool.close()


@contextlib.contextmanager
def _one_child_pool(objective, sig: int):
    """A pool of one child, which takes `objective`, signalled `sig` (a killed one reaped):
    (pool, child); the pool is closed on exit."""
    from hessian_service.server.workers import WorkerPool

    pool = WorkerPool(1, 100)
    try:
        assert pool.takes(objective)
        (child,) = pool._all
        os.kill(child.process.pid, sig)
        if sig == signal.SIGKILL:
            child.process.wait(10)
        yield pool, child
    finally:
        pool.close()


def test_a_lost_child_is_replaced_without_a_run_that_waits_for_one(rng, caplog):
    """One worker, runs one at a time: a child killed while idle is found by the next moving
    run, which stays on its thread; a new child is spawned meanwhile (not only for a run
    that waits for one, which never comes), and the run after moves to it."""
    from hessian_service.engine import CancelToken, Run

    objective, options, stopping, x0 = _gradient_descent_case(rng, 3000)
    whole = [_untimed(r) for r in Run(objective, x0, options, stopping)]
    with _one_child_pool(objective, signal.SIGKILL) as (pool, dead):
        outcomes = []
        for name in ("r-finds-it-dead", "r-after"):
            with pool.moving(0.001, name) as start:
                run = start(objective, x0, options, stopping, cancel=CancelToken(), resume=None)
                outcomes.append(([_untimed(r) for r in run], run.moved))
            if name == "r-finds-it-dead":
                assert wait_until(lambda: pool._all[0] is not dead and pool._idle.qsize() == 1)
        (fresh,) = pool._all
        assert fresh.process.poll() is None and not fresh.lost
    assert outcomes == [(whole, False), (whole, True)]
    assert "was lost; a new one is starting" in caplog.text


def _in_thread(work, seconds: float):
    """Run `work()` on a thread; (finished within `seconds`, what it returned or raised)."""
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(_outcome(work)), daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive()), (out[0] if out else None)


def _outcome(work):
    try:
        return work()
    except Exception as exc:  # the test inspects it
        return exc


def test_a_stopped_child_holds_neither_a_run_nor_its_cancel(rng, monkeypatch):
    """A child that stops answering (SIGSTOP: wedged) is killed: one that has not built a
    moving run BEGIN_SECONDS after it was sent leaves the run on its thread, which ends as
    the engine Run does (an 8 MB objective, so the send itself blocks on the full socket);
    one whose run was cancelled and that has not ended it CANCEL_SECONDS later ends the run
    with WorkerLost (the server's RunManager then stores it CANCELLED)."""
    import dataclasses

    from hessian_service.engine import CancelToken, MethodOptions, Run, StopCriteria
    from hessian_service.server import workers
    from hessian_service.server.workers import WorkerLost

    monkeypatch.setattr(workers, "BEGIN_SECONDS", 0.5)
    monkeypatch.setattr(workers, "CANCEL_SECONDS", 0.5)
    large = _logistic_objective(rng, 20_000, 50)  # 8 MB of data
    gd = MethodOptions(method="gradient_descent", learning_rate=1e-2)
    stopping = StopCriteria(max_iterations=200, gradient_tolerance=0.0, function_tolerance=0.0,
                            parameter_tolerance=0.0)  # fmt: skip
    x0 = torch.zeros(51, dtype=torch.float64)
    whole = [_untimed(r) for r in Run(large, x0, gd, stopping)]
    with _one_child_pool(large, signal.SIGSTOP) as (pool, stopped):
        with pool.moving(0.001, "r-stopped-child") as start:
            run = start(large, x0, gd, stopping, cancel=CancelToken(), resume=None)
            done, records = _in_thread(lambda: [_untimed(r) for r in run], 60)
            assert done and records == whole and not run.moved
        assert wait_until(lambda: pool._all[0] is not stopped and pool._idle.qsize() == 1)
        assert stopped.process.poll() is not None  # killed
        objective, options, _, small_x0 = _gradient_descent_case(rng, 10)
        endless = dataclasses.replace(stopping, max_iterations=10**7)
        token = CancelToken()
        assert pool.takes(objective)
        with pool.worker() as start:
            run = start(objective, small_x0, options, endless, cancel=token, resume=None)
            next(run)
            (child,) = pool._all
            os.kill(child.process.pid, signal.SIGSTOP)
            token.cancel()
            done, ended = _in_thread(lambda: list(run), 20)
            assert done and isinstance(ended, WorkerLost), ended
            assert "did not answer in time and was killed" in str(ended)
        assert wait_until(lambda: child.process.poll() is not None, 10)
