"""The RunStore contract, run against both SQLite and a real throwaway PostgreSQL 15: batched
commits another connection sees, listeners only after commit, reopen, conditional updates,
problems with owners, retention; then what only the PostgreSQL store has (schema refusal,
leases raced by two replicas, fencing of stale writes)."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from hessian_service.engine.records import StepRecord
from hessian_service.store import (
    ProblemInUseError,
    ProblemNotFoundError,
    RunConflictError,
    RunNotFoundError,
    RunRow,
    SQLiteRunStore,
    StoredCheckpoint,
    StoreError,
)
from hessian_service.store import postgres as postgres_store
from hessian_service.store.postgres import LeaseLostError, PostgresRunStore
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """`open_store(**kw)` opens (again) one store location of the parametrised kind."""
    if request.param == "sqlite":
        where = tmp_path
        make = SQLiteRunStore
    else:
        where = request.getfixturevalue("postgres_dsn")
        make = PostgresRunStore
    opened = []

    def open_(**kw):
        store = make(where, **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def _row(run_id: str, created: float, status: str = "QUEUED", owner: str = "anonymous") -> RunRow:
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    return RunRow(run_id, "p-1", spec, status=status, created_at=created, owner=owner)


def _cp(iteration: int, fill: int = 0) -> StoredCheckpoint:
    return StoredCheckpoint(iteration, "float64", [2], bytes([fill]) * 16, {"damping": 0.5})


def test_batches_are_seen_by_another_connection_and_listeners_hear_only_commits(open_store):
    store = open_store(commit_every=10, commit_interval_s=3600)
    other = open_store()
    heard: list[dict[str, int]] = []
    store.add_commit_listener(heard.append)
    store.create_run(_row("r-a", 1.0), _cp(0))
    for i in range(25):
        store.append_record("r-a", StepRecord(iteration=i, loss=1.0 / (i + 1)))
    assert len(other.records("r-a", 0, 100)) == 20
    assert heard == [{"r-a": 9}, {"r-a": 19}]
    store.flush()
    assert [r.iteration for r in other.records("r-a", 0, 100)] == list(range(25))
    assert heard[-1] == {"r-a": 24} and other.get_run("r-a").num_records == 25


def test_records_commit_within_the_interval(open_store):
    store = open_store(commit_every=1000, commit_interval_s=0.05)
    other = open_store()
    store.create_run(_row("r-a", 1.0), _cp(0))
    store.append_record("r-a", StepRecord(iteration=0, loss=2.0))
    deadline = time.monotonic() + 10  # guards a hang only; the interval is 50 ms
    while not other.records("r-a", 0, 10) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.loss for r in other.records("r-a", 0, 10)] == [2.0]


def test_everything_survives_reopen_and_active_runs_become_interrupted(open_store):
    store = open_store()
    store.put_problem("p-1", b"problem-bytes")
    store.create_run(_row("r-done", 1.0), _cp(0))
    store.create_run(_row("r-live", 2.0), _cp(0))
    store.update_run("r-live", status="RUNNING", backend="autograd")
    for i in range(7):
        store.append_record(
            "r-live", StepRecord(iteration=i, loss=float(10 - i), gain_ratio=float("nan"))
        )
    store.put_checkpoint("r-live", _cp(5, fill=7))
    store.update_run("r-done", status="FINISHED", stop_reason="max_iterations", converged=True)
    store.close()

    store = open_store()
    assert store.mark_interrupted("process died") == ["r-live"]
    live = store.get_run("r-live")
    assert (live.status, live.stop_reason, live.message) == (
        "INTERRUPTED",
        "shutdown",
        "process died",
    )
    assert live.num_records == 7 and live.last_record.loss == 4.0
    got = store.records("r-live", 3, 100)
    assert [r.iteration for r in got] == [3, 4, 5, 6]
    assert got[0].loss == 7.0 and got[0].gain_ratio != got[0].gain_ratio  # NaN kept
    cp = store.latest_checkpoint("r-live")
    assert (cp.iteration, cp.shape, cp.state, cp.params) == (
        5,
        [2],
        {"damping": 0.5},
        bytes([7]) * 16,
    )
    assert store.get_problem("p-1") == b"problem-bytes"
    done = store.get_run("r-done")
    assert (done.status, done.converged, done.spec["stopping"]) == (
        "FINISHED",
        True,
        {"max_iterations": 5},
    )


def test_list_runs_pages_newest_first_and_filters(open_store):
    store = open_store()
    for i in range(7):
        owner = "alice" if i < 4 else "bob"
        store.create_run(_row(f"r-{i}", float(i), "FINISHED" if i % 2 else "QUEUED", owner), _cp(0))
    page = store.list_runs([], 3, None)
    assert [r.run_id for r in page] == ["r-6", "r-5", "r-4"]
    after = (page[-1].created_at, page[-1].run_id)
    assert [r.run_id for r in store.list_runs([], 3, after)] == ["r-3", "r-2", "r-1"]
    assert [r.run_id for r in store.list_runs(["FINISHED"], 10, None)] == ["r-5", "r-3", "r-1"]
    assert [r.run_id for r in store.list_runs(["QUEUED"], 10, None, "alice")] == ["r-2", "r-0"]
    assert store.count_runs_by_status() == {"FINISHED": 3, "QUEUED": 4}


def test_conditional_updates_duplicates_and_delete(open_store):
    store = open_store()
    store.create_run(_row("r-a", 1.0), _cp(0))
    with pytest.raises(RunConflictError, match="is QUEUED, not RUNNING"):
        store.update_run("r-a", expect_status=["RUNNING"], status="FINISHED")
    with pytest.raises(RunNotFoundError):
        store.update_run("r-none", status="FINISHED")
    with pytest.raises(KeyError):
        store.update_run("r-a", colour="red")
    for i in (0, 1, 2, 1, 2, 3):
        store.append_record("r-a", StepRecord(iteration=i, loss=float(i)))
    store.flush()
    assert store.get_run("r-a").num_records == 4
    with pytest.raises(RunConflictError):
        store.delete_run("r-a", statuses=["FINISHED"])
    assert store.delete_run("r-a")
    assert store.get_run("r-a") is None
    assert store.records("r-a", 0, 10) == [] and store.latest_checkpoint("r-a") is None
    assert not store.delete_run("r-a")


def test_problems_have_owners_pins_and_retention(open_store):
    store = open_store()
    store.put_problem("p-1", b"x" * 100, owner="alice")
    store.put_problem("p-1", b"x" * 100, owner="bob")
    store.put_problem("p-2", b"y" * 300, owner="alice")
    assert store.has_problem("p-1", "bob") and not store.has_problem("p-2", "bob")
    assert store.get_problem("p-2", "bob") is None and store.get_problem("p-2") == b"y" * 300
    with pytest.raises(ProblemNotFoundError):
        store.create_run(_row("r-x", 1.0, owner="carol"), _cp(0), require_problem=True)
    store.create_run(_row("r-1", 1.0, owner="bob"), _cp(0), require_problem=True)
    with pytest.raises(ProblemInUseError, match="r-1"):
        store.delete_problem("p-1", "bob")
    assert store.delete_problem("p-1", "alice") and store.has_problem("p-1", "bob")
    assert not store.delete_problem("p-2", "bob")
    assert store.enforce_problem_retention(150) == ["p-2"]  # p-1 is pinned by r-1
    assert not store.has_problem("p-2") and store.has_problem("p-1")


def test_retention_keeps_active_runs(open_store):
    store = open_store()
    for i in range(5):
        store.create_run(_row(f"r-{i}", float(i), "FINISHED" if i < 3 else "RUNNING"), _cp(0))
    assert store.enforce_retention(3) == ["r-0", "r-1"]
    assert {r.run_id for r in store.list_runs([], 10, None)} == {"r-2", "r-3", "r-4"}


def test_retention_never_deletes_interrupted_runs(open_store):
    store = open_store()
    for i, status in enumerate(["INTERRUPTED", "FINISHED", "INTERRUPTED", "FAILED"]):
        store.create_run(_row(f"r-{i}", float(i), status), _cp(0))
    assert store.enforce_retention(1) == ["r-1", "r-3"]
    assert store.enforce_retention(1) == []  # resumable: over the cap, and kept
    assert sorted(r.run_id for r in store.list_runs([], 10, None)) == ["r-0", "r-2"]


# PostgreSQL only


def test_a_newer_schema_is_refused(postgres_dsn):
    PostgresRunStore(postgres_dsn).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("UPDATE hessian_meta SET value = '99' WHERE key = 'schema_version'")
    newest = max(postgres_store.MIGRATIONS)
    with pytest.raises(StoreError, match=f"schema version 99, newer than this server's {newest}"):
        PostgresRunStore(postgres_dsn)


def test_an_unreachable_database_is_a_clear_store_error():
    with pytest.raises(
        StoreError, match=r"cannot connect to the run store postgresql://127\.0\.0\.1:1/x: "
    ) as caught:
        PostgresRunStore("postgresql://u:secret@127.0.0.1:1/x", connect_timeout_s=1)
    assert "secret" not in str(caught.value)


def test_two_replicas_racing_for_an_expired_lease_exactly_one_wins(postgres_dsn):
    a = PostgresRunStore(postgres_dsn, replica_id="a")
    b = PostgresRunStore(postgres_dsn, replica_id="b")
    try:
        wins = {"a": 0, "b": 0}
        for i in range(200):
            run_id = f"r-{i}"
            a.create_run(_row(run_id, float(i), "RUNNING"), _cp(0))
            assert a.acquire_lease(run_id, ttl_s=0.0) == 1  # expires at once: free to take
            gate = threading.Barrier(2)
            got: dict[str, int | None] = {}

            def race(store, name, run_id=run_id, gate=gate, got=got):
                gate.wait()
                got[name] = store.acquire_lease(run_id, ttl_s=60)

            threads = [threading.Thread(target=race, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            winners = [n for n, g in got.items() if g is not None]
            assert len(winners) == 1, (i, got)
            assert got[winners[0]] == 2
            wins[winners[0]] += 1
        assert wins["a"] + wins["b"] == 200
    finally:
        a.close()
        b.close()


def test_a_stale_lease_generation_cannot_write(postgres_dsn):
    old = PostgresRunStore(postgres_dsn, replica_id="old", commit_every=1000)
    new = PostgresRunStore(postgres_dsn, replica_id="new")
    try:
        old.create_run(_row("r-a", 1.0, "RUNNING"), _cp(0))
        assert old.acquire_lease("r-a", ttl_s=0.0) == 1
        assert new.acquire_lease("r-a", ttl_s=60) == 2  # old's lease expired: taken over
        assert old.acquire_lease("r-a", ttl_s=60) is None  # new's lease is live
        # a replica that has not noticed yet (paused, partitioned) and still writes
        old.append_record("r-a", StepRecord(iteration=0, loss=1.0))
        old.flush()  # its record is dropped: the run is another replica's to write now
        with pytest.raises(LeaseLostError, match="generation 1"):
            old.append_record("r-a", StepRecord(iteration=1, loss=1.0))
        with pytest.raises(LeaseLostError):
            old.put_checkpoint("r-a", _cp(3, fill=9))
        with pytest.raises(LeaseLostError):
            old.update_run("r-a", status="FINISHED")
        assert new.records("r-a", 0, 10) == [] and new.latest_checkpoint("r-a").iteration == 0
        assert new.get_run("r-a").status == "RUNNING"
        new.append_record("r-a", StepRecord(iteration=0, loss=2.0))
        new.put_checkpoint("r-a", _cp(1))
        assert [r.loss for r in new.records("r-a", 0, 10)] == [2.0]
        assert new.renew_lease("r-a", ttl_s=60) and not old.renew_lease("r-a", ttl_s=60)
        with pytest.raises(LeaseLostError):  # still refused after the failed renewal
            old.put_checkpoint("r-a", _cp(3, fill=9))
    finally:
        old.close()
        new.close()


def test_an_expired_lease_nobody_took_yet_cannot_write(postgres_dsn):
    """A lone replica frozen past its lease, once continued, stored its run INTERRUPTED (a
    write broken by the freeze) and released the lease: the generation was still its own, so
    the fence let the end through, and no scan ever took the run over."""
    store = PostgresRunStore(postgres_dsn, replica_id="lone")
    try:
        store.create_run(_row("r-a", 1.0, "RUNNING"), _cp(0))
        assert store.acquire_lease("r-a", ttl_s=0.2) == 1
        time.sleep(0.4)  # expired, and nobody has taken it yet
        with pytest.raises(LeaseLostError, match="expired"):
            store.update_run("r-a", status="INTERRUPTED")
        with pytest.raises(LeaseLostError):
            store.put_checkpoint("r-a", _cp(3, fill=9))
        assert store.get_run("r-a").status == "RUNNING"
        assert store.expired_leases() == ["r-a"]
        assert store.acquire_lease("r-a", ttl_s=60) == 2  # the takeover writes again
        store.update_run("r-a", status="FINISHED")
    finally:
        store.close()


def test_a_lost_lease_stops_that_run_alone_and_the_others_records_commit(postgres_dsn):
    """One run's lease taken by another replica failed the whole batch: every run on the
    replica stopped ('run R2 stops here: run R1 is no longer leased') and stayed RUNNING
    with its lease renewed, executed by nobody."""
    old = PostgresRunStore(postgres_dsn, replica_id="old", commit_every=1000)
    new = PostgresRunStore(postgres_dsn, replica_id="new")
    try:
        for run_id in ("r-a", "r-b"):
            old.create_run(_row(run_id, 1.0, "RUNNING"), _cp(0))
        assert old.acquire_lease("r-a", ttl_s=0.0) == 1 and old.acquire_lease("r-b", 60) == 1
        assert new.acquire_lease("r-a", ttl_s=60) == 2
        for i in range(3):
            old.append_record("r-a", StepRecord(iteration=i, loss=1.0))
            old.append_record("r-b", StepRecord(iteration=i, loss=float(i)))
        old.flush()
        assert [r.loss for r in new.records("r-b", 0, 10)] == [0.0, 1.0, 2.0]
        assert new.records("r-a", 0, 10) == []
        with pytest.raises(LeaseLostError, match="run r-a"):
            old.append_record("r-a", StepRecord(iteration=3, loss=1.0))
        old.append_record("r-b", StepRecord(iteration=3, loss=3.0))  # r-b goes on
        old.put_checkpoint("r-b", _cp(3))
        assert new.get_run("r-b").num_records == 4
    finally:
        old.close()
        new.close()


def test_starting_a_replica_interrupts_only_runs_without_a_lease(postgres_dsn):
    a = PostgresRunStore(postgres_dsn, replica_id="a")
    try:
        a.create_run(_row("r-held", 1.0, "RUNNING"), _cp(0))
        a.create_run(_row("r-dead", 2.0, "RUNNING"), _cp(0))
        a.create_run(_row("r-orphan", 3.0, "RUNNING"), _cp(0))
        assert a.acquire_lease("r-held", ttl_s=60) == 1
        assert a.acquire_lease("r-dead", ttl_s=0.0) == 1  # its replica died: expired
        b = PostgresRunStore(postgres_dsn, replica_id="b")
        assert b.mark_interrupted("no replica holds it") == ["r-orphan"]
        assert b.get_run("r-held").status == b.get_run("r-dead").status == "RUNNING"
        assert b.expired_leases() == ["r-dead"]  # left for a takeover
        b.close()
    finally:
        a.close()


def test_a_session_frozen_inside_a_transaction_neither_blocks_writes_nor_keeps_its_locks(
    postgres_dsn,
):
    """A replica frozen mid-transaction (SIGSTOP, a paused VM) held its row locks for ever:
    the lease scan waited on them and, holding the store's lock, wedged the healthy replica.
    With lock_wait_s, a write waits at most that long (StoreError), and PostgreSQL ends a
    session (opened with the same options, as another replica's) left idle inside its
    transaction for twice that, so its locks go and the write then succeeds."""
    store = PostgresRunStore(postgres_dsn, lock_wait_s=0.3)
    try:
        store.put_problem("p-1", b"x")
        store.create_run(_row("r-a", 1.0, "RUNNING"), _cp(0))
        frozen = psycopg.connect(postgres_dsn, **postgres_store._lock_options(0.3))
        frozen.execute("SELECT 1 FROM runs WHERE run_id = 'r-a' FOR UPDATE")  # then idles
        started = time.monotonic()
        with pytest.raises(StoreError, match="lock timeout"):
            store.update_run("r-a", message="while the frozen session holds the row")
        assert time.monotonic() - started < 5  # bounded: it waited ~0.3 s, not for ever
        time.sleep(1.0)  # idle in its transaction past 0.6 s: PostgreSQL ends the session
        store.update_run("r-a", message="once the lock has gone")
        assert store.get_run("r-a").message == "once the lock has gone"
        with pytest.raises(psycopg.Error, match="idle-in-transaction timeout"):
            frozen.execute("SELECT 1")
        frozen.close()
    finally:
        store.close()


def _waiting_on_a_lock(dsn: str) -> bool:
    """Whether some other session of the test database waits on a row lock."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        count = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()[0]
    return count > 0


@pytest.mark.parametrize("remove", ["delete_problem", "retention"])
def test_a_problem_is_not_deleted_under_a_run_being_created(postgres_dsn, monkeypatch, remove):
    """Replica A's create_run has pinned the problem (its owner row updated, the run
    inserted) but not committed when replica B deletes the problem. B read the runs before
    A committed, then deleted the problem anyway: the run's takeovers failed for good and it
    stayed RUNNING. B now waits for A, sees the run and keeps the problem."""
    creator, remover = PostgresRunStore(postgres_dsn), PostgresRunStore(postgres_dsn)
    try:
        creator.put_problem("p-1", b"x" * 100)
        pinned, release = threading.Event(), threading.Event()
        write_checkpoint = creator._write_checkpoint

        def held(cur, run_id, checkpoint):  # inside create_run's transaction, before commit
            write_checkpoint(cur, run_id, checkpoint)
            pinned.set()
            assert release.wait(30)

        monkeypatch.setattr(creator, "_write_checkpoint", held)
        create = threading.Thread(
            target=creator.create_run,
            args=(_row("r-1", time.time(), status="RUNNING"), _cp(0)),
            kwargs={"require_problem": True},
        )
        create.start()
        assert pinned.wait(30)
        outcome: list = []

        def remove_problem() -> None:
            try:
                if remove == "delete_problem":
                    outcome.append(remover.delete_problem("p-1"))
                else:
                    outcome.append(remover.enforce_problem_retention(0))
            except ProblemInUseError as exc:
                outcome.append(exc)

        removing = threading.Thread(target=remove_problem)
        removing.start()
        deadline = time.monotonic() + 30
        while not _waiting_on_a_lock(postgres_dsn) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        create.join(30)
        removing.join(30)
        assert creator.get_run("r-1").status == "RUNNING"
        assert creator.get_problem("p-1") == b"x" * 100, outcome
        if remove == "delete_problem":
            assert isinstance(outcome[0], ProblemInUseError)
        else:
            assert outcome == [[]]
    finally:
        creator.close()
        remover.close()
