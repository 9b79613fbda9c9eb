"""Consistency of a PostgreSQL run store: the check a store runs when it opens, and the repair
`hessian-server --recover-store --store DSN` runs.

PostgreSQL keeps its own pages intact (checksums, WAL), so what can go wrong is the data: a
hand-edited or partially restored database, a bug. The check finds what the server's
guarantees rest on and would silently break: every run's status is one the server knows,
its records are exactly iterations 0..num_records-1 (what WatchRun resumes from), no records,
checkpoints or leases outlive their run, and every resumable run has a checkpoint. Each
check is one statement, so it sees one snapshot even while other replicas write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from ..engine.records import StopReason
from .base import ACTIVE_STATUSES, FINAL_STATUSES, PROBLEM_PINNING_STATUSES, RunStatus

SHOWN = 5  # run ids named per finding
KNOWN = list(ACTIVE_STATUSES + FINAL_STATUSES)
RESUMABLE = list(PROBLEM_PINNING_STATUSES)
ORPHANS = (
    "SELECT DISTINCT run_id FROM {table} x "
    "WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = x.run_id)"
)
# what is wrong -> a query for the run ids (with detail) it is wrong for
CHECKS = {
    "runs with a status the server does not know": (
        "SELECT run_id || ' (' || status || ')' FROM runs WHERE NOT status = ANY(%(known)s)"
    ),
    "runs whose records are not iterations 0..num_records-1": (
        "SELECT r.run_id FROM runs r LEFT JOIN (SELECT run_id, COUNT(*) AS n, "
        "MIN(iteration) AS lo, MAX(iteration) AS hi FROM records GROUP BY run_id) s "
        "USING (run_id) WHERE COALESCE(s.n, 0) <> r.num_records OR s.lo <> 0 OR s.hi <> s.n - 1"
    ),
    "records of runs that do not exist": ORPHANS.format(table="records"),
    "checkpoints of runs that do not exist": ORPHANS.format(table="checkpoints"),
    "leases of runs that do not exist": ORPHANS.format(table="leases"),
    "queued, running or interrupted runs without a checkpoint to resume from": (
        "SELECT run_id FROM runs r WHERE status = ANY(%(resumable)s) "
        "AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.run_id = r.run_id)"
    ),
}
ARGS = {
    "known": KNOWN,
    "resumable": RESUMABLE,
    "limit": SHOWN + 1,
    "interrupted": RunStatus.INTERRUPTED,
    "failed": RunStatus.FAILED,
    "error": StopReason.ERROR,
}


def inconsistencies(conn: psycopg.Connection) -> list[str]:
    """What is inconsistent, one line per kind naming up to SHOWN runs; [] when all holds."""
    found = []
    for what, query in CHECKS.items():
        rows = conn.execute(f"{query} ORDER BY 1 LIMIT %(limit)s", ARGS).fetchall()
        if rows:
            ids = ", ".join(str(r[0]) for r in rows[:SHOWN])
            found.append(f"{what}: {ids}" + (", ..." if len(rows) > SHOWN else ""))
    return found


def refusal(where: str, found: list[str]) -> str:
    """Why a store is refused at open, and what the operator can do."""
    return (
        f"the run store {where} is inconsistent ({'; '.join(found)}). Stop every replica and "
        f"run `hessian-server --recover-store --store {where}` (with --store-password-file if "
        "needed): it removes what belongs to no run, keeps each run's records up to its first "
        "gap and stops the runs it truncated; or start with --skip-store-check to serve anyway"
    )


@dataclass
class RepairReport:
    """What `repair` changed: rows removed per kind, and the runs it changed."""

    where: str
    removed: dict[str, int] = field(default_factory=dict)
    unknown_status: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the operator."""
        removed = ", ".join(f"{n} {what}" for what, n in self.removed.items())
        return (
            f"recovered {self.where}: removed {removed}; runs with an unknown status made "
            f"INTERRUPTED: {len(self.unknown_status)}; runs cut at their first record gap: "
            f"{len(self.truncated)} ({len(self.failed)} of them FAILED: their checkpoint is "
            "past the records kept)"
        )


def repair(conn: psycopg.Connection, where: str) -> RepairReport:
    """Make the store pass `inconsistencies`, in one transaction (the caller's lock held).

    Orphaned records, checkpoints and leases are deleted; an unknown status becomes
    INTERRUPTED; a run's records after its first gap are deleted and its count recounted; a
    run cut so has its lease removed and becomes INTERRUPTED (if it was active) or FAILED
    (its checkpoint is past the records kept, so resuming it would leave a gap); a resumable
    run without a checkpoint becomes FAILED. Every run's stored bytes are recounted.
    """
    report = RepairReport(where)
    for table in ("records", "checkpoints", "leases"):
        cur = conn.execute(
            f"DELETE FROM {table} x WHERE NOT EXISTS (SELECT 1 FROM runs r "
            "WHERE r.run_id = x.run_id)"
        )
        report.removed[f"orphaned {table}"] = cur.rowcount
    report.unknown_status = _ids(
        conn,
        "UPDATE runs SET status = %(interrupted)s, stop_reason = %(error)s, message = "
        "'recovered: the stored status ' || status || ' is not one the server knows' "
        "WHERE NOT status = ANY(%(known)s) RETURNING run_id",
    )
    cur = conn.execute(
        "DELETE FROM records x USING (SELECT run_id, iteration, iteration + 1 - "
        "ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY iteration) AS shift FROM records) s "
        "WHERE x.run_id = s.run_id AND x.iteration = s.iteration AND s.shift <> 0 "
        "RETURNING x.run_id"
    )
    report.removed["records after a gap"] = cur.rowcount
    cut = sorted({r[0] for r in cur.fetchall()})
    recounted = _ids(
        conn,
        "UPDATE runs SET num_records = s.n, last_record = (SELECT record FROM records y "
        "WHERE y.run_id = runs.run_id ORDER BY iteration DESC LIMIT 1) FROM (SELECT r.run_id, "
        "COUNT(x.iteration) AS n FROM runs r LEFT JOIN records x USING (run_id) "
        "GROUP BY r.run_id) s WHERE runs.run_id = s.run_id AND runs.num_records <> s.n "
        "RETURNING runs.run_id",
    )
    report.truncated = sorted(set(cut) | set(recounted))
    conn.execute("DELETE FROM leases WHERE run_id = ANY(%s)", (report.truncated,))
    report.failed = _ids(
        conn,
        "UPDATE runs r SET status = %(failed)s, stop_reason = %(error)s, message = 'recovered: "
        "records after iteration ' || (r.num_records - 1) || ' were lost and its checkpoint "
        "is later' WHERE r.run_id = ANY(%(cut)s) AND (SELECT MAX(iteration) FROM checkpoints c "
        "WHERE c.run_id = r.run_id) > GREATEST(r.num_records - 1, 0) RETURNING r.run_id",
        cut=report.truncated,
    )
    conn.execute(
        "UPDATE runs SET status = %(interrupted)s, stop_reason = %(error)s, message = 'recovered: "
        "records after iteration ' || (num_records - 1) || ' were lost' "
        "WHERE run_id = ANY(%(cut)s) AND status = ANY(%(active)s)",
        {**ARGS, "cut": report.truncated, "active": list(ACTIVE_STATUSES)},
    )
    report.failed += _ids(
        conn,
        "UPDATE runs r SET status = %(failed)s, stop_reason = %(error)s, message = 'recovered: "
        "no checkpoint to resume from' WHERE status = ANY(%(resumable)s) AND NOT EXISTS "
        "(SELECT 1 FROM checkpoints c WHERE c.run_id = r.run_id) RETURNING r.run_id",
    )
    conn.execute(
        "UPDATE runs SET stored_bytes = "
        "COALESCE((SELECT SUM(octet_length(record)) FROM records x "
        "WHERE x.run_id = runs.run_id), 0) + COALESCE((SELECT SUM(octet_length(params)) "
        "FROM checkpoints c WHERE c.run_id = runs.run_id), 0)"
    )
    return report


def _ids(conn: psycopg.Connection, sql: str, **extra: object) -> list[str]:
    """Run an UPDATE ... RETURNING run_id with the shared arguments; the ids, sorted."""
    return sorted(r[0] for r in conn.execute(sql, {**ARGS, **extra}).fetchall())
