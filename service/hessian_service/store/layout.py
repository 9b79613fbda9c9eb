"""How runs, records and checkpoints are laid out as rows, shared by the SQLite and PostgreSQL
stores: the run columns and their encodings (JSON text, 0/1), the checkpoint columns, the
run-listing query (newest first, keyset paging) and the error a conditional write raises.

Both stores write the same text, so a row means the same in either; the SQL uses `mark` for
the driver's placeholder ('?' for sqlite3, '%s' for psycopg) and no dialect-only syntax.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, NoReturn

from ..engine.records import StepRecord
from .base import (
    RunConflictError,
    RunNotFoundError,
    RunRow,
    StoreCorruptError,
    StoredCheckpoint,
    StoreError,
)

ROW_FIELDS = [f.name for f in fields(RunRow)]
RECORD_FIELDS = {f.name for f in fields(StepRecord)}
CHECKPOINT_COLUMNS = "iteration, dtype, shape, params, state"
# every stored problem once: (id, bytes, last use by any owner), least recently used first
HELD_PROBLEMS = (
    "SELECT problem_id, MAX(bytes), MAX(used_at) AS used FROM problem_owners "
    "GROUP BY problem_id ORDER BY used, problem_id"
)


# A record is stored as a JSON array: its layout number, then its values in that layout's
# field order (a third of the bytes of a JSON object, and faster both ways: a record is
# written once per iteration). A layout is never changed once released: a new StepRecord
# field gets a new number (tests/service/test_store_record_layout.py holds the newest one
# to StepRecord's fields). Records written as JSON objects, before layouts, still read.
RECORD_LAYOUTS = {
    1: (
        "iteration", "loss", "loss_change", "gradient_norm", "gradient_max_norm", "step_norm",
        "step_size", "damping", "gain_ratio", "step_accepted", "negative_eigenvalues",
        "solver_attempts", "function_evaluations", "cg_iterations", "cg_residual",
        "negative_curvature", "trust_radius", "gradient_batch_size", "step_damped",
        "end_point", "backend", "iteration_seconds", "cumulative_seconds",
    ),
}  # fmt: skip
RECORD_LAYOUT = max(RECORD_LAYOUTS)
_record_values = attrgetter(*RECORD_LAYOUTS[RECORD_LAYOUT])
_compact = json.JSONEncoder(separators=(",", ":"))  # built once: dumps() builds one per call


def record_json(record: StepRecord, compact: bool = True) -> str:
    """A record as its stored JSON text: [layout, values...], or with `compact` False the
    JSON object every release reads (a store shared with older servers writes that)."""
    if not compact:
        return json.dumps(vars(record))
    return _compact.encode([RECORD_LAYOUT, *_record_values(record)])


def _json(text: str | bytes, what: str) -> Any:
    """The JSON value of a stored column; StoreCorruptError (DATA_LOSS) when it is not JSON:
    the store was damaged, or written by something else."""
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
        raise StoreCorruptError(
            f"{what} is not readable JSON ({exc}): the run store is damaged; stop the server "
            "and run `hessian-server --recover-store` (with its --data-dir or --store)"
        ) from None


def records_from_json(texts: Sequence[str | bytes]) -> list[StepRecord]:
    """A page of stored records, in order, cut before the first unreadable one (the next
    read, starting there, raises StoreCorruptError): a reader gets every intact record
    before the damage. An unreadable first one raises at once."""
    out: list[StepRecord] = []
    for text in texts:
        try:
            record = record_from_json(text)
            if record is None:
                raise StoreCorruptError("a stored record is empty: the run store is damaged")
            out.append(record)
        except StoreCorruptError:
            if out:
                break
            raise
    return out


def record_from_json(text: str | bytes | None) -> StepRecord | None:
    """The record stored as `text` (None for none); fields this version lacks are ignored.
    A layout this server does not know (a newer server wrote it) raises StoreError."""
    if not text:
        return None
    values = _json(text, "a stored record")
    if isinstance(values, dict):  # written before layouts
        named = values.items()
    elif not isinstance(values, list):
        raise StoreError(f"a stored record is {type(values).__name__} JSON, not a record")
    else:
        names = RECORD_LAYOUTS.get(values[0]) if values and type(values[0]) is int else None
        if names is None or len(names) != len(values) - 1:
            raise StoreError(
                f"a stored record has layout {values[0] if values else None!r} with "
                f"{len(values) - 1} values, which this server does not read (layouts "
                f"{sorted(RECORD_LAYOUTS)}): a newer hessian-server wrote it"
            )
        if values[0] == RECORD_LAYOUT:  # StepRecord's field order (the test holds them equal)
            return StepRecord(*values[1:])
        named = zip(names, values[1:], strict=True)
    return StepRecord(**{k: v for k, v in named if k in RECORD_FIELDS})


def encode_fields(values: dict[str, Any], compact: bool = True) -> dict[str, Any]:
    """RunRow field values as column values (spec and last_record as JSON, the record
    `compact` as in record_json; converged 0/1); KeyError for a name that is no RunRow
    field."""
    unknown = set(values) - set(ROW_FIELDS)
    if unknown:
        raise KeyError(f"unknown run fields {sorted(unknown)}")
    out = {}
    for key, value in values.items():
        if key == "spec":
            value = json.dumps(value)
        elif key == "last_record":
            value = None if value is None else record_json(value, compact)
        elif key == "converged":
            value = int(bool(value))
        out[key] = value
    return out


def row_values(row: RunRow, compact: bool = True) -> list[Any]:
    """The column values of a whole run, in ROW_FIELDS order."""
    encoded = encode_fields({k: getattr(row, k) for k in ROW_FIELDS}, compact)
    return [encoded[k] for k in ROW_FIELDS]


def decode_row(values: Sequence[Any]) -> RunRow:
    """The run whose ROW_FIELDS columns are `values`."""
    row = dict(zip(ROW_FIELDS, values, strict=True))
    row["spec"] = _json(row["spec"], f"the spec of run {row['run_id']}")
    row["last_record"] = record_from_json(row["last_record"])
    row["converged"] = bool(row["converged"])
    for key in ("name", "stop_reason", "message", "backend"):
        row[key] = row[key] or ""
    return RunRow(**row)


def checkpoint_values(run_id: str, cp: StoredCheckpoint) -> tuple[Any, ...]:
    """The checkpoints-table columns of `cp`: run_id, then CHECKPOINT_COLUMNS."""
    return (run_id, cp.iteration, cp.dtype, json.dumps(cp.shape), cp.params, json.dumps(cp.state))


def decode_checkpoint(values: Sequence[Any] | None) -> StoredCheckpoint | None:
    """The checkpoint whose CHECKPOINT_COLUMNS are `values` (None for none)."""
    if values is None:
        return None
    iteration, dtype, shape, params, state = values
    shape, state = _json(shape, "a checkpoint's shape"), _json(state, "a checkpoint's state")
    return StoredCheckpoint(iteration, dtype, shape, bytes(params), state)


def list_runs_query(
    mark: str,
    statuses: Sequence[str],
    limit: int,
    after: tuple[float, str] | None,
    owner: str | None,
) -> tuple[str, list[Any]]:
    """SQL and arguments for RunStore.list_runs: newest first, after the key (created_at, id)."""
    where: list[str] = []
    args: list[Any] = []
    if owner is not None:
        where.append(f"owner = {mark}")
        args.append(owner)
    if statuses:
        where.append(f"status IN ({', '.join([mark] * len(statuses))})")
        args += list(statuses)
    if after is not None:
        where.append(f"(created_at < {mark} OR (created_at = {mark} AND run_id < {mark}))")
        args += [after[0], after[0], after[1]]
    sql = f"SELECT {', '.join(ROW_FIELDS)} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + f" ORDER BY created_at DESC, run_id DESC LIMIT {mark}", [*args, limit]


def problems_to_evict(
    held: Sequence[tuple[str, int, float]], pinned: set[str], max_bytes: int
) -> list[str]:
    """Problem retention: of (id, bytes, last use) rows, the least recently used to delete,
    never a pinned one, until the rest take at most `max_bytes`."""
    total = sum(size for _, size, _ in held)
    evicted = []
    for problem_id, size, _ in sorted(held, key=lambda h: (h[2], h[0])):
        if total <= max_bytes:
            break
        if problem_id not in pinned:
            evicted.append(problem_id)
            total -= size
    return evicted


def refuse(run_id: str, status: str | None, expected: Sequence[str]) -> NoReturn:
    """Raise why a conditional write matched no row: no such run, or another status."""
    if status is None:
        raise RunNotFoundError(run_id)
    raise RunConflictError(run_id, status, expected)
