"""A replica cut off from PostgreSQL (its connections severed, new ones refused): it stops
executing its run before another replica takes the lease, the other replica continues the run
from its last checkpoint under the same id, and the records equal an uninterrupted run's."""

from __future__ import annotations

import time

import pytest
from conftest import start_server
from hessian_client import Client, status_name
from long_runs import long_run_problem, long_run_spec
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
from tcp_proxy import TcpProxy

SPEC = long_run_spec(6000)


@pytest.mark.slow
def test_a_partitioned_replica_stops_before_its_run_is_taken_over(tmp_path, postgres_dsn):
    port = postgres_dsn.rsplit(":", 1)[1].split("/")[0]
    proxy = TcpProxy(f"127.0.0.1:{port}")
    cut_dsn = postgres_dsn.replace(f":{port}/", f":{proxy.address.rsplit(':', 1)[1]}/")
    common = {"lease_seconds": 4.0, "checkpoint_every": 50, "commit_interval_ms": 20}
    a = start_server(tmp_path / "a", store=cut_dsn, replica_id="a", **common)
    b = start_server(tmp_path / "b", store=postgres_dsn, replica_id="b", **common)
    try:
        with Client(a.address) as ca:
            run_id = ca.start_run(long_run_problem(5), **SPEC).id
        deadline = time.monotonic() + 60  # guards a hang only
        while (a.store.get_run(run_id).num_records < 200) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.runs.live(run_id) is not None, "the run should still be executing on a"
        proxy.close()  # a's connections severed, new ones refused
        deadline = time.monotonic() + 60  # guards a hang only; the bound is ~1.25 lease
        while b.runs.live(run_id) is None and time.monotonic() < deadline:
            if status_name(_info(b, run_id)) == "FINISHED":
                break
            time.sleep(0.005)
        # exactly one executes: when b holds the run, a has already stopped executing it
        # (a stops by ~0.75 of the lease, b can take it at 1.0: see server/failover.py)
        assert a.runs.live(run_id) is None
        assert run_id in b.leases.takeovers
        with Client(b.address) as cb:
            info = cb.run(run_id).wait(120)
            assert status_name(info) == "FINISHED"
            served = [(r.iteration, r.loss) for r in cb.run(run_id).stream()]
            reference = cb.start_run(long_run_problem(5), **SPEC)
            assert status_name(reference.wait(120)) == "FINISHED"
            expected = [(r.iteration, r.loss) for r in cb.run(reference.id).stream()]
        assert served == expected and info.num_records == len(expected)
    finally:
        b.stop()
        a.stop()
        proxy.close()


def _info(handle, run_id):
    with Client(handle.address) as c:
        return c.get_run(run_id)
