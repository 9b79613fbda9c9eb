"""A replica drained with SIGTERM-style shutdown hands its runs over on a shared PostgreSQL
store: another replica continues each from the checkpoint written at the stop, under the
same id, and the records equal an uninterrupted run's (instead of an INTERRUPTED run
waiting for ResumeRun)."""

from __future__ import annotations

import time

import pytest
from conftest import start_server
from hessian_client import Client, status_name
from long_runs import long_run_problem, long_run_spec
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

SPEC = long_run_spec(5000)


@pytest.mark.slow
def test_a_draining_replica_hands_its_run_over(tmp_path, postgres_dsn):
    common = {"store": postgres_dsn, "lease_seconds": 4.0, "commit_interval_ms": 20}
    a = start_server(tmp_path / "a", replica_id="a", **common)
    b = start_server(tmp_path / "b", replica_id="b", **common)
    try:
        with Client(a.address) as ca:
            run_id = ca.start_run(long_run_problem(11), **SPEC).id
        deadline = time.monotonic() + 60  # guards a hang only
        while a.store.get_run(run_id).num_records < 100:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        a.stop()
        with Client(b.address) as cb:
            info = cb.run(run_id).wait(120)
            assert status_name(info) == "FINISHED", info
            assert run_id in b.leases.takeovers
            served = [(r.iteration, r.loss) for r in cb.run(run_id).stream()]
            reference = cb.start_run(long_run_problem(11), **SPEC)
            assert status_name(reference.wait(120)) == "FINISHED"
            assert served == [(r.iteration, r.loss) for r in cb.run(reference.id).stream()]
    finally:
        b.stop()
        a.stop()
