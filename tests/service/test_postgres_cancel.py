"""CancelRun sent to a replica that does not execute the run (round robin, a load balancer,
the CLI's Ctrl-C): the run stops all the same. Before, that replica answered RUNNING and
did nothing, so only a cancel that happened to reach the executing replica worked."""

from __future__ import annotations

import signal
import time

import numpy as np
from conftest import free_port, spawn_server
from hessian_client import Client, problems
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

LEASE_S = 2.0
GD = {"method": "gradient_descent", "learning_rate": 1e-4, "stopping": {"max_iterations": 10**6}}


def _settled(address: str, run_id: str) -> str:
    deadline = time.monotonic() + 30 * LEASE_S  # guards a hang only
    with Client(address) as c:
        while (status := c.get_run(run_id).status) in ("QUEUED", "RUNNING"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return status


def test_cancel_sent_to_another_replica_stops_the_run(tmp_path, postgres_dsn):
    ports = [free_port(), free_port()]
    a, b = (f"127.0.0.1:{p}" for p in ports)
    flags = ("--store", postgres_dsn, "--lease-seconds", str(LEASE_S), "--workers", "1")
    procs = [spawn_server(tmp_path / f"r{i}", p, *flags) for i, p in enumerate(ports)]
    try:
        with Client(a) as on_a, Client(b) as on_b:
            running = on_a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **GD)
            next(iter(running.stream()))
            queued = on_a.start_run(problems.rosenbrock(dim=2), np.zeros(2), **GD)
            assert on_b.get_run(queued.id).status == "QUEUED"  # A's only worker is busy
            # the queued one first: A's keeper takes requests at each renewal (T/8), and one
            # falling between the two cancels would free A's worker for the queued run
            for run in (queued, running):
                assert on_b.cancel_run(run.id).status in ("QUEUED", "RUNNING")
            assert _settled(b, running.id) == "CANCELLED"
            assert _settled(b, queued.id) == "CANCELLED"
            assert on_b.get_run(queued.id).num_records == 0  # never started
            stopped = on_b.get_run(running.id).num_records
            time.sleep(LEASE_S / 2)
            assert on_a.get_run(running.id).num_records == stopped  # it stays stopped
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
