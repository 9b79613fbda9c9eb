"""The SQLite store's commit path under concurrency: what concurrent writers, the flusher and
readers leave in the file is exactly what was appended, in order; an acknowledged record is
readable; an append racing close() is stored or refused, never silently lost. The timeouts
below only guard against a hang.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from hessian_service.engine.records import StepRecord
from hessian_service.store import RunRow, SQLiteRunStore, StoreClosedError, StoredCheckpoint, layout

HANG_GUARD = 60.0  # seconds: only a hang reaches it


def _row(run_id: str) -> RunRow:
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    return RunRow(run_id, "p-1", spec, created_at=1.0)


def _cp() -> StoredCheckpoint:
    return StoredCheckpoint(0, "float64", [2], bytes(16), {})


def _record(rng: np.random.Generator, iteration: int) -> StepRecord:
    loss, change, grad, step = rng.standard_normal(4)
    return StepRecord(
        iteration=iteration,
        loss=float(loss),
        loss_change=float(change),
        gradient_norm=float(abs(grad)),
        step_norm=float(abs(step)),
    )


def _json(records: list[StepRecord]) -> list[str]:
    """Records as the store encodes them (NaN fields compare equal this way)."""
    return [layout.record_json(r) for r in records]


def test_concurrent_appends_flushes_and_reads_store_every_record_in_order(tmp_path):
    """Eight writer threads (one run each) append fresh random records while the flusher and
    full batches commit and a reader polls; each commit listener call is checked against a
    read: an acknowledged record is readable. The file holds every record, bit for bit."""
    rng = np.random.default_rng(torch.initial_seed())
    runs = {f"r-{i}": [_record(rng, k) for k in range(120)] for i in range(8)}
    store = SQLiteRunStore(tmp_path, commit_every=7, commit_interval_s=0.001)
    unreadable: list[tuple[str, int]] = []

    def on_commit(committed: dict[str, int]) -> None:
        for run_id, iteration in committed.items():
            if store.get_run(run_id).last_record.iteration < iteration:
                unreadable.append((run_id, iteration))

    try:
        for run_id in runs:
            store.create_run(_row(run_id), _cp())
        store.add_commit_listener(on_commit)
        start = threading.Barrier(len(runs) + 1)
        stop_reading = threading.Event()

        def writer(run_id: str) -> None:
            start.wait(HANG_GUARD)
            for record in runs[run_id]:
                store.append_record(run_id, record)

        # An assert in the reader thread would only end that thread, not fail the test: it
        # keeps what it saw wrong (or raised) and the main thread asserts on that.
        misread: list[tuple[str, int]] = []
        reader_errors: list[BaseException] = []

        def reader() -> None:
            try:
                start.wait(HANG_GUARD)
                while True:  # at least one pass, even if the writers are already done
                    done = stop_reading.is_set()
                    for run_id in runs:
                        got = store.records(run_id, 0, 1000)
                        if _json(got) != _json(runs[run_id][: len(got)]):
                            misread.append((run_id, len(got)))
                    if done:
                        return
            except BaseException as exc:
                reader_errors.append(exc)

        threads = [threading.Thread(target=writer, args=(r,)) for r in runs]
        reading = threading.Thread(target=reader)
        for t in (*threads, reading):
            t.start()
        for t in threads:
            t.join(HANG_GUARD)
        store.flush()
        stop_reading.set()
        reading.join(HANG_GUARD)
        assert not reading.is_alive()
        assert reader_errors == []
        assert misread == [], "a read saw records other than the first ones appended, in order"
        assert unreadable == []
        for run_id, appended in runs.items():
            stored = store.records(run_id, 0, 1000)
            assert _json(stored) == _json(appended)
            assert store.get_run(run_id).num_records == len(appended)
    finally:
        store.close()


def test_an_append_racing_close_is_stored_or_refused(tmp_path):
    """close() commits every record appended before it; one appended after is refused with
    StoreClosedError, never queued and silently lost."""
    store = SQLiteRunStore(tmp_path, commit_every=1000, commit_interval_s=3600)
    store.create_run(_row("r-a"), _cp())
    accepted: list[StepRecord] = []
    refused = threading.Event()
    start = threading.Barrier(2)

    def writer() -> None:
        start.wait(HANG_GUARD)
        for k in range(100_000):
            record = StepRecord(iteration=k, loss=float(k))
            try:
                store.append_record("r-a", record)
            except StoreClosedError:
                refused.set()
                return
            accepted.append(record)

    t = threading.Thread(target=writer)
    t.start()
    start.wait(HANG_GUARD)
    while not accepted and t.is_alive():
        pass  # wait until the writer is appending
    store.close()
    t.join(HANG_GUARD)
    assert refused.is_set() or len(accepted) == 100_000
    reopened = SQLiteRunStore(tmp_path)
    try:
        assert _json(reopened.records("r-a", 0, 200_000)) == _json(accepted)
    finally:
        reopened.close()
