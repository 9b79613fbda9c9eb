"""The reads both SQL stores answer the same way: a problem, a run, a page of runs and the
latest checkpoint, each query written once with the driver's placeholder (`MARK`); a store
supplies only `_fetch_all`, how it runs a read."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from . import layout
from .base import RunRow, RunStore, StoredCheckpoint


class SqlReads(RunStore):
    """RunStore's read queries over a DB-API connection; subclasses set MARK and _fetch_all."""

    MARK: str  # the driver's placeholder: '?' (sqlite3) or '%s' (psycopg)

    @abstractmethod
    def _fetch_all(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """Every row of one read query (the store's read lock or connection, its errors)."""

    def _fetch_one(self, sql: str, args: Sequence[Any]) -> Any:
        """The first row of a query that finds at most one, or None."""
        rows = self._fetch_all(sql, args)
        return rows[0] if rows else None

    def get_problem(self, problem_id: str, owner: str | None = None) -> bytes | None:
        row = self._problem_row("blob", problem_id, owner)
        return None if row is None else bytes(row[0])

    def has_problem(self, problem_id: str, owner: str | None = None) -> bool:
        return self._problem_row("1", problem_id, owner) is not None

    def _problem_row(self, columns: str, problem_id: str, owner: str | None) -> Any:
        """`columns` of the problem, if stored (and held by `owner`, unless None)."""
        m = self.MARK
        sql, args = f"SELECT {columns} FROM problems WHERE problem_id = {m}", [problem_id]
        if owner is not None:
            sql += (
                f" AND EXISTS (SELECT 1 FROM problem_owners WHERE problem_id = {m} AND owner = {m})"
            )
            args += [problem_id, owner]
        return self._fetch_one(sql, args)

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._fetch_one(
            f"SELECT {', '.join(layout.ROW_FIELDS)} FROM runs WHERE run_id = {self.MARK}", (run_id,)
        )
        return None if row is None else layout.decode_row(row)

    def list_runs(
        self,
        statuses: Sequence[str],
        limit: int,
        after: tuple[float, str] | None,
        owner: str | None = None,
    ) -> list[RunRow]:
        sql, args = layout.list_runs_query(self.MARK, statuses, limit, after, owner)
        return [layout.decode_row(r) for r in self._fetch_all(sql, args)]

    def newest_created_at(self) -> float:
        row = self._fetch_one("SELECT MAX(created_at) FROM runs", ())
        return float(row[0]) if row is not None and row[0] is not None else 0.0

    def latest_checkpoint(self, run_id: str) -> StoredCheckpoint | None:
        row = self._fetch_one(
            f"SELECT {layout.CHECKPOINT_COLUMNS} FROM checkpoints "
            f"WHERE run_id = {self.MARK} ORDER BY iteration DESC LIMIT 1",
            (run_id,),
        )
        return layout.decode_checkpoint(row)
