"""SQLite stores records as layout arrays ([layout, values...]): every value round-trips
exactly, records stored as JSON objects before layouts still read (in a store migrated from
the version before), and a layout this server does not know is a StoreError naming it, not
a wrong record. PostgreSQL, shared with older replicas during a rolling update, still
writes objects that a release before layouts reads, and reads array rows too."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3

import numpy as np
import psycopg
import pytest
from hessian_service.engine.records import StepRecord
from hessian_service.store import PostgresRunStore, RunRow, SQLiteRunStore, StoredCheckpoint, layout
from hessian_service.store.base import StoreError
from hessian_service.store.sqlite import SCHEMA_VERSION
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401

FIELDS = dataclasses.fields(StepRecord)


def _random_record(rng: np.random.Generator, iteration: int) -> StepRecord:
    """Every field drawn afresh: floats over many magnitudes with NaN, infinities and -0.0."""
    special = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]
    values = {}
    for f in FIELDS:
        if f.type in ("int", int):
            values[f.name] = int(rng.integers(-(2**62), 2**62))
        elif f.type in ("float", float):
            values[f.name] = (
                special[int(rng.integers(len(special)))]
                if rng.random() < 0.3
                else float(rng.standard_normal() * 10.0 ** rng.integers(-300, 300))
            )
        elif f.type in ("bool", bool):
            values[f.name] = bool(rng.integers(2))
        else:
            values[f.name] = "".join(rng.choice(list('ab"\\\n\u00e9\u4e2d '), 6))
    values["iteration"] = iteration
    return StepRecord(**values)


def _same(a: StepRecord, b: StepRecord) -> bool:
    """Field by field, bit for bit (NaN equals NaN, -0.0 differs from 0.0)."""
    for f in FIELDS:
        x, y = getattr(a, f.name), getattr(b, f.name)
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if np.float64(x).tobytes() != np.float64(y).tobytes():
                return False
        elif x != y:
            return False
    return True


def _object_json(record: StepRecord) -> str:
    """A record as servers before layouts stored it: a JSON object of every field."""
    return json.dumps(dataclasses.asdict(record))


def test_the_newest_layout_is_step_records_fields_in_order():
    # A new StepRecord field needs a new layout number (released layouts never change):
    # this fails until one is added, and records read positionally rely on the order.
    assert layout.RECORD_LAYOUTS[layout.RECORD_LAYOUT] == tuple(f.name for f in FIELDS)


def test_every_value_round_trips_bit_for_bit_in_a_third_of_the_bytes():
    rng = np.random.default_rng()
    for i in range(300):
        record = _random_record(rng, i)
        text = layout.record_json(record)
        assert json.loads(text)[0] == layout.RECORD_LAYOUT
        assert _same(layout.record_from_json(text), record), text
    typical = StepRecord(
        iteration=1234, loss=0.0663601862201, loss_change=1.2e-9, gradient_norm=3.1e-7,
        gradient_max_norm=2.2e-7, step_norm=1.5e-4, step_size=1.0, backend="native",
        iteration_seconds=0.000153, cumulative_seconds=0.19,
    )  # fmt: skip
    assert len(layout.record_json(typical)) < len(_object_json(typical)) / 2.5


def test_a_record_stored_as_a_json_object_still_reads_and_ignores_unknown_keys():
    rng = np.random.default_rng()
    record = _random_record(rng, 7)
    values = dataclasses.asdict(record) | {"a_field_this_version_lacks": 1.5}
    assert _same(layout.record_from_json(json.dumps(values)), record)
    for i in range(50):  # the object form a shared store still writes round-trips too
        record = _random_record(rng, i)
        text = layout.record_json(record, compact=False)
        assert text.startswith("{") and _same(layout.record_from_json(text), record)


def test_an_older_layout_reads_its_names_and_defaults_the_rest(monkeypatch):
    monkeypatch.setitem(layout.RECORD_LAYOUTS, 0, ("iteration", "loss", "gone_field"))
    read = layout.record_from_json("[0,4,2.5,1]")
    assert _same(read, StepRecord(iteration=4, loss=2.5))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (f"[{layout.RECORD_LAYOUT + 1},1,2.0]", f"layout {layout.RECORD_LAYOUT + 1}"),
        (f"[{layout.RECORD_LAYOUT},1,2.0]", "with 2 values"),
        ('["1",1,2.0]', "layout '1'"),
        ("[]", "layout None"),
        ("[true,1,2.0]", "layout True"),
        ("[1.0,1,2.0]", "layout 1.0"),
        ("null", "NoneType JSON"),
        ("5", "int JSON"),
        ('"x"', "str JSON"),
    ],
)
def test_a_layout_this_server_does_not_read_is_a_store_error_naming_it(text, named):
    with pytest.raises(StoreError) as err:
        layout.record_from_json(text)
    assert named in str(err.value)


def _row(run_id: str) -> RunRow:
    return RunRow(run_id, "p-unstored", {"options": {}, "stopping": {}}, created_at=1.0)


def _cp(iteration: int) -> StoredCheckpoint:
    return StoredCheckpoint(iteration, "float64", [2], b"\x01" * 16, {})


def test_sqlite_a_store_of_the_version_before_is_migrated_and_its_object_records_read(
    tmp_path,
):
    rng = np.random.default_rng()
    old = [_random_record(rng, i) for i in range(5)]
    store = SQLiteRunStore(tmp_path)
    store.create_run(_row("r-old"), _cp(0))
    store.close()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:  # as the previous version wrote it
        db.executemany(
            "INSERT INTO records VALUES ('r-old', ?, ?)",
            [(r.iteration, _object_json(r)) for r in old],
        )
        db.execute(
            "UPDATE runs SET num_records = 5, last_record = ? WHERE run_id = 'r-old'",
            (_object_json(old[-1]),),
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    db.close()
    store = SQLiteRunStore(tmp_path)
    try:
        new = [_random_record(rng, i) for i in range(5, 9)]  # the run continues, resumed
        for record in new:
            store.append_record("r-old", record)
        store.flush()
        read = store.records("r-old", 0, 100)
        assert len(read) == 9 and all(map(_same, read, old + new))
        assert _same(store.get_run("r-old").last_record, new[-1])
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        texts = [t for (t,) in db.execute("SELECT record FROM records ORDER BY iteration")]
    db.close()
    assert [t[0] for t in texts] == ["{"] * 5 + ["["] * 4


def _old_reader(text: str) -> StepRecord:
    """How a release before layouts reads a stored record (a JSON object, nothing else)."""
    values = json.loads(text)
    return StepRecord(**{k: v for k, v in values.items() if k in {f.name for f in FIELDS}})


def test_postgres_writes_objects_a_replica_of_the_release_before_reads_and_reads_arrays(
    postgres_dsn,
):
    # A rolling update has replicas of the release before (object records only) and this
    # one on the same database: everything this one writes, the old one must read.
    rng = np.random.default_rng()
    written = [_random_record(rng, i) for i in range(6)]
    store = PostgresRunStore(postgres_dsn)
    try:
        store.create_run(_row("r-mixed"), _cp(0))
        for record in written[:3]:
            store.append_record("r-mixed", record)
        store.flush()
        store.update_run("r-mixed", last_record=written[2])
    finally:
        store.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        texts = [t for (t,) in conn.execute("SELECT record FROM records ORDER BY iteration")]
        (last,) = conn.execute("SELECT last_record FROM runs WHERE run_id = 'r-mixed'").fetchone()
        assert len(texts) == 3 and all(map(_same, map(_old_reader, texts), written[:3]))
        assert _same(_old_reader(last), written[2])
        for r in written[3:]:  # rows as a later release will write them
            conn.execute(
                "INSERT INTO records VALUES ('r-mixed', %s, %s)",
                (r.iteration, layout.record_json(r)),
            )
        conn.execute(
            "UPDATE runs SET num_records = 6, last_record = %s WHERE run_id = 'r-mixed'",
            (layout.record_json(written[-1]),),
        )
    store = PostgresRunStore(postgres_dsn)
    try:
        read = store.records("r-mixed", 0, 100)
        assert len(read) == 6 and all(map(_same, read, written))
        assert _same(store.get_run("r-mixed").last_record, written[-1])
    finally:
        store.close()
