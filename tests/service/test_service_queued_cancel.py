"""CancelRun on a run still QUEUED (every worker busy) ends it CANCELLED at once, with no
iteration computed: its watchers end, it can be deleted, it no longer counts against the
limits, its worker skips it later, and a restart keeps it CANCELLED (never resumable)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import occupy_workers, start_server, wait_until
from hessian_client import Client, FailedPrecondition, problems, status_name

LONG = {
    "method": "gradient_descent",
    "learning_rate": 1e-3,
    "stopping": {"max_iterations": 50, "gradient_tolerance": 0.0},
}


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_cancelling_a_queued_run_ends_it_at_once_and_for_good(tmp_path, rng, processes):
    x = rng.standard_normal((40, 3))
    y = (rng.random(40) < 0.5).astype(float)
    handle = start_server(tmp_path, max_runs_per_token=1, run_processes=processes)
    try:
        gate = occupy_workers(handle)
        with Client(handle.address) as c:
            pid = c.create_problem(problems.logistic_regression(x, y, l2=1e-2))
            queued = c.start_run(pid, np.zeros(4), **LONG)
            assert status_name(c.get_run(queued.id)) == "QUEUED"
            answer = c.cancel_run(queued.id)
            assert status_name(answer) == "CANCELLED"
            info = c.get_run(queued.id)
            assert status_name(info) == "CANCELLED" and info.num_records == 0
            assert info.stop_reason == "cancelled" and not info.converged
            assert list(queued.stream()) == []  # its watchers end at once
            # no longer live: the per-token limit of 1 admits another run right away
            second = c.start_run(pid, np.zeros(4), **LONG)
            gate.set()
            records = list(second.stream())
            assert len(records) == 51 and status_name(second.info()) == "FINISHED"
            # its worker skipped it: still no record, still CANCELLED
            assert wait_until(lambda: handle.runs.queue_depth() == 0)
            info = c.get_run(queued.id)
            assert status_name(info) == "CANCELLED" and info.num_records == 0
    finally:
        handle.stop()
    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as c:
            assert status_name(c.get_run(queued.id)) == "CANCELLED"
            with pytest.raises(FailedPrecondition):
                c.resume_run(queued.id)
            c.delete_run(queued.id)
    finally:
        handle.stop()


def test_a_resumed_run_cancelled_in_the_queue_does_not_say_no_iteration_ran(tmp_path):
    """Its records were there: "cancelled while queued: no iteration ran" was false."""
    from long_runs import ENDLESS

    spec = {"method": "gradient_descent", "learning_rate": 1e-9, "stopping": ENDLESS}
    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as c:
            run = c.start_run(problems.rosenbrock(dim=2), np.zeros(2), **spec)
            assert wait_until(lambda: c.get_run(run.id).num_records >= 20)
    finally:
        handle.stop()  # the run is stored INTERRUPTED
    handle = start_server(tmp_path)
    try:
        gate = occupy_workers(handle)
        try:
            with Client(handle.address) as c:
                kept = c.get_run(run.id).num_records
                c.resume_run(run.id)
                assert status_name(c.get_run(run.id)) == "QUEUED"
                info = c.cancel_run(run.id)
                assert status_name(info) == "CANCELLED" and info.num_records == kept
                assert info.message.startswith("cancelled while queued to continue from")
        finally:
            gate.set()
    finally:
        handle.stop()
