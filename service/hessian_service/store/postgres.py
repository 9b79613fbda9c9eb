"""PostgreSQL run store (psycopg 3 + a connection pool): the store several replicas share.

The same contract as the SQLite store (see base.py): records are queued in memory and
committed in one transaction every `commit_every` records or `commit_interval_s`, and
always before a status change, a checkpoint or `flush`; only committed records are
acknowledged to the commit listeners. Every record commit also sends
`NOTIFY hessian_records` (run id and highest iteration), delivered only when the
transaction commits; so does every status change (iteration -1: no new record), since a
run's end may commit after its last record; each store LISTENs on its own connection and
passes other stores' commits to its commit listeners too, so a replica pushes another's
records, and the end of its runs, to its watchers.

Schema: versioned in `hessian_meta` ('schema_version'); a newer schema than this server
knows is refused; older ones are migrated one transaction per version under an advisory
lock, so replicas starting together migrate once. Opening also checks the data's
consistency (postgres_check.py: statuses, contiguous records, no orphans) and refuses an
inconsistent store, naming what is wrong and `hessian-server --recover-store --store DSN`.

Size cap (`max_bytes`): the store counts the bytes it holds (records' JSON, checkpoints'
parameters, problems' blobs; per run in `runs.stored_bytes`) and refuses, with
StoreFullError, a write that would take the total past the cap (checked inside the writing
transaction, so a refused write leaves nothing). Deletes free their bytes at once. It counts
payload, not PostgreSQL's row overhead, indexes or dead tuples awaiting VACUUM; and
replicas committing at the same moment may each pass a check the other's commit would fail,
so the cap may be overshot by one batch per replica.

Leases (one row per executing run: owner replica, generation, expiry on the database's
clock): `acquire_lease` takes a free or expired lease and bumps its generation in one
conditional statement, so of two replicas racing for it exactly one wins. While this store
holds a run's lease, every record, checkpoint and run update for that run is fenced: it is
written only if the lease row still carries this store's generation and has not expired
(LeaseLostError otherwise, and nothing is written). An expired lease is refused even before
another replica takes it: a replica frozen past its lease (SIGSTOP, a paused VM) may be the
only one, and the run is then its own scan's to take over from its last checkpoint, not its
stale executor's to end (say INTERRUPTED, after a write the freeze broke)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ..engine.records import StepRecord, StopReason
from . import layout, postgres_check
from .base import (
    ACTIVE_STATUSES,
    ANONYMOUS_OWNER,
    ENDED_STATUSES,
    PROBLEM_PINNING_STATUSES,
    ProblemInUseError,
    ProblemNotFoundError,
    RunRow,
    RunStatus,
    StoreClosedError,
    StoreCorruptError,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)
from .queue import RecordQueue
from .sql_reads import SqlReads

NOTIFY_CHANNEL = "hessian_records"
MIGRATION_LOCK = 0x4E5353  # pg_advisory_xact_lock key: one replica migrates at a time
# MIGRATIONS[v] takes a store from version v - 1 to v, in one transaction
MIGRATIONS = {
    1: f"""
CREATE TABLE problems (
    problem_id TEXT PRIMARY KEY, blob BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE problem_owners (
    problem_id TEXT NOT NULL, owner TEXT NOT NULL, used_at DOUBLE PRECISION NOT NULL,
    bytes BIGINT NOT NULL, PRIMARY KEY (problem_id, owner));
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, problem_id TEXT NOT NULL, spec TEXT NOT NULL, name TEXT,
    status TEXT NOT NULL, stop_reason TEXT, converged INTEGER, message TEXT, backend TEXT,
    created_at DOUBLE PRECISION, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
    num_records BIGINT NOT NULL, last_record TEXT,
    owner TEXT NOT NULL DEFAULT '{ANONYMOUS_OWNER}');
CREATE INDEX runs_by_time ON runs (created_at DESC, run_id DESC);
CREATE TABLE records (
    run_id TEXT NOT NULL, iteration BIGINT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (run_id, iteration));
CREATE TABLE checkpoints (
    run_id TEXT NOT NULL, iteration BIGINT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    params BYTEA NOT NULL, state TEXT NOT NULL, PRIMARY KEY (run_id, iteration));
CREATE TABLE leases (
    run_id TEXT PRIMARY KEY, holder TEXT NOT NULL, generation BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL);
""",
    # the size cap: each run's stored bytes (records' JSON, checkpoints' parameters)
    2: """
ALTER TABLE runs ADD COLUMN stored_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE runs SET stored_bytes =
    COALESCE((SELECT SUM(octet_length(record)) FROM records r WHERE r.run_id = runs.run_id), 0)
    + COALESCE((SELECT SUM(octet_length(params)) FROM checkpoints c
                WHERE c.run_id = runs.run_id), 0);
""",
    # CancelRun of a run another replica executes: taken by the lease holder's next renewal
    3: """
CREATE TABLE cancel_requests (
    run_id TEXT PRIMARY KEY, requested_at TIMESTAMPTZ NOT NULL DEFAULT now());
""",
}
USED_BYTES = (
    "SELECT (SELECT COALESCE(SUM(stored_bytes), 0) FROM runs) + (SELECT COALESCE(SUM(b), 0) "
    "FROM (SELECT MAX(bytes) AS b FROM problem_owners GROUP BY problem_id) AS p)"
)
SCHEMA_VERSION = max(MIGRATIONS)
# Records are written as JSON objects here, not layout arrays (layout.record_json): replicas
# of a release before layouts share the database during a rolling update and read only
# objects. Every release since reads both, so a later one can turn this on.
COMPACT_RECORDS = False
log = logging.getLogger(__name__)


class LeaseLostError(StoreError):
    """A fenced write for a run whose lease another replica has taken (or that expired)."""

    def __init__(self, run_id: str, generation: int, expired: bool = False) -> None:
        self.run_id = run_id
        why = (
            "its lease expired; a replica's scan takes it over"
            if expired
            else "another replica took it over"
        )
        super().__init__(
            f"run_id: run {run_id} is no longer leased to this replica (generation "
            f"{generation}); {why}, nothing was written"
        )


class PostgresRunStore(RecordQueue, SqlReads):
    """The RunStore in a PostgreSQL database, shared by every replica given the same DSN."""

    MARK = "%s"

    def __init__(
        self,
        dsn: str,
        *,
        commit_every: int = 256,
        commit_interval_s: float = 0.2,
        replica_id: str = "",
        pool_size: int = 8,
        connect_timeout_s: float = 10.0,
        pool_timeout_s: float = 10.0,
        password: str = "",
        max_bytes: int = 0,
        check_integrity: bool = True,
        lock_wait_s: float = 0.0,
    ) -> None:
        """Connect, migrate the schema (refusing a newer one), check the data's consistency
        (unless `check_integrity` is False) and start the flusher.

        `password` (read from a secret file, say) is added to the DSN's connection options.
        `pool_timeout_s` bounds one call's wait for a connection (a lost database fails
        fast: a replica must notice within its lease). `max_bytes` caps the counted bytes
        (0: no cap). `lock_wait_s` (0: unbounded): a statement waits at most this long for
        another session's lock, and a session idle inside a transaction for twice this long is
        ended by PostgreSQL, releasing its locks: a replica frozen mid-transaction (SIGSTOP,
        a paused VM, a partition that keeps its connection) then neither blocks the lease scan
        that would take its runs over nor the healthy replicas' writes. Raises StoreError
        when the database cannot be reached or has a newer schema, StoreCorruptError when it
        is inconsistent.
        """
        self.dsn = psycopg.conninfo.make_conninfo(dsn, password=password) if password else dsn
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.replica_id = replica_id
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[str, StepRecord]] = []
        self._oldest_pending = 0.0
        self._failure: StoreError | None = None
        self._fences: dict[str, int] = {}
        # runs whose lease a flush found lost: their queued records were dropped (another
        # replica writes the run now), and their next append raises this (no other run's)
        self._lost: dict[str, LeaseLostError] = {}
        self._cursor: psycopg.Cursor | None = None
        self._taken: list[tuple[str, StepRecord]] = []
        self._open = True
        self._closed = threading.Event()
        self._token = uuid.uuid4().hex[:12]  # tells this store's NOTIFYs from other stores'
        try:
            self._pool = ConnectionPool(
                self.dsn,
                min_size=1,
                max_size=pool_size,
                timeout=pool_timeout_s,
                check=ConnectionPool.check_connection,  # a restarted database: reconnect
                kwargs={
                    "connect_timeout": max(int(connect_timeout_s), 1),
                    **_lock_options(lock_wait_s),
                },
                open=False,
            )
            self._pool.open(wait=True, timeout=max(connect_timeout_s, pool_timeout_s))
        except Exception as exc:  # pool errors (PoolTimeout) and psycopg errors alike
            raise StoreError(f"cannot connect to the run store {self._where()}: {exc}") from exc
        try:
            with self._pool.connection() as conn:
                _migrate(conn, self._where())
                found = postgres_check.inconsistencies(conn) if check_integrity else []
            if found:
                raise StoreCorruptError(postgres_check.refusal(self._where(), found))
        except psycopg.Error as exc:
            self._pool.close()
            raise self._error(exc) from exc
        except StoreError:
            self._pool.close()
            raise
        self._flusher = threading.Thread(target=self._flush_loop, name="store-flush", daemon=True)
        self._flusher.start()
        self._listener = threading.Thread(
            target=self._listen_loop, name="store-listen", daemon=True
        )
        self._listener.start()

    # problems
    def put_problem(self, problem_id: str, blob: bytes, owner: str = ANONYMOUS_OWNER) -> None:
        now = time.time()
        with self._write() as cur:
            cur.execute(
                "INSERT INTO problems VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (problem_id, blob, now),
            )
            cur.execute(
                "INSERT INTO problem_owners VALUES (%s, %s, %s, %s) ON CONFLICT (problem_id, "
                "owner) DO UPDATE SET used_at = EXCLUDED.used_at, bytes = EXCLUDED.bytes",
                (problem_id, owner, now, len(blob)),
            )
            self._check_cap(cur)

    def delete_problem(self, problem_id: str, owner: str | None = None) -> bool:
        users_sql = "SELECT run_id FROM runs WHERE problem_id = %s AND status = ANY(%s)"
        users_args: list[Any] = [problem_id, list(PROBLEM_PINNING_STATUSES)]
        held_sql = "SELECT COUNT(*) FROM problems WHERE problem_id = %s"
        held_args: list[Any] = [problem_id]
        if owner is not None:
            users_sql += " AND owner = %s"
            users_args.append(owner)
            held_sql = "SELECT COUNT(*) FROM problem_owners WHERE problem_id = %s AND owner = %s"
            held_args.append(owner)
        lock_sql = "SELECT 1 FROM problem_owners WHERE problem_id = %s"
        lock_args = [problem_id] if owner is None else [problem_id, owner]
        if owner is not None:
            lock_sql += " AND owner = %s"
        with self._write() as cur:
            # the owners' rows locked first: a create_run pinning the problem updates its
            # owner's row, so it either commits before the runs are read below (in use) or
            # finds the row deleted (ProblemNotFoundError); read unlocked, a run committed
            # meanwhile was left on a deleted problem, RUNNING for good after a takeover
            cur.execute(lock_sql + " FOR UPDATE", lock_args)
            if not cur.execute(held_sql, held_args).fetchone()[0]:
                return False  # checked first: nobody learns of runs on a problem not theirs
            users = [r[0] for r in cur.execute(users_sql + " ORDER BY run_id", users_args)]
            if users:
                raise ProblemInUseError(problem_id, users)
            if owner is None:
                cur.execute("DELETE FROM problem_owners WHERE problem_id = %s", (problem_id,))
            else:
                cur.execute(
                    "DELETE FROM problem_owners WHERE problem_id = %s AND owner = %s",
                    (problem_id, owner),
                )
            cur.execute(
                "DELETE FROM problems WHERE problem_id = %s AND NOT EXISTS "
                "(SELECT 1 FROM problem_owners WHERE problem_id = %s)",
                (problem_id, problem_id),
            )
        return True

    def enforce_problem_retention(self, max_bytes: int, keep: Sequence[str] = ()) -> list[str]:
        with self._write() as cur:
            held = cur.execute(layout.HELD_PROBLEMS).fetchall()
            if sum(size for _, size, _ in held) <= max_bytes:
                return []
            pinned = {
                r[0]
                for r in cur.execute(
                    "SELECT DISTINCT problem_id FROM runs WHERE status = ANY(%s)",
                    (list(PROBLEM_PINNING_STATUSES),),
                )
            }
            deleted = layout.problems_to_evict(held, pinned | set(keep), max_bytes)
            if deleted:  # locked, then pinned again: as delete_problem, for runs started meanwhile
                cur.execute(
                    "SELECT 1 FROM problem_owners WHERE problem_id = ANY(%s) FOR UPDATE", (deleted,)
                )
                pinned = {
                    r[0]
                    for r in cur.execute(
                        "SELECT DISTINCT problem_id FROM runs WHERE problem_id = ANY(%s) AND "
                        "status = ANY(%s)",
                        (deleted, list(PROBLEM_PINNING_STATUSES)),
                    )
                }
                deleted = [pid for pid in deleted if pid not in pinned]
            for pid in deleted:
                cur.execute("DELETE FROM problem_owners WHERE problem_id = %s", (pid,))
                cur.execute("DELETE FROM problems WHERE problem_id = %s", (pid,))
        return deleted

    # runs
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._write():
            yield

    def create_run(
        self, row: RunRow, checkpoint: StoredCheckpoint, *, require_problem: bool = False
    ) -> None:
        values = layout.row_values(row, COMPACT_RECORDS)
        with self._write() as cur:
            self._flush_locked(cur)  # a store that cannot commit what it has takes no new run
            if require_problem:
                cur.execute(
                    "UPDATE problem_owners SET used_at = %s WHERE owner = %s AND problem_id = %s",
                    (time.time(), row.owner, row.problem_id),
                )
                if cur.rowcount == 0:  # deleted (or evicted) since the request resolved it
                    raise ProblemNotFoundError(row.problem_id)
            cur.execute(
                f"INSERT INTO runs ({', '.join(layout.ROW_FIELDS)}) "
                f"VALUES ({', '.join(['%s'] * len(layout.ROW_FIELDS))})",
                values,
            )
            self._write_checkpoint(cur, row.run_id, checkpoint)
            self._check_cap(cur)

    def update_run(self, run_id: str, *, expect_status: Sequence[str] = (), **values: Any) -> None:
        encoded = layout.encode_fields(values, COMPACT_RECORDS)
        where, args = "run_id = %s", [run_id]
        if expect_status:
            where += " AND status = ANY(%s)"
            args.append(list(expect_status))
        with self._write() as cur:
            self._flush_locked(cur)
            self._check_fence(cur, run_id)
            cur.execute(
                f"UPDATE runs SET {', '.join(f'{k} = %s' for k in encoded)} WHERE {where}",
                (*encoded.values(), *args),
            )
            if cur.rowcount == 0:
                layout.refuse(run_id, self._status(cur, run_id), expect_status)
            if "status" in values:  # any status change (RUNNING, the end, ...), record or not
                self._notify(cur, run_id, -1)

    def delete_run(self, run_id: str, statuses: Sequence[str] = ()) -> bool:
        with self._write() as cur:
            self._flush_locked(cur)
            return self._delete_run(cur, run_id, statuses)

    def _delete_run(self, cur: psycopg.Cursor, run_id: str, statuses: Sequence[str]) -> bool:
        status = self._status(cur, run_id, lock=True)
        if statuses and status is not None and status not in statuses:
            layout.refuse(run_id, status, statuses)
        cur.execute("DELETE FROM runs WHERE run_id = %s", (run_id,))
        deleted = cur.rowcount > 0
        for table in ("records", "checkpoints", "leases", "cancel_requests"):
            cur.execute(f"DELETE FROM {table} WHERE run_id = %s", (run_id,))
        return deleted

    def request_cancel(self, run_id: str) -> None:
        with self._write() as cur:
            cur.execute(
                "INSERT INTO cancel_requests (run_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (run_id,),
            )

    def take_cancel_requests(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        with self._write() as cur:
            rows = cur.execute(
                "DELETE FROM cancel_requests WHERE run_id = ANY(%s) RETURNING run_id",
                (list(run_ids),),
            ).fetchall()
        return {r[0] for r in rows}

    def enforce_retention(self, max_runs: int, keep: str = "") -> list[str]:
        with self._write() as cur:
            total = cur.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            if total <= max_runs:
                return []
            ids = [
                r[0]
                for r in cur.execute(
                    "SELECT run_id FROM runs WHERE status = ANY(%s) AND run_id <> %s "
                    "ORDER BY created_at, run_id LIMIT %s",
                    (list(ENDED_STATUSES), keep, total - max_runs),
                )
            ]
            for run_id in ids:
                self._delete_run(cur, run_id, ())
        return ids

    def count_runs_by_status(self) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return dict(rows)

    def mark_interrupted(self, message: str) -> list[str]:
        """Active runs without a lease become INTERRUPTED. A leased run is left alone: its
        replica is executing it, or died and a replica takes it over once the lease expires
        (so starting a replica never interrupts another's runs, nor one that can fail over)."""
        with self._write() as cur:
            rows = cur.execute(
                "UPDATE runs SET status = %s, stop_reason = %s, message = %s "
                "WHERE status = ANY(%s) AND NOT EXISTS (SELECT 1 FROM leases l WHERE "
                "l.run_id = runs.run_id) RETURNING run_id",
                (RunStatus.INTERRUPTED, StopReason.SHUTDOWN, message, list(ACTIVE_STATUSES)),
            ).fetchall()
            for (run_id,) in rows:
                self._notify(cur, run_id, -1)
        return [r[0] for r in rows]

    # leases
    def acquire_lease(self, run_id: str, ttl_s: float) -> int | None:
        """Take the run's lease for `ttl_s` if it is free or expired: the new generation, or
        None when another holder's lease is still live. Fences this store's later writes."""
        with self._write() as cur:
            row = cur.execute(
                "INSERT INTO leases AS l VALUES (%s, %s, 1, now() + make_interval(secs => %s)) "
                "ON CONFLICT (run_id) DO UPDATE SET holder = EXCLUDED.holder, "
                "generation = l.generation + 1, expires_at = EXCLUDED.expires_at "
                "WHERE l.expires_at <= now() RETURNING generation",
                (run_id, self.replica_id, ttl_s),
            ).fetchone()
            if row is None:
                return None
            self._fences[run_id] = row[0]
            self._lost.pop(run_id, None)
            return row[0]

    def forget_lease(self, run_id: str) -> None:
        """Drop this store's fence of the run's lease (a transaction that took it rolled back,
        or the run no longer executes here): nothing of the store is written."""
        with self._lock:
            self._fences.pop(run_id, None)
            self._lost.pop(run_id, None)

    def renew_lease(self, run_id: str, ttl_s: float) -> bool:
        """Extend this store's lease on the run; False when it was lost (taken or expired)."""
        return run_id in self.renew_leases([run_id], ttl_s)

    def renew_leases(self, run_ids: Sequence[str], ttl_s: float) -> set[str]:
        """Extend this store's leases on the runs in one statement; the runs whose lease is
        still this store's (a lost one's fence stays: every later write for it is refused)."""
        held = [(r, self._fences[r]) for r in run_ids if r in self._fences]
        if not held:
            return set()
        with self._write() as cur:
            rows = cur.execute(
                "UPDATE leases l SET expires_at = now() + make_interval(secs => %s) "
                "FROM unnest(%s::text[], %s::bigint[]) AS h(run_id, generation) "
                "WHERE l.run_id = h.run_id AND l.generation = h.generation "
                "AND l.expires_at > now() RETURNING l.run_id",
                (ttl_s, [r for r, _ in held], [g for _, g in held]),
            ).fetchall()
        return {r[0] for r in rows}

    def release_lease(self, run_id: str) -> None:
        """Give the lease up (after the run's final status is stored)."""
        generation = self._fences.pop(run_id, None)
        self._lost.pop(run_id, None)
        if generation is not None:
            with self._write() as cur:
                cur.execute(
                    "DELETE FROM leases WHERE run_id = %s AND generation = %s",
                    (run_id, generation),
                )

    def expire_lease(self, run_id: str) -> bool:
        """Hand the run over: its lease expires now (this store stays fenced out of it), so
        another replica's scan takes it over from its last checkpoint."""
        generation = self._fences.get(run_id)
        if generation is None:
            return False
        with self._write() as cur:
            cur.execute(
                "UPDATE leases SET expires_at = now() WHERE run_id = %s AND generation = %s",
                (run_id, generation),
            )
            return cur.rowcount > 0

    def expired_leases(self) -> list[str]:
        """Active runs whose lease has expired (their replica died or lost the database)."""
        with self._read() as cur:
            rows = cur.execute(
                "SELECT l.run_id FROM leases l JOIN runs r USING (run_id) "
                "WHERE l.expires_at <= now() AND r.status = ANY(%s) ORDER BY l.expires_at",
                (list(ACTIVE_STATUSES),),
            ).fetchall()
        return [r[0] for r in rows]

    # records
    def records(self, run_id: str, from_iteration: int, limit: int) -> list[StepRecord]:
        with self._read() as cur:
            rows = cur.execute(
                "SELECT record FROM records WHERE run_id = %s AND iteration >= %s "
                "ORDER BY iteration LIMIT %s",
                (run_id, from_iteration, limit),
            ).fetchall()
        return layout.records_from_json([r[0] for r in rows])

    # checkpoints
    def put_checkpoint(self, run_id: str, checkpoint: StoredCheckpoint) -> None:
        with self._write() as cur:
            self._flush_locked(cur)
            self._check_fence(cur, run_id)
            if self._write_checkpoint(cur, run_id, checkpoint) > 0:
                self._check_cap(cur)

    def close(self) -> None:
        if not self._stop_flusher():
            return
        self._listener.join(timeout=5)
        with self._lock:
            try:
                self.flush()
            finally:
                self._open = False
                self._pool.close()

    @staticmethod
    def recover(dsn: str, password: str = "") -> postgres_check.RepairReport:
        """`hessian-server --recover-store` on a PostgreSQL store: migrate it, then repair what
        the open-time check finds (postgres_check.repair), in one transaction under the
        migration lock. Meant for a stopped deployment: it stops the runs it cuts."""
        if password:
            dsn = psycopg.conninfo.make_conninfo(dsn, password=password)
        where = _describe(dsn)
        try:
            with psycopg.connect(dsn, connect_timeout=10) as conn:
                _migrate(conn, where)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    return postgres_check.repair(conn, where)
        except psycopg.Error as exc:
            raise StoreError(f"cannot recover the run store {where}: {exc}") from exc

    # internals
    def _where(self) -> str:
        """The database, for messages, without its password."""
        return _describe(self.dsn)

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosedError(f"the run store {self._where()} is closed (the server stopped)")

    def _error(self, exc: psycopg.Error, action: str = "written") -> StoreError:
        """A StoreError that says what failed and where."""
        if isinstance(exc, psycopg.errors.DiskFull):
            return StoreFullError(f"the run store {self._where()} is full: {exc}")
        return StoreError(f"the run store {self._where()} cannot be {action}: {exc}")

    @contextlib.contextmanager
    def _read(self) -> Iterator[psycopg.Cursor]:
        """A cursor on a pooled connection (its own transaction); errors become StoreError."""
        self._check_open()
        try:
            with self._pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            raise self._error(exc, "read") from exc

    def _fetch_all(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self._read() as cur:
            return cur.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Cursor]:
        """One write transaction under the store's lock (joined when nested).

        Records taken from the queue inside it go back to the queue if it fails; commit
        listeners hear of them once it has committed.
        """
        with self._lock:
            self._check_open()
            if self._cursor is not None:
                yield self._cursor
                return
            self._taken = []
            try:
                with self._pool.connection() as conn, conn.cursor() as cur:
                    self._cursor = cur
                    try:
                        yield cur
                    finally:
                        self._cursor = None
            except BaseException as exc:
                self._pending[:0] = self._taken
                taken, self._taken = self._taken, []
                if isinstance(exc, psycopg.Error):
                    error = self._error(exc)
                    self._failure = error if taken else self._failure
                    raise error from exc
                if isinstance(exc, StoreFullError):  # the size cap, as a full disk would be
                    self._failure = exc if taken else self._failure
                raise
            taken, self._taken = self._taken, []
            if taken:
                self._failure = None
        committed: dict[str, int] = {}
        for run_id, record in taken:
            committed[run_id] = max(committed.get(run_id, -1), record.iteration)
        self._notify_committed(committed)

    def append_record(self, run_id: str, record: StepRecord) -> None:
        """Queue a record, unless a flush found the run's lease lost (LeaseLostError)."""
        with self._lock:
            lost = self._lost.get(run_id)
        if lost is not None:
            raise lost
        super().append_record(run_id, record)

    def _check_fence(self, cur: psycopg.Cursor, run_id: str) -> None:
        """Refuse a write for a run this store leased unless the lease is still its own and
        live: an expired one may be taken over at any moment (by this replica's own scan,
        the lone replica's case), so its stale executor writes nothing more, its end least
        of all. The row stays locked to the commit: no takeover can come in between."""
        generation = self._fences.get(run_id)
        if generation is None:
            return
        row = cur.execute(
            "SELECT generation, expires_at > clock_timestamp() FROM leases WHERE run_id = %s "
            "FOR SHARE",
            (run_id,),
        ).fetchone()
        if row is None or row[0] != generation:
            raise LeaseLostError(run_id, generation)
        if not row[1]:
            raise LeaseLostError(run_id, generation, expired=True)

    @staticmethod
    def _status(cur: psycopg.Cursor, run_id: str, lock: bool = False) -> str | None:
        sql = "SELECT status FROM runs WHERE run_id = %s" + (" FOR UPDATE" if lock else "")
        row = cur.execute(sql, (run_id,)).fetchone()
        return None if row is None else row[0]

    @staticmethod
    def _write_checkpoint(cur: psycopg.Cursor, run_id: str, cp: StoredCheckpoint) -> int:
        """Store `cp` in place of the run's checkpoints up to its iteration; the bytes added."""
        freed = cur.execute(
            "DELETE FROM checkpoints WHERE run_id = %s AND iteration <= %s "
            "RETURNING octet_length(params)",
            (run_id, cp.iteration),
        ).fetchall()
        cur.execute(
            "INSERT INTO checkpoints VALUES (%s, %s, %s, %s, %s, %s)",
            layout.checkpoint_values(run_id, cp),
        )
        added = len(cp.params) - sum(n for (n,) in freed)
        cur.execute(
            "UPDATE runs SET stored_bytes = stored_bytes + %s WHERE run_id = %s", (added, run_id)
        )
        return added

    def _check_cap(self, cur: psycopg.Cursor) -> None:
        """Under `max_bytes`: StoreFullError (the transaction then rolls back) when what the
        store holds, this transaction's writes included, is past the cap."""
        if not self.max_bytes:
            return
        used = cur.execute(USED_BYTES).fetchone()[0]
        if used > self.max_bytes:
            raise StoreFullError(
                f"the run store {self._where()} is full (--max-store-bytes {self.max_bytes}: "
                f"this write would make it {used} bytes); delete runs (DeleteRun, "
                "--max-stored-runs) or problems, or raise the cap"
            )

    def _flush_locked(self, cur: psycopg.Cursor) -> None:
        """Write queued records in the caller's transaction (one statement per run)."""
        if not self._pending:
            return
        for run_id, records in self._take_pending().items():
            try:
                self._check_fence(cur, run_id)
            except LeaseLostError as exc:  # that run alone: the others' records commit
                self._lost[run_id] = exc
                self._taken = [(r, record) for r, record in self._taken if r != run_id]
                continue
            texts = [layout.record_json(r, COMPACT_RECORDS) for r in records]
            cur.execute(
                "WITH added AS (INSERT INTO records SELECT %s, i, r FROM "
                "unnest(%s::bigint[], %s::text[]) AS t(i, r) ON CONFLICT DO NOTHING "
                "RETURNING octet_length(record) AS n) "
                "UPDATE runs SET num_records = num_records + (SELECT COUNT(*) FROM added), "
                "stored_bytes = stored_bytes + (SELECT COALESCE(SUM(n), 0) FROM added), "
                "last_record = %s WHERE run_id = %s",
                (
                    run_id,
                    [r.iteration for r in records],
                    texts,
                    texts[-1],
                    run_id,
                ),
            )
            self._notify(cur, run_id, records[-1].iteration)
        self._check_cap(cur)

    def _notify(self, cur: psycopg.Cursor, run_id: str, iteration: int) -> None:
        """NOTIFY other stores, at this transaction's commit, that the run changed: records up
        to `iteration` committed, or (-1) its row alone."""
        cur.execute(
            "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, f"{self._token} {iteration} {run_id}")
        )

    def _commit_queue(self) -> None:
        with self._write() as cur:
            self._flush_locked(cur)

    def _listen_loop(self) -> None:
        """Pass other stores' record commits (NOTIFY) to the commit listeners; reconnect
        after a lost connection (a commit missed meanwhile is found by the next read)."""
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5):  # 0.5 s: to see close()
                            token, iteration, run_id = note.payload.split(" ", 2)
                            if token != self._token:
                                self._notify_committed({run_id: int(iteration)})
            except psycopg.Error as exc:
                log.warning("run store %s: LISTEN lost (%s); retrying", self._where(), exc)
                self._closed.wait(1.0)


def _describe(dsn: str) -> str:
    """The database a DSN names, for messages, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://?"
    host = info.get("host", "")
    return f"postgresql://{host}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _lock_options(lock_wait_s: float) -> dict[str, str]:
    """The connection options bounding lock waits and idle transactions (none for 0)."""
    if lock_wait_s <= 0:
        return {}
    ms = max(int(lock_wait_s * 1000), 1)
    return {"options": f"-c lock_timeout={ms} -c idle_in_transaction_session_timeout={2 * ms}"}


def _migrate(conn: psycopg.Connection, where: str) -> None:
    """Bring the database to SCHEMA_VERSION, one transaction per version; refuse a newer one
    (waiting, however long, for another replica's migration)."""
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS hessian_meta (key TEXT PRIMARY KEY, value TEXT)")
    while True:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = 0")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            row = conn.execute(
                "SELECT value FROM hessian_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the run store {where} has schema version {version}, newer than this "
                    f"server's {SCHEMA_VERSION}: run a newer hessian-server on it"
                )
            if version == SCHEMA_VERSION:
                return
            target = version + 1
            conn.execute(MIGRATIONS[target])
            conn.execute(
                "INSERT INTO hessian_meta VALUES ('schema_version', %s) ON CONFLICT (key) "
                "DO UPDATE SET value = EXCLUDED.value",
                (str(target),),
            )
            log.info("run store %s migrated to schema version %d", where, target)
