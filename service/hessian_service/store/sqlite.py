"""SQLite run store (WAL mode) under the data directory: the embedded default.

Records are queued in memory and committed in one transaction when `commit_every`
records (over all runs) are waiting or `commit_interval_s` has passed since the oldest
(a background thread wakes exactly then), and always before a status change or a
checkpoint. Only then are they acknowledged: commit listeners hear of them, readers
(`records`, `get_run`) see them, and the server streams them to watchers.

Durability, precisely: a record a client has received (record k of a run) is in the
WAL before the client could see it. A crash of the process (SIGKILL, out of memory)
loses nothing acknowledged; it loses at most the unacknowledged tail, the records of
the open batch (fewer than `commit_every`, computed in the last `commit_interval_s`).
With `synchronous=NORMAL` (the default) an operating-system crash or power loss may
also roll back the last commits, acknowledged or not, but never corrupts the file;
`synchronous=FULL` fsyncs every commit so acknowledged records survive that too.
A write that fails (disk full, `max_bytes` reached, unwritable directory) raises
StoreError / StoreFullError and keeps the queued records queued. Under `max_bytes` the
last few pages (RESERVE_PAGES at most) are kept for run status changes and deletes, so a
run that the full store stopped can still be marked INTERRUPTED.

Integrity: an existing file is checked with `PRAGMA quick_check` when opened (unless
`check_integrity=False`) and refused, naming the file and the recovery command, when it is
damaged or empty; a new store is built under a temporary name and renamed into place, so a
zero-length `runs.sqlite3` is never one this store made. A new store is refused beside a
leftover `runs.sqlite3-wal` (the log of a store that is gone, which SQLite would replay into
it), and so is a file a killed `--recover-store` left half swapped (see recovery). A read
or write that meets a damaged page raises StoreCorruptError. The schema is versioned
(`PRAGMA user_version`); an older file is migrated in place, in one transaction per version,
when opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..engine.errors import clip
from ..engine.records import StepRecord, StopReason
from . import layout
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
    StoreGoneError,
)
from .dirlock import DataDirLock, StoreFileLock
from .queue import RecordQueue
from .sql_reads import SqlReads

# version 0: the tables as first released (a store without user_version has exactly these)
SCHEMA = """
CREATE TABLE IF NOT EXISTS problems (
    problem_id TEXT PRIMARY KEY, blob BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, problem_id TEXT NOT NULL, spec TEXT NOT NULL, name TEXT,
    status TEXT NOT NULL, stop_reason TEXT, converged INTEGER, message TEXT, backend TEXT,
    created_at REAL, started_at REAL, finished_at REAL, num_records INTEGER NOT NULL,
    last_record TEXT);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_at DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS records (
    run_id TEXT NOT NULL, iteration INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (run_id, iteration)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, iteration INTEGER NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    params BLOB NOT NULL, state TEXT NOT NULL, PRIMARY KEY (run_id, iteration));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# MIGRATIONS[v] takes a store from version v - 1 to v, in one transaction (no ';' in literals)
MIGRATIONS = {
    # tenants: runs and problems belong to an owner; what existed before is the anonymous
    # tenant's. A problem's size is kept beside its holds, for retention by bytes without
    # reading the blobs (a column after a blob is reached through its overflow pages). No
    # new indexes: each costs pages a store under --max-store-bytes would give to records.
    1: f"""
ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT '{ANONYMOUS_OWNER}';
CREATE TABLE problem_owners (
    problem_id TEXT NOT NULL, owner TEXT NOT NULL, used_at REAL NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (problem_id, owner)) WITHOUT ROWID;
INSERT INTO problem_owners
    SELECT problem_id, '{ANONYMOUS_OWNER}', created_at, length(blob) FROM problems;
""",
    # records written as layout arrays (layout.RECORD_LAYOUTS), which an older server cannot
    # read: no statement, the version alone makes an older server refuse the store
    2: "",
}
SCHEMA_VERSION = max(MIGRATIONS)
COMPACT_RECORDS = True  # layout arrays (layout.record_json); version 2 keeps older servers out
FULL_CODES = ("SQLITE_FULL",)
CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
RESERVE_PAGES = 16
RUN_PAGES = 2  # a short run's rows and records, past the tables' first pages
log = logging.getLogger(__name__)


def _reserve_for(pages: int) -> int:
    """Pages held back under a cap of `pages` for deletes and a run's end (0: no cap)."""
    return min(RESERVE_PAGES, max(2, pages // 16), pages // 4)


class SQLiteRunStore(RecordQueue, SqlReads):
    """The RunStore in one SQLite file (`runs.sqlite3` under `data_dir`)."""

    MARK = "?"

    def __init__(
        self,
        data_dir: str | pathlib.Path,
        *,
        commit_every: int = 256,
        commit_interval_s: float = 0.2,
        max_bytes: int = 0,
        synchronous: str = "NORMAL",
        check_integrity: bool = True,
        exclusive: bool = False,
    ) -> None:
        """Open (creating) the store, check and migrate it, and prove it writable.

        `exclusive` (a server's store): hold `data_dir` and the database file (dirlock)
        until close, refusing a directory or a file another process holds. Raises OSError,
        StoreError (DataDirInUseError), or StoreCorruptError for a damaged or empty file.
        """
        self.path = pathlib.Path(data_dir) / "runs.sqlite3"
        self.commit_every = commit_every
        self.commit_interval_s = commit_interval_s
        self.max_bytes = max_bytes
        self._dir_lock = DataDirLock(data_dir) if exclusive else None  # it checks the folder
        self._file_lock: StoreFileLock | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open_file(synchronous, check_integrity, exclusive)
        except BaseException:
            if getattr(self, "_db", None) is not None:
                self._db.close()  # before the file lock goes: its close drops SQLite's locks
            for lock in (self._file_lock, self._dir_lock):
                if lock is not None:
                    lock.release()
            raise

    def _open_file(self, synchronous: str, check_integrity: bool, exclusive: bool) -> None:
        """The constructor's work once the directory is held."""
        self._lock = threading.RLock()
        self._pending: list[tuple[str, StepRecord]] = []
        self._taken: list[tuple[str, StepRecord]] = []
        self._oldest_pending = 0.0
        self._failure: StoreError | None = None
        self._open = True
        # under max_bytes: full until records commit or a run is deleted; no new runs till then
        self._full: StoreFullError | None = None
        self._wake = threading.Condition(self._lock)
        try:
            fresh = not self.path.exists()
            if fresh:
                self._refuse_orphan_log()
                self._create()
            elif self.path.is_file() and self.path.stat().st_size == 0:
                raise StoreCorruptError(self._damaged("the file is empty (0 bytes)"))
            else:
                self._refuse_half_recovered()
            self._file_lock = StoreFileLock(self.path) if exclusive else None
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._identity = _file_identity(self.path)  # the file every commit must still be
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            if check_integrity and not fresh:
                self._check_integrity()
            _migrate(self._db, self.path)
            page = self._db.execute("PRAGMA page_size").fetchone()[0]
            self._opened_pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._pages = max(self.max_bytes // page, 1) if self.max_bytes else 0
            self._reserve = _reserve_for(self._pages)
            self._check_cap(page)
            if self._pages:
                self._bound_log(page)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        self._wal_identity: tuple[int, int] | None = None  # known once the log exists
        with self._write():  # a real write now, so an unwritable store fails at start-up
            self._use_reserve()  # one row: a store filled to its cap still starts
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('opened_at', ?)", (str(time.time()),)
            )
        self._wal_identity = _file_identity(self._wal_path)  # kept until the last close
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="store-flush", daemon=True)
        self._flusher.start()

    # problems
    def put_problem(self, problem_id: str, blob: bytes, owner: str = ANONYMOUS_OWNER) -> None:
        now = time.time()
        with self._write():
            self._db.execute(
                "INSERT OR IGNORE INTO problems VALUES (?, ?, ?)", (problem_id, blob, now)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO problem_owners VALUES (?, ?, ?, ?)",
                (problem_id, owner, now, len(blob)),
            )

    def delete_problem(self, problem_id: str, owner: str | None = None) -> bool:
        pins = ", ".join("?" * len(PROBLEM_PINNING_STATUSES))
        users_sql = f"SELECT run_id FROM runs WHERE problem_id = ? AND status IN ({pins})"
        users_args: list[Any] = [problem_id, *PROBLEM_PINNING_STATUSES]
        held_sql = "SELECT COUNT(*) FROM problems WHERE problem_id = ?"
        held_args: list[Any] = [problem_id]
        if owner is not None:
            users_sql += " AND owner = ?"
            users_args.append(owner)
            held_sql = "SELECT COUNT(*) FROM problem_owners WHERE problem_id = ? AND owner = ?"
            held_args.append(owner)
        with self._write():
            if not self._db.execute(held_sql, held_args).fetchone()[0]:
                return False  # checked first: nobody learns of runs on a problem not theirs
            users = [r[0] for r in self._db.execute(users_sql + " ORDER BY run_id", users_args)]
            if users:
                raise ProblemInUseError(problem_id, users)
            self._use_reserve()
            if owner is None:
                self._db.execute("DELETE FROM problem_owners WHERE problem_id = ?", (problem_id,))
            else:
                self._db.execute(
                    "DELETE FROM problem_owners WHERE problem_id = ? AND owner = ?",
                    (problem_id, owner),
                )
            cur = self._db.execute(
                "DELETE FROM problems WHERE problem_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM problem_owners WHERE problem_id = ?)",
                (problem_id, problem_id),
            )
            if cur.rowcount:
                self._full = None  # its pages are free again
        return True

    def enforce_problem_retention(self, max_bytes: int, keep: Sequence[str] = ()) -> list[str]:
        pins = ", ".join("?" * len(PROBLEM_PINNING_STATUSES))
        with self._write():
            held = self._db.execute(layout.HELD_PROBLEMS).fetchall()
            if sum(size for _, size, _ in held) <= max_bytes:
                return []
            pinned = {
                r[0]
                for r in self._db.execute(
                    f"SELECT DISTINCT problem_id FROM runs WHERE status IN ({pins})",
                    PROBLEM_PINNING_STATUSES,
                )
            }
            self._use_reserve()
            deleted = layout.problems_to_evict(held, pinned | set(keep), max_bytes)
            for pid in deleted:
                self._db.execute("DELETE FROM problem_owners WHERE problem_id = ?", (pid,))
                self._db.execute("DELETE FROM problems WHERE problem_id = ?", (pid,))
            if deleted:
                self._full = None
        return deleted

    # runs
    def require_room(self) -> None:
        with self._lock:
            if self._full is not None and self._pages:
                raise self._full  # only a delete frees room under the cap (a disk may grow)

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return self._write()

    def create_run(
        self, row: RunRow, checkpoint: StoredCheckpoint, *, require_problem: bool = False
    ) -> None:
        values = layout.row_values(row, COMPACT_RECORDS)
        with self._write():
            self._flush_locked()  # a store that cannot commit what it has takes no new run
            self.require_room()
            if require_problem:
                cur = self._db.execute(
                    "UPDATE problem_owners SET used_at = ? WHERE owner = ? AND problem_id = ?",
                    (time.time(), row.owner, row.problem_id),
                )
                if cur.rowcount == 0:  # deleted (or evicted) since the request resolved it
                    raise ProblemNotFoundError(row.problem_id)
            self._db.execute(
                f"INSERT INTO runs ({', '.join(layout.ROW_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(layout.ROW_FIELDS))})",
                values,
            )
            self._write_checkpoint(row.run_id, checkpoint)

    def update_run(self, run_id: str, *, expect_status: Sequence[str] = (), **values: Any) -> None:
        encoded = layout.encode_fields(values, COMPACT_RECORDS)
        where, args = "run_id = ?", [run_id]
        if expect_status:
            where += f" AND status IN ({', '.join('?' * len(expect_status))})"
            args += list(expect_status)
        with self._write():
            self._flush_locked()
            self._use_reserve()
            cur = self._db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in encoded)} WHERE {where}",
                (*encoded.values(), *args),
            )
            missed = self._status(run_id) if cur.rowcount == 0 else None
        if cur.rowcount == 0:
            layout.refuse(run_id, missed, expect_status)

    def delete_run(self, run_id: str, statuses: Sequence[str] = ()) -> bool:
        with self._write():
            self._flush_locked()
            status = self._status(run_id)
            if statuses and status is not None and status not in statuses:
                layout.refuse(run_id, status, statuses)
            self._use_reserve()
            cur = self._db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM records WHERE run_id = ?", (run_id,))
            self._db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            if cur.rowcount:
                self._full = None  # its pages are free for new records
        return cur.rowcount > 0

    def enforce_retention(self, max_runs: int, keep: str = "") -> list[str]:
        marks = ", ".join("?" * len(ENDED_STATUSES))
        with self._write():
            total = self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            if total <= max_runs:
                return []
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT run_id FROM runs WHERE status IN ({marks}) AND run_id <> ? "
                    "ORDER BY created_at, run_id LIMIT ?",
                    (*ENDED_STATUSES, keep, total - max_runs),
                )
            ]
            for run_id in ids:
                self.delete_run(run_id)
        return ids

    def count_runs_by_status(self) -> dict[str, int]:
        with self._read():
            rows = self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        return dict(rows)

    def mark_interrupted(self, message: str) -> list[str]:
        with self._write():
            marks = ", ".join("?" * len(ACTIVE_STATUSES))
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT run_id FROM runs WHERE status IN ({marks})", ACTIVE_STATUSES
                )
            ]
            self._use_reserve()
            self._db.execute(
                "UPDATE runs SET status = ?, stop_reason = ?, message = ? "
                f"WHERE status IN ({marks})",
                (RunStatus.INTERRUPTED, StopReason.SHUTDOWN, message, *ACTIVE_STATUSES),
            )
        return ids

    # records
    def records(self, run_id: str, from_iteration: int, limit: int) -> list[StepRecord]:
        with self._read():
            rows = self._db.execute(  # as bytes: text that is not UTF-8 fails its row alone
                "SELECT CAST(record AS BLOB) FROM records WHERE run_id = ? AND iteration >= ? "
                "ORDER BY iteration LIMIT ?",
                (run_id, from_iteration, limit),
            ).fetchall()
        return layout.records_from_json([r[0] for r in rows])

    # checkpoints
    def put_checkpoint(self, run_id: str, checkpoint: StoredCheckpoint) -> None:
        with self._write():
            self._flush_locked()
            self._write_checkpoint(run_id, checkpoint)

    def finish_run(self, run_id: str, checkpoint: StoredCheckpoint, **fields: Any) -> None:
        with self._write():
            self._flush_locked()
            self._write_checkpoint(run_id, checkpoint)
            self.update_run(run_id, **fields)  # joins this transaction

    def close(self) -> None:
        if not self._stop_flusher():
            return
        with self._lock:
            try:
                self.flush()
            finally:
                self._db.close()
                self._open = False
                for lock in (self._file_lock, self._dir_lock):
                    if lock is not None:
                        lock.release()

    # internals
    def _create(self) -> None:
        """Build an empty store under a temporary name, then rename it into place."""
        tmp = self.path.with_name(self.path.name + ".new")
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)  # a creation a crash interrupted
        # owner-only: it holds every tenant's data (SQLite gives its -wal and -shm files the
        # database file's mode; the umask alone left all three readable by every local user)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            _migrate(db, self.path)
        finally:
            db.close()
        os.replace(tmp, self.path)

    def _refuse_orphan_log(self) -> None:
        """Refuse to create a store beside a non-empty -wal with no store file: SQLite would
        replay that foreign log into the new file (corrupting it, or bringing back runs)."""
        wal = self._wal_path
        if not wal.is_file() or wal.stat().st_size == 0:
            return
        shm = self.path.with_name(self.path.name + "-shm")
        found = f"{wal} and {shm} are" if shm.exists() else f"{wal} is"
        raise StoreError(
            f"the run store {self.path} does not exist but {found} there: the write-ahead log "
            "of a store file that was moved or deleted without it, or that an interrupted "
            "--recover-store left; it may hold the only copy of runs, so it is neither used "
            f"nor deleted: put its store file back as {self.path} (and run --recover-store if "
            f"it is damaged), or move them out of {self.path.parent}, then start again"
        )

    def _refuse_half_recovered(self) -> None:
        """Refuse a store file a killed --recover-store left in place (still its damaged
        copy's file, maybe without its -wal): that recovery has to be run again first."""
        copy = interrupted_recovery(self.path.resolve())  # where a link leads recovery too
        if copy is not None:
            raise StoreCorruptError(
                f"the run store {self.path} is the same file as {copy}: a `--recover-store` "
                "was stopped before it put the new store in place; run `hessian-server "
                f"--recover-store --data-dir {self.path.parent}` again to finish it"
            )

    def _check_integrity(self) -> None:
        """PRAGMA quick_check; StoreCorruptError naming the damage when it is not clean."""
        found = [r[0] for r in self._db.execute("PRAGMA quick_check(5)").fetchall()]
        if found != ["ok"]:
            raise StoreCorruptError(self._damaged("; ".join(found)))

    def _damaged(self, what: object) -> str:
        """Why the store is refused and how to recover what it still holds."""
        p = self.path
        return (
            f"the run store {p} is damaged ({clip(str(what))}). Stop the "
            f"server and run `hessian-server --recover-store --data-dir {p.parent}`: it copies "
            f"every readable row into a new {p.name} and keeps the damaged file as "
            f"{p.name}.damaged (.damaged.1, .2, ... after the first); or start on an empty "
            "--data-dir"
        )

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """A read under the lock; sqlite errors become StoreError (StoreCorruptError)."""
        with self._lock:
            self._check_open()
            try:
                yield
            except sqlite3.Error as exc:
                raise self._error(exc, "read") from exc

    def _fetch_all(self, sql: str, args: Sequence[Any]) -> list[Any]:
        with self._read():
            return self._db.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        """Raise StoreClosedError once close() has run (a late worker's write, a late read)."""
        if not self._open:
            raise StoreClosedError(f"the run store {self.path} is closed (the server stopped)")

    def _check_cap(self, page: int) -> None:
        """Refuse a max_bytes that cannot hold one short run even in an empty store: its
        tables' first pages, the reserve, and a run's own rows (a cap met later, by runs,
        is a full store, not this)."""
        if not self._pages:
            return
        trees = self._db.execute("SELECT count(*) FROM sqlite_master WHERE rootpage > 0")
        need = trees.fetchone()[0] + 1 + RUN_PAGES
        pages = need
        while pages < need + _reserve_for(pages):
            pages += 1
        floor = pages * page
        if self.max_bytes < floor:
            self._db.close()
            raise StoreError(
                f"--max-store-bytes {self.max_bytes} cannot hold a run: an empty store "
                f"{self.path} takes its tables' first pages and a reserve, so give at least "
                f"{floor} bytes ({page}-byte pages), or 0 for no cap"
            )

    def _bound_log(self, page: int) -> None:
        """Under max_bytes: the write-ahead log is checkpointed into the store, and cut back,
        once it holds an eighth of the cap's pages (at most 1,000). SQLite's default (1,000
        pages, never cut) kept 3 MB of records in runs.sqlite3-wal beside a 48 kB file under a
        1 MiB cap: the cap bounded the file, not the disk."""
        pages = min(max(self._pages // 8, 16), 1000)  # never later than SQLite's default
        self._db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self._db.execute(f"PRAGMA journal_size_limit={pages * page}")

    def _at_cap(self) -> bool:
        """Under max_bytes: the pages in use leave no room for a short run's rows beside the
        reserve (a write that failed here failed for want of room, not for its own size)."""
        used = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return used - free + RUN_PAGES >= self._pages - self._reserve

    def _use_reserve(self, use: bool = True) -> None:
        """Under max_bytes: let the rest of this transaction use the reserved pages, or not.
        A store already past the cap (lowered since, or a crash's log replayed) gets the
        reserve's pages beyond its size at open, once: its deletes and status changes must
        still go in, and it grows no further."""
        if self._pages:
            pages = self._pages if use else self._pages - self._reserve
            if use and self._opened_pages > self._pages:  # (else the cap's last pages)
                pages = self._opened_pages + self._reserve
            self._db.execute(f"PRAGMA max_page_count={max(pages, 1)}")

    def _status(self, run_id: str) -> str | None:
        """The run's stored status, or None (inside the caller's transaction)."""
        row = self._db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else row[0]

    def _error(self, exc: sqlite3.Error, action: str = "written") -> StoreError:
        """A StoreError that says what failed, where, and what to do."""
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(CORRUPT_CODES) or "malformed" in str(exc) or "decode" in str(exc):
            return StoreCorruptError(self._damaged(exc))
        if name in FULL_CODES or "full" in str(exc):
            if self.max_bytes:  # the cap keeps reserve pages: deleting runs can proceed
                return StoreFullError(
                    f"the run store {self.path} is full (--max-store-bytes {self.max_bytes}): "
                    f"{exc}; raise the cap or delete runs (DeleteRun, --max-stored-runs)"
                )
            # the disk itself: a delete needs room in the write-ahead log too, so it fails
            # alike (no reserve without a cap)
            return StoreFullError(
                f"the run store {self.path} is full: {exc}; the disk holding it has no room "
                "left (a DeleteRun needs some too): free space on it, then delete runs or set "
                "--max-store-bytes below the disk's size, which keeps room for deletes"
            )
        return StoreError(f"the run store {self.path} cannot be {action}: {exc} ({name})")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (joined when nested); sqlite errors become StoreError.

        Records taken from the queue inside it go back to the queue if it fails, and
        commit listeners hear of them once it has committed.
        """
        committed: dict[str, int] = {}
        taken: list[tuple[str, StepRecord]] = []
        with self._lock:
            self._check_open()
            if self._db.in_transaction:
                yield
                return
            try:
                self._use_reserve(False)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._check_identity()
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._pending[:0] = self._taken
                    raise
                finally:
                    taken, self._taken = self._taken, []
            except StoreGoneError as exc:  # its queued records' failure, as below
                self._failure = exc if taken else self._failure
                raise
            except sqlite3.Error as exc:
                error = self._error(exc)
                self._failure = error if taken else self._failure
                if isinstance(error, StoreFullError) and (taken or self._at_cap()):
                    self._full = error  # (one write too big for a roomy store marks nothing)
                raise error from exc
            if taken:
                self._failure = self._full = None
            for run_id, record in taken:
                committed[run_id] = max(committed.get(run_id, -1), record.iteration)
        self._notify_committed(committed)

    @property
    def _wal_path(self) -> pathlib.Path:
        return self.path.with_name(self.path.name + "-wal")

    def _check_identity(self) -> None:
        """Refuse to commit into a store file, or a write-ahead log, that is no longer at its
        path (deleted with the data directory, or replaced): SQLite would write on into the
        unlinked file, every write acknowledged and gone at the next start (the log's
        commits reach the store file only at a checkpoint)."""
        if _file_identity(self.path) == self._identity and (
            self._wal_identity is None or _file_identity(self._wal_path) == self._wal_identity
        ):
            return
        raise StoreGoneError(
            f"the run store {self.path} (or its -wal log) was deleted or replaced while this "
            "server ran (its data directory removed?): nothing more is stored; stop the "
            "server and put --data-dir back (what this server stored since is lost)"
        )

    def _write_checkpoint(self, run_id: str, cp: StoredCheckpoint) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
            layout.checkpoint_values(run_id, cp),
        )
        self._db.execute(
            "DELETE FROM checkpoints WHERE run_id = ? AND iteration < ?", (run_id, cp.iteration)
        )

    def _flush_locked(self) -> None:
        """Write queued records (caller holds the lock inside a transaction)."""
        if not self._pending:
            return
        for run_id, records in self._take_pending().items():
            texts = [layout.record_json(r, COMPACT_RECORDS) for r in records]
            cur = self._db.executemany(
                "INSERT OR IGNORE INTO records VALUES (?, ?, ?)",
                [(run_id, r.iteration, t) for r, t in zip(records, texts, strict=True)],
            )
            self._db.execute(
                "UPDATE runs SET num_records = num_records + ?, last_record = ? WHERE run_id = ?",
                (max(cur.rowcount, 0), texts[-1], run_id),
            )

    def _commit_queue(self) -> None:
        with self._write():
            self._flush_locked()


def _file_identity(path: pathlib.Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def damaged_copies(path: pathlib.Path) -> list[pathlib.Path]:
    """The damaged files --recover-store kept beside `path`: `.damaged`, `.damaged.N`."""
    stem = path.name + ".damaged"
    return sorted(
        p
        for p in path.parent.glob(stem + "*")
        if p.name == stem or (p.name.startswith(stem + ".") and p.name[len(stem) + 1 :].isdigit())
    )


def interrupted_recovery(path: pathlib.Path) -> pathlib.Path | None:
    """The damaged copy that is still `path`'s own file (a hard link to it): a recovery was
    killed after keeping the copy, before the new store replaced `path`. None if none is."""
    for copy in damaged_copies(path):
        with contextlib.suppress(OSError):
            if os.path.samefile(copy, path):
                return copy
    return None


def _migrate(db: sqlite3.Connection, path: pathlib.Path) -> None:
    """Bring the store to SCHEMA_VERSION, one transaction per version (nothing if current)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the run store {path} has schema version {version}, newer than this server's "
            f"{SCHEMA_VERSION}: run a newer hessian-server on it"
        )
    if version == SCHEMA_VERSION:
        return
    db.executescript(SCHEMA)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            # another process opening the same store may have migrated it meanwhile
            if db.execute("PRAGMA user_version").fetchone()[0] < target:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
                log.info("run store %s migrated to schema version %d", path, target)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
