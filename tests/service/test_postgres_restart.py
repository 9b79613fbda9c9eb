"""PostgreSQL restarted under running runs: the replicas reconnect, and every run ends
FINISHED (continued, by its replica or taken over) or INTERRUPTED and resumable; none is
lost, none has a gap or a duplicate, and after ResumeRun every run's records equal an
uninterrupted run's."""

from __future__ import annotations

import time

import pytest
from conftest import start_server
from hessian_client import Client, status_name
from long_runs import long_run_problem, long_run_spec
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

SPEC = long_run_spec(3000)
RUNS = 4


@pytest.mark.slow
def test_postgres_restart_mid_run_loses_nothing_and_runs_twice_nothing(
    tmp_path, postgres_server, postgres_dsn
):
    common = {"store": postgres_dsn, "lease_seconds": 4.0, "checkpoint_every": 50,
              "commit_interval_ms": 20, "workers": 2}  # fmt: skip
    replicas = [start_server(tmp_path / n, replica_id=n, **common) for n in ("a", "b")]
    try:
        ids = []
        for i in range(RUNS):
            with Client(replicas[i % 2].address) as c:
                ids.append(c.start_run(long_run_problem(9), **SPEC).id)
        store = replicas[0].store
        deadline = time.monotonic() + 60  # guards a hang only
        while min(store.get_run(r).num_records for r in ids) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        postgres_server.stop("fast")
        postgres_server.start()
        deadline = time.monotonic() + 120  # guards a hang only
        with Client(replicas[1].address) as c:
            while True:
                statuses = {r: status_name(c.get_run(r)) for r in ids}
                ended = all(s in ("FINISHED", "INTERRUPTED") for s in statuses.values())
                if ended and not any(rep.runs.live(r) for rep in replicas for r in ids):
                    break
                assert time.monotonic() < deadline, statuses
                time.sleep(0.05)
            for run_id, status in statuses.items():
                if status == "INTERRUPTED":
                    c.resume_run(run_id)
            reference = c.start_run(long_run_problem(9), **SPEC)
            assert status_name(reference.wait(120)) == "FINISHED"
            expected = [(r.iteration, r.loss) for r in c.run(reference.id).stream()]
            for run_id in ids:
                info = c.run(run_id).wait(120)
                assert status_name(info) == "FINISHED", (run_id, info)
                served = [(r.iteration, r.loss) for r in c.run(run_id).stream()]
                assert served == expected, run_id
                assert info.num_records == len(expected), run_id
        print("after the restart:", sorted(str(s) for s in statuses.values()))
    finally:
        for rep in replicas:
            rep.stop()
