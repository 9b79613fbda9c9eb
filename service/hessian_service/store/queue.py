"""The in-memory record queue both stores share: records wait here until a batch is full or
its oldest record is `commit_interval_s` old (a background thread commits it then), so a
store commits many records per transaction and only committed ones are acknowledged."""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

from ..engine.records import StepRecord
from .base import StoreError

log = logging.getLogger(__name__)


class RecordQueue:
    """Mixin for a RunStore: append_record, flush, discard_queued and the flusher thread.

    The store sets the attributes below in its constructor and implements `_commit_queue`
    and `_check_open`; `_failure` is the error of the last failed commit of queued records.
    """

    commit_every: int
    commit_interval_s: float
    _lock: threading.RLock
    _wake: threading.Condition
    _closed: threading.Event
    _pending: list[tuple[str, StepRecord]]
    _oldest_pending: float
    _failure: StoreError | None
    _taken: list[tuple[str, StepRecord]]
    _flusher: threading.Thread

    @abstractmethod
    def _commit_queue(self) -> None:
        """Commit every queued record in one write transaction (the lock is held)."""

    @abstractmethod
    def _check_open(self) -> None:
        """Raise StoreClosedError once the store is closed."""

    def append_record(self, run_id: str, record: StepRecord) -> None:
        """Queue a record; it is committed within `commit_every` records or the interval."""
        with self._lock:
            self._check_open()
            if self._failure is not None:
                raise self._failure
            if not self._pending:
                self._oldest_pending = time.monotonic()
                self._wake.notify_all()
            self._pending.append((run_id, record))
            if len(self._pending) >= self.commit_every:
                self._commit_queue()

    def flush(self) -> None:
        """Commit every queued record now."""
        with self._lock:
            self._commit_queue()

    def discard_queued(self, run_id: str) -> int:
        """Drop a stopped run's queued records (never acknowledged); return how many."""
        with self._lock:
            kept = [(rid, record) for rid, record in self._pending if rid != run_id]
            dropped = len(self._pending) - len(kept)
            self._pending = kept
            if not kept:
                self._failure = None  # nothing is waiting that could not be committed
        return dropped

    def _take_pending(self) -> dict[str, list[StepRecord]]:
        """Empty the queue into `_taken` (the write transaction puts them back if it fails);
        the records grouped by run, in order."""
        by_run: dict[str, list[StepRecord]] = {}
        for run_id, record in self._pending:
            by_run.setdefault(run_id, []).append(record)
        self._taken.extend(self._pending)
        self._pending = []
        return by_run

    def _stop_flusher(self) -> bool:
        """Stop the flusher thread (first call: True; the store then flushes and closes)."""
        with self._lock:
            if self._closed.is_set():
                return False
            self._closed.set()
            self._wake.notify_all()
        self._flusher.join(timeout=5)
        return True

    def _flush_loop(self) -> None:
        """Commit the queue when its oldest record is `commit_interval_s` old."""
        with self._lock:
            while not self._closed.is_set():
                if not self._pending:
                    self._wake.wait()
                    continue
                wait = self._oldest_pending + self.commit_interval_s - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                try:
                    self._commit_queue()
                except StoreError as exc:
                    log.error("%s (records stay queued; retrying)", exc)
                    self._oldest_pending = time.monotonic()
                except Exception:  # a bug must not end the thread that keeps the T ms promise
                    log.exception("store flush failed (records stay queued; retrying)")
                    self._oldest_pending = time.monotonic()
