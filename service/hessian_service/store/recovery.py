"""Salvage a damaged SQLite run store: copy every row still readable into a new store.

`hessian-server --recover-store` runs `recover_store`. It reads the damaged file read-only,
table by table in key order; where a damaged page stops a scan it seeks past it (ever larger
jumps in the key), so the rows on intact pages are kept and only those on damaged pages are
lost. The source is read with `PRAGMA writable_schema=ON`: SQLite then takes a file shorter
than its header's page count (truncated) at its real size instead of refusing every read,
even of the header, which lost the rows on every intact page (the connection is read-only,
so nothing is written). The copy is built at the source's schema version, then migrated like
any older store; `num_records` is recounted from the records recovered. The copy is then
made consistent as the PostgreSQL store's repair makes its own (`_repair`): no run keeps
records past a gap, and no run stays resumable without what ResumeRun needs. A file of which
no row of a table with rows is readable is left as it is (StoreError), not replaced by an
empty store.

The damaged file and its -wal and -shm are kept as `runs.sqlite3.damaged` (then `.damaged.1`,
`.damaged.2`, ...: an earlier recovery's copy is never replaced). They are hard-linked to
those names first, and read there; then the live -wal and -shm go and the new store is
renamed over `runs.sqlite3`. A recovery killed midway leaves either the store as it was (plus
the copy's names) or the damaged file without its -wal under `runs.sqlite3`, still the copy's
own file: the server refuses that (`interrupted_recovery`) and a second recovery reads the
copy, whole with its -wal; never a -wal with no store file, which a new store would absorb.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..engine.records import StopReason
from .base import ACTIVE_STATUSES, PROBLEM_PINNING_STATUSES, RunStatus, StoreError
from .dirlock import DataDirLock, StoreFileLock
from .sqlite import MIGRATIONS, SCHEMA, _migrate, interrupted_recovery

MAX_SKIP = 1 << 40
SIDE_FILES = ("-wal", "-shm")
META_TABLES = ("meta",)  # rewritten at every open: rows there alone recover nothing


@dataclass
class RecoveryReport:
    """What `recover_store` kept: rows per table, and the tables where some were lost."""

    path: pathlib.Path
    damaged_copy: pathlib.Path
    rows: dict[str, int] = field(default_factory=dict)
    damaged_tables: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)  # runs whose records after a gap were dropped
    failed: list[str] = field(default_factory=list)  # resumable runs that no longer can be

    def summary(self) -> str:
        """One line for the operator."""
        counts = ", ".join(f"{n} {table}" for table, n in self.rows.items())
        lost = ", ".join(self.damaged_tables) or "none"
        cut = ", ".join(self.cut) or "none"
        failed = ", ".join(self.failed) or "none"
        return (
            f"recovered {self.path} ({counts}); tables with unreadable pages: {lost}; runs cut "
            f"at their first record gap: {cut}; runs no longer resumable, now FAILED: "
            f"{failed}; the damaged file is kept as {self.damaged_copy}"
        )


def _scan(db: sqlite3.Connection, table: str, key: tuple[str, ...]) -> Iterator[tuple]:
    """Rows of `table` in key order, seeking past unreadable pages (never raises for damage).

    A scan that fails resumes after the last key read at ever larger jumps in the key's last
    column; for a two-column key (a run's records) past MAX_SKIP it goes on at the next run.
    A row whose key is NULL or not an integer where one is due is damage, and left out.
    """
    columns, order = ", ".join(key) + ", *", ", ".join(key)
    last: tuple | None = (0,) if key == ("rowid",) else None
    skip = 0
    while True:
        if last is None:
            sql, args = f"SELECT {columns} FROM {table} ORDER BY {order}", ()
        elif skip > MAX_SKIP:
            if len(key) == 1:
                return
            sql = f"SELECT {columns} FROM {table} WHERE {key[0]} > ? ORDER BY {order}"
            args = (last[0],)
        else:
            marks = ", ".join("?" * len(key))
            sql = f"SELECT {columns} FROM {table} WHERE ({order}) > ({marks}) ORDER BY {order}"
            args = (*last[:-1], last[-1] + skip)
        try:
            for row in db.execute(sql, args):
                read = tuple(row[: len(key)])
                if None in read or not isinstance(read[-1], int):
                    continue  # a damaged cell (a page cut short reads as zeros): no row
                last, skip = read, 0
                yield tuple(row[len(key) :])
            return
        except sqlite3.DatabaseError:
            if last is None or skip > MAX_SKIP:
                return  # the first page, or the page after a whole damaged run, is unreadable
            skip = skip * 2 if skip else 1


def recover_store(data_dir: str | pathlib.Path) -> RecoveryReport:
    """Replace `<data_dir>/runs.sqlite3` by a copy of its readable rows (see the module),
    holding the directory and the file (dirlock): never under a live server. Works on the
    file a link there leads to, where SQLite keeps its -wal."""
    path = pathlib.Path(data_dir) / "runs.sqlite3"
    if not path.is_file():
        raise FileNotFoundError(f"no run store at {path}")
    with DataDirLock(data_dir), StoreFileLock(path):
        return _recover(path.resolve())


def _recover(path: pathlib.Path) -> RecoveryReport:
    """Keep the damaged files under the copy's names, build the new store from them, and
    swap it in (the order the module describes); on failure leave the store as it was."""
    fresh = path.with_name(path.name + ".recovered")
    for leftover in (fresh, *(fresh.with_name(fresh.name + s) for s in SIDE_FILES)):
        leftover.unlink(missing_ok=True)
    copy = interrupted_recovery(path) or _free_copy_name(path)
    linked = []
    try:
        for suffix in ("", *SIDE_FILES):
            live, kept = (p.with_name(p.name + suffix) for p in (path, copy))
            if live.exists() and not kept.exists():
                os.link(live, kept)
                linked.append(kept)
        report = RecoveryReport(path, copy)
        _copy_rows(copy, fresh, report)
    except BaseException:
        for name in (fresh, *linked):
            name.unlink(missing_ok=True)
        raise
    for suffix in SIDE_FILES:
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    os.replace(fresh, path)
    return report


def _free_copy_name(path: pathlib.Path) -> pathlib.Path:
    """`runs.sqlite3.damaged`, or the first `.damaged.N` no earlier copy (nor its -wal or
    -shm) uses."""
    names = (f"{path.name}.damaged" + (f".{n}" if n else "") for n in itertools.count())
    return next(
        path.with_name(name)
        for name in names
        if not any(path.with_name(name + s).exists() for s in ("", *SIDE_FILES))
    )


def _copy_rows(source: pathlib.Path, fresh: pathlib.Path, report: RecoveryReport) -> None:
    """Build `fresh` from the readable rows of `source` and repair it (see the module);
    StoreError when no table that had rows gave one."""
    src = sqlite3.connect(source.as_uri() + "?mode=ro", uri=True)
    # a truncated file's header claims more pages than it has: without this SQLite refuses
    # every read; with it, the pages there are read (harmless here: the connection is ro)
    src.execute("PRAGMA writable_schema=ON")
    os.close(os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # as the store's
    dest = sqlite3.connect(fresh, isolation_level=None)
    try:
        try:
            version = src.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError:
            version = 0
        dest.executescript(SCHEMA)
        for target in range(1, version + 1):
            dest.executescript(MIGRATIONS[target])
        dest.execute(f"PRAGMA user_version = {version}")
        tables = [r[0] for r in dest.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        dest.execute("BEGIN")
        for table in tables:
            key = ("run_id", "iteration") if table == "records" else ("rowid",)
            if table == "problem_owners":
                key = ("problem_id", "owner")
            width = len(dest.execute(f"SELECT * FROM {table} LIMIT 0").description)
            marks = ", ".join("?" * width)
            count = 0
            try:
                expected = src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            except sqlite3.DatabaseError:
                expected = -1
            if key == ("problem_id", "owner"):
                rows = _scan_text_keys(src, table, key)
            else:
                rows = _scan(src, table, key)
            for row in rows:
                dest.execute(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", row)
                count += 1
            report.rows[table] = count
            if count != expected:
                report.damaged_tables.append(table)
        lost = [t for t in report.damaged_tables if t not in META_TABLES]
        if lost and not any(n for t, n in report.rows.items() if t not in META_TABLES):
            raise StoreError(
                f"no row could be read from {report.path} (tables with unreadable pages: "
                f"{', '.join(lost)}): the store was left as it is; restore a backup, or move "
                "the file aside and start on an empty --data-dir"
            )
        report.cut, report.failed = _repair(dest)
        dest.execute("COMMIT")
        _migrate(dest, report.path)
    finally:
        src.close()
        dest.close()


def _repair(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
    """Make the copy consistent, as the PostgreSQL store's repair does: records and
    checkpoints of no run go; a run's records after its first gap go (a resumed run would
    otherwise finish with a hole no watcher gets past), its count and last record follow
    the records kept; a run so cut, or one that lost its last records (fewer than its row
    counts), is stopped, INTERRUPTED if it was active, FAILED if its
    checkpoint is past the records kept (resuming would leave a gap), and a resumable run
    without a checkpoint is FAILED (ResumeRun could never continue it).
    Returns (cut, failed) run ids."""
    for table in ("records", "checkpoints"):
        db.execute(f"DELETE FROM {table} WHERE run_id NOT IN (SELECT run_id FROM runs)")
    past_gap = (
        "SELECT run_id, iteration FROM (SELECT run_id, iteration, iteration + 1 - ROW_NUMBER() "
        "OVER (PARTITION BY run_id ORDER BY iteration) AS shift FROM records) WHERE shift <> 0"
    )
    cut = {r[0] for r in db.execute(f"SELECT DISTINCT run_id FROM ({past_gap})")}
    db.execute(f"DELETE FROM records WHERE (run_id, iteration) IN ({past_gap})")
    count = "(SELECT COUNT(*) FROM records r WHERE r.run_id = runs.run_id)"
    # a run whose last records were lost has no gap, only fewer records than its row says
    cut |= {r[0] for r in db.execute(f"SELECT run_id FROM runs WHERE num_records <> {count}")}
    cut = sorted(cut)
    db.execute(
        f"UPDATE runs SET num_records = {count}, last_record = (SELECT record FROM records r "
        "WHERE r.run_id = runs.run_id ORDER BY iteration DESC LIMIT 1)"
    )
    marks = ", ".join("?" * len(cut))
    failed = [
        r[0]
        for r in db.execute(
            "UPDATE runs SET status = ?, stop_reason = ?, message = 'recovered: records after "
            "iteration ' || (num_records - 1) || ' were lost and its checkpoint is later' "
            f"WHERE run_id IN ({marks}) AND (SELECT MAX(iteration) FROM checkpoints c WHERE "
            "c.run_id = runs.run_id) > MAX(num_records - 1, 0) RETURNING run_id",
            (RunStatus.FAILED, StopReason.ERROR, *cut),
        )
    ]
    active = ", ".join("?" * len(ACTIVE_STATUSES))
    db.execute(
        "UPDATE runs SET status = ?, stop_reason = ?, message = 'recovered: records after "
        f"iteration ' || (num_records - 1) || ' were lost' WHERE run_id IN ({marks}) AND "
        f"status IN ({active})",
        (RunStatus.INTERRUPTED, StopReason.ERROR, *cut, *ACTIVE_STATUSES),
    )
    resumable = ", ".join("?" * len(PROBLEM_PINNING_STATUSES))
    failed += [
        r[0]
        for r in db.execute(
            "UPDATE runs SET status = ?, stop_reason = ?, message = 'recovered: no checkpoint "
            f"to resume from' WHERE status IN ({resumable}) AND NOT EXISTS (SELECT 1 FROM "
            "checkpoints c WHERE c.run_id = runs.run_id) RETURNING run_id",
            (RunStatus.FAILED, StopReason.ERROR, *PROBLEM_PINNING_STATUSES),
        )
    ]
    return cut, sorted(failed)


def _scan_text_keys(db: sqlite3.Connection, table: str, key: tuple[str, ...]) -> Iterator[tuple]:
    """Rows of a small table keyed by text: one scan, kept up to the first unreadable page."""
    try:
        for row in db.execute(f"SELECT * FROM {table} ORDER BY {', '.join(key)}"):
            yield tuple(row)
    except sqlite3.DatabaseError:
        return
