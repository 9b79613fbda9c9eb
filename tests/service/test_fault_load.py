"""Load: 64 concurrent watchers across 16 runs, joining at different times and from different
iterations, each receive every record exactly once, identical to what the store serves."""

from __future__ import annotations

import random
import threading

import numpy as np
from conftest import start_server
from hessian_client import Client, problems, status_name

RUNS = 16
WATCHERS_PER_RUN = 4
ITERATIONS = 400


def test_64_watchers_across_16_runs_lose_no_record(tmp_path):
    # Every open stream holds a server thread: room for the 64 watchers and the other calls.
    handle = start_server(tmp_path, rpc_threads=96, commit_interval_ms=20)
    rng = random.Random(7)
    results: dict[tuple[str, int], tuple[int, list[tuple[int, float]]]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    try:
        with Client(handle.address) as c:
            runs = [
                c.start_run(
                    problems.rosenbrock(dim=2 + i % 3),
                    np.zeros(2 + i % 3),
                    method="gradient_descent",
                    learning_rate=1e-4,
                    stopping={"max_iterations": ITERATIONS},
                )
                for i in range(RUNS)
            ]

            def watch(run_id: str, slot: int, start: int) -> None:
                try:
                    with Client(handle.address) as own:
                        got = [(r.iteration, r.loss) for r in own.run(run_id).stream(start)]
                    with lock:
                        results[(run_id, slot)] = (start, got)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = []
            for slot in range(WATCHERS_PER_RUN):
                for run in runs:
                    start = 0 if slot < 2 else rng.randrange(ITERATIONS // 2)
                    threads.append(threading.Thread(target=watch, args=(run.id, slot, start)))
            for i, t in enumerate(threads):
                t.start()
                if i % 16 == 15:
                    threading.Event().wait(0.05)  # later watchers join runs already under way
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert len(results) == RUNS * WATCHERS_PER_RUN == 64
            for run in runs:
                stored = [(r.iteration, r.loss) for r in c.run(run.id).stream()]
                assert status_name(c.get_run(run.id)) == "FINISHED"
                assert [it for it, _ in stored] == list(range(ITERATIONS + 1))
                for slot in range(WATCHERS_PER_RUN):
                    start, got = results[(run.id, slot)]
                    assert got == stored[start:], (run.id, slot, start)
    finally:
        handle.stop(grace=1.0)
