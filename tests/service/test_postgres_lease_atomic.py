"""A run's row becomes active (StartRun's insert, ResumeRun's INTERRUPTED -> QUEUED) in the
same transaction as its lease. They were two: a lease write that failed (a lock timeout, a
severed connection, a kill between them) left a QUEUED run with no lease, which no replica
would take over, nor cancel, resume or delete; and a replica starting between the two
marked another replica's fresh run INTERRUPTED. Real PostgreSQL, real servers."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest
from conftest import start_server
from hessian_client import Client, Unavailable, problems, status_name
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

SHORT = {"method": "newton", "stopping": {"max_iterations": 30}}


def _runs(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT run_id, status FROM runs ORDER BY created_at").fetchall()


def _locked_leases(dsn: str, mode: str) -> psycopg.Connection:
    """A session holding `LOCK TABLE leases IN <mode> MODE` until it is closed."""
    conn = psycopg.connect(dsn)
    conn.execute(f"LOCK TABLE leases IN {mode} MODE")
    return conn


def test_a_start_or_resume_whose_lease_cannot_be_written_leaves_nothing_active(
    tmp_path, postgres_dsn
):
    handle = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", lease_seconds=2.0)
    try:
        with Client(handle.address, timeout=60) as client:
            problem = problems.rosenbrock(dim=2)
            done = client.start_run(problem, np.array([-1.2, 1.0]), **SHORT)
            assert status_name(done.wait(60)) == "FINISHED"
            lock = _locked_leases(postgres_dsn, "ACCESS EXCLUSIVE")
            try:
                with pytest.raises(Unavailable, match="lock timeout"):
                    client.start_run(problem, np.array([0.5, 0.5]), **SHORT)
                assert _runs(postgres_dsn) == [(done.id, "FINISHED")]  # no QUEUED leftover
                with psycopg.connect(postgres_dsn) as conn:  # a resumable run, as if stopped
                    conn.execute(
                        "UPDATE runs SET status = 'INTERRUPTED' WHERE run_id = %s", (done.id,)
                    )
                with pytest.raises(Unavailable, match="lock timeout"):
                    client.resume_run(done.id)
                assert _runs(postgres_dsn) == [(done.id, "INTERRUPTED")]  # still resumable
            finally:
                lock.close()
            assert status_name(client.resume_run(done.id).wait(60)) == "FINISHED"
            again = client.start_run(problem, np.array([0.5, 0.5]), **SHORT)
            assert status_name(again.wait(60)) == "FINISHED"
    finally:
        handle.stop()


def test_a_replica_starting_meanwhile_does_not_interrupt_a_run_being_started(
    tmp_path, postgres_dsn
):
    # T = 20 s: the starting replica's session waits up to T/4 for the lock held here
    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", lease_seconds=20.0)
    started: list = []
    try:
        with Client(a.address, timeout=60) as client:
            lock = _locked_leases(postgres_dsn, "SHARE")  # reads go on; the lease insert waits
            try:
                thread = threading.Thread(
                    target=lambda: started.append(
                        client.start_run(problems.rosenbrock(dim=2), np.zeros(2), **SHORT)
                    )
                )
                thread.start()
                time.sleep(1.0)  # StartRun is waiting on its lease
                b = start_server(tmp_path / "b", store=postgres_dsn, replica_id="b")
                b.stop()
                assert _runs(postgres_dsn) == []  # b saw no lease-less run to interrupt
            finally:
                lock.close()
            thread.join(60)
            (run,) = started
            info = client.run(run.id).wait(60)
        assert status_name(info) == "FINISHED" and info.converged
        assert _runs(postgres_dsn) == [(run.id, "FINISHED")]
    finally:
        a.stop()
