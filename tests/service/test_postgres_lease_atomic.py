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


def test_a_run_another_replica_took_and_stopped_can_be_resumed_and_cancelled_here(
    tmp_path, postgres_dsn
):
    """Replica a loses a run's lease (another replica took it: a new generation), stops
    executing it; that replica then stops it INTERRUPTED. a kept its old fence, and every
    write a made for the run after (ResumeRun, CancelRun) was refused "no longer leased to
    this replica" (UNAVAILABLE), until a restarted."""
    from long_runs import ENDLESS

    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", lease_seconds=1.0)
    try:
        with Client(a.address, timeout=60) as client:
            spec = {"method": "gradient_descent", "learning_rate": 1e-9, "stopping": ENDLESS}
            runs = [client.start_run(problems.rosenbrock(dim=2), np.zeros(2), **spec)
                    for _ in range(2)]  # fmt: skip
            for run in runs:
                deadline = time.monotonic() + 60  # a hang guard
                while client.get_run(run.id).num_records < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
            with psycopg.connect(postgres_dsn) as conn:  # "replica x" takes both leases
                conn.execute("UPDATE leases SET holder = 'x', generation = generation + 1, "
                             "expires_at = now() + interval '1 hour'")  # fmt: skip
            deadline = time.monotonic() + 60
            while any(a.runs.live(r.id) for r in runs) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not any(a.runs.live(r.id) for r in runs)  # a stopped executing them
            with psycopg.connect(postgres_dsn) as conn:  # x stops them, resumable
                conn.execute("UPDATE runs SET status = 'INTERRUPTED'")
                conn.execute("DELETE FROM leases")
            resumed, cancelled = runs
            client.resume_run(resumed.id)
            assert status_name(client.cancel_run(resumed.id)) in ("CANCELLED", "RUNNING", "QUEUED")
            assert status_name(client.run(resumed.id).wait(60)) == "CANCELLED"
            assert status_name(client.cancel_run(cancelled.id)) == "CANCELLED"
    finally:
        a.stop()


def test_a_run_whose_end_could_not_be_stored_leaves_nothing_to_write_unfenced(
    tmp_path, postgres_dsn
):
    """The database goes away as a run stores its end: the run is abandoned (its lease
    lapses, another replica takes it over). Its records still queued here were never
    acknowledged; once its fence was dropped a later flush wrote them, unfenced, into the
    run another replica now held. They go with the fence."""
    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", lease_seconds=2.0,
                     commit_interval_ms=60_000)  # fmt: skip
    store = a.runs.store
    outage = {"on": False}
    connect, put_checkpoint = store._pool.connection, store.put_checkpoint

    def unreachable(*args, **kwargs):
        if outage["on"]:
            raise psycopg.OperationalError("the database is unreachable (the test's outage)")
        return connect(*args, **kwargs)

    def ending(run_id, checkpoint):  # the outage begins as the run stores its end
        outage["on"] = outage["on"] or checkpoint.iteration >= 30
        return put_checkpoint(run_id, checkpoint)

    store._pool.connection, store.put_checkpoint = unreachable, ending
    store.commit_every = 10_000
    try:
        with Client(a.address, timeout=60) as client:
            stopping = {"max_iterations": 30, "gradient_tolerance": 0.0}
            run = client.start_run(problems.rosenbrock(dim=2), np.zeros(2),
                                   method="gradient_descent", learning_rate=1e-9,
                                   stopping=stopping)  # fmt: skip
            deadline = time.monotonic() + 60  # a hang guard
            while a.runs.live(run.id) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
        assert outage["on"] and a.runs.live(run.id) is None
        outage["on"] = False  # back; meanwhile replica b took the run over
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE leases SET holder = 'b', generation = generation + 1, "
                "expires_at = now() + interval '1 hour' WHERE run_id = %s",
                (run.id,),
            )
            (before,) = conn.execute(
                "SELECT num_records FROM runs WHERE run_id = %s", (run.id,)
            ).fetchone()
        store.flush()
        with psycopg.connect(postgres_dsn) as conn:
            (after,) = conn.execute(
                "SELECT num_records FROM runs WHERE run_id = %s", (run.id,)
            ).fetchone()
            (count,) = conn.execute(
                "SELECT count(*) FROM records WHERE run_id = %s", (run.id,)
            ).fetchone()
        assert after == before == count  # nothing written for b's run from here
    finally:
        outage["on"] = False
        a.stop()


def test_a_run_cancelled_while_its_replica_is_dead_does_no_further_iteration(
    tmp_path, postgres_dsn
):
    """Replica a is SIGKILLed with a run executing and one queued; both are cancelled on b
    before a's leases lapse. b's takeover read the cancel requests only at its next lease
    renewal, T/8 after it had started iterating: the runs went on for ~1,000 iterations
    after their cancel was answered, and the queued one (0 records) ran too. Now the
    takeover reads them first and stores the runs CANCELLED, also where b is full."""
    import signal

    from conftest import free_port, spawn_server
    from long_runs import ENDLESS

    port = free_port()
    flags = ("--store", postgres_dsn, "--lease-seconds", "3", "--workers", "1")
    a = spawn_server(tmp_path / "a", port, *flags, "--replica-id", "a")
    b = start_server(tmp_path / "b", store=postgres_dsn, replica_id="b", lease_seconds=3.0,
                     workers=1, max_concurrent_runs=1)  # fmt: skip
    try:
        spec = {"method": "gradient_descent", "learning_rate": 1e-9, "stopping": ENDLESS}
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            runs = [client.start_run(problems.rosenbrock(dim=2), np.zeros(2), **spec)
                    for _ in range(2)]  # fmt: skip
            deadline = time.monotonic() + 60  # a hang guard
            while client.get_run(runs[0].id).num_records < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
        busy = None
        with Client(b.address, timeout=60) as client:
            busy = client.start_run(problems.rosenbrock(dim=2), np.zeros(2), **spec)  # b full
            a.send_signal(signal.SIGKILL)
            a.wait(30)
            at_cancel = {r.id: client.cancel_run(r.id).num_records for r in runs}
            deadline = time.monotonic() + 60  # the leases lapse after 3 s
            while time.monotonic() < deadline and not all(
                status_name(client.get_run(r.id)) == "CANCELLED" for r in runs
            ):
                time.sleep(0.05)
            for run in runs:
                info = client.get_run(run.id)
                assert status_name(info) == "CANCELLED", info
                assert info.num_records == at_cancel[run.id]  # not one more iteration
                assert "replica was down" in info.message
            assert status_name(client.get_run(busy.id)) == "RUNNING"  # b's own went on
            client.cancel_run(busy.id)
    finally:
        if a.poll() is None:
            a.kill()
        b.stop()


def test_a_resume_that_loses_to_another_replicas_lease_is_failed_precondition(
    tmp_path, postgres_dsn
):
    """Two ResumeRuns racing on two replicas: the one that finds the other's lease was told
    UNAVAILABLE ("leased to another replica"), which invites a retry that cannot succeed.
    A lease left behind by a run that ended (its replica could not release it) is another
    matter: that one lapses, and the refusal says to retry."""
    from hessian_client import FailedPrecondition
    from hessian_service.engine import make_objective
    from hessian_service.server.errors import ConflictError

    a = start_server(tmp_path / "a", store=postgres_dsn, replica_id="a", lease_seconds=2.0)
    try:
        with Client(a.address, timeout=60) as client:
            done = client.start_run(problems.rosenbrock(dim=2), np.array([-1.2, 1.0]), **SHORT)
            assert status_name(done.wait(60)) == "FINISHED"
            with psycopg.connect(postgres_dsn) as conn:  # stopped, its lease not released
                conn.execute("UPDATE runs SET status = 'INTERRUPTED' WHERE run_id = %s", (done.id,))
                conn.execute(
                    "INSERT INTO leases VALUES (%s, 'x', 1, now() + interval '1 hour')", (done.id,)
                )
            with pytest.raises(Unavailable, match=r"has not lapsed yet.*retry within 2 s"):
                client.resume_run(done.id)
            seen = a.store.get_run(done.id)  # read INTERRUPTED, as the loser of a race reads it
            with psycopg.connect(postgres_dsn) as conn:  # ... then x resumed it first
                conn.execute("UPDATE runs SET status = 'RUNNING' WHERE run_id = %s", (done.id,))
            objective = make_objective("rosenbrock", options={"dim": 2})
            with pytest.raises(ConflictError, match="executing on another replica"):
                a.runs.resume(seen, objective)
            with psycopg.connect(postgres_dsn) as conn:  # x stopped it and its lease lapsed
                conn.execute("UPDATE runs SET status = 'INTERRUPTED' WHERE run_id = %s", (done.id,))
                conn.execute("UPDATE leases SET expires_at = now() WHERE run_id = %s", (done.id,))
            assert status_name(client.resume_run(done.id).wait(60)) == "FINISHED"
            with pytest.raises(FailedPrecondition, match="not INTERRUPTED"):
                client.resume_run(done.id)
    finally:
        a.stop()


def test_a_takeover_that_cannot_store_the_cancel_keeps_the_request(postgres_dsn, caplog):
    """The takeover consumed the cancel request in a transaction of its own and then failed
    to store the end: the next takeover, T later, ran the cancelled run on. The request and
    the end are one transaction now, and the failed takeover gives its lease up."""
    import torch
    from hessian_service.engine.records import Checkpoint
    from hessian_service.server.failover import LeaseKeeper
    from hessian_service.store import PostgresRunStore, RunRow, StoreError
    from hessian_service.store.base import StoredCheckpoint

    store = PostgresRunStore(postgres_dsn, replica_id="b")
    row = RunRow("r-1", "p-1", {"options": {}, "stopping": {}}, created_at=time.time())
    store.create_run(row, StoredCheckpoint.of(Checkpoint(0, torch.zeros(2), {})))
    store.update_run("r-1", status="RUNNING")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:  # replica a died
        conn.execute("INSERT INTO leases VALUES ('r-1', 'a', 1, now() - interval '1 second')")
    store.request_cancel("r-1")
    continued = []

    class Runs:  # the run manager's part in a takeover: nothing here executes the run
        stopping = False

        def live(self, run_id):
            return None

        def take_over(self, row, objective, acquired_at):
            continued.append(row.run_id)

    keeper = LeaseKeeper(store, Runs(), lambda problem_id: object(), ttl_s=1.0)
    update_run, failures = store.update_run, [StoreError("a transient database error")]

    def failing_once(run_id, **fields):
        if failures:
            raise failures.pop()
        return update_run(run_id, **fields)

    store.update_run = failing_once
    try:
        keeper._scan()  # takes the lease, reads the request, cannot store the end
        with psycopg.connect(postgres_dsn) as conn:
            (requests,) = conn.execute("SELECT count(*) FROM cancel_requests").fetchone()
        assert requests == 1 and "r-1" not in store._fences
        deadline = time.monotonic() + 30  # its lease lapses (given up), then the next scan
        while store.get_run("r-1").status != "CANCELLED" and time.monotonic() < deadline:
            keeper._scan()
            time.sleep(0.1)
        assert store.get_run("r-1").status == "CANCELLED" and continued == []
    finally:
        store.close()
