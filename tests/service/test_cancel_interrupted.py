"""CancelRun of an INTERRUPTED run ends it CANCELLED: it will not be resumed, its records stay,
and its problem may then be deleted. Before, CancelRun answered OK and left it INTERRUPTED,
while DeleteProblem refused the problem telling the caller to cancel that very run."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import free_port, spawn_server, start_server, wait_until
from hessian_client import Client, FailedPrecondition, problems
from hessian_client.proto import service_pb2
from hessian_client.tensors import encode
from hessian_service.server.problems import problem_id
from optimize_stream import Stream

LONG = {"method": "gradient_descent", "learning_rate": 1e-4,
        "stopping": {"max_iterations": 1_000_000, "gradient_tolerance": 0.0}}  # fmt: skip


def test_an_interrupted_run_is_cancelled_for_good(tmp_path, rng):
    m = rng.standard_normal((6, 6))
    problem = problems.quadratic(m @ m.T + np.eye(6), rng.standard_normal(6))
    port = free_port()
    crashed = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            run = client.start_run(problem, np.zeros(6), **LONG)
            assert wait_until(lambda: client.get_run(run.id).num_records > 10)
    finally:
        crashed.send_signal(signal.SIGKILL)  # the next server finds the run INTERRUPTED
        crashed.wait(30)
    handle = start_server(tmp_path)
    try:
        with Client(handle.address) as client:
            interrupted = client.get_run(run.id)
            assert interrupted.status == "INTERRUPTED"
            cancelled = client.cancel_run(run.id)
            assert (cancelled.status, cancelled.stop_reason) == ("CANCELLED", "cancelled")
            assert cancelled.num_records == interrupted.num_records
            # a crash left no end time; the cancel is the run's end
            assert interrupted.finished_at is None and cancelled.finished_at is not None
            assert client.get_run(run.id).status == "CANCELLED"
            with pytest.raises(FailedPrecondition, match="is CANCELLED, not INTERRUPTED"):
                client.resume_run(run.id)
            assert client.delete_problem(problem_id(problem)) is True
            assert client.cancel_run(run.id).status == "CANCELLED"  # again: nothing changes
    finally:
        handle.stop()


def test_an_interrupted_optimize_run_is_cancelled_too(tmp_path):
    handle = start_server(tmp_path)
    try:
        start = service_pb2.OptimizeStart(
            initial_params=encode(np.array([-1.2, 1.0])),
            capabilities=service_pb2.Capabilities(gradient=True),
        )
        stream = Stream(handle.address, service_pb2.OptimizeRequest(start=start))
        run_id = stream.read().started.run_id
        stream.close()  # the caller goes away: INTERRUPTED
        with Client(handle.address) as client:
            assert wait_until(lambda: client.get_run(run_id).status == "INTERRUPTED")
            assert client.cancel_run(run_id).status == "CANCELLED"
        refused = Stream(handle.address, service_pb2.OptimizeRequest(resume_run_id=run_id))
        error = refused.refusal()
        assert error.details().endswith("is CANCELLED, not INTERRUPTED")
    finally:
        handle.stop()
