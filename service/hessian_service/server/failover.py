"""Run ownership across replicas: a lease per queued or executing run, renewed while it runs,
and takeover of runs whose replica died (their lease expired) from their last checkpoint.

Bounds, with T = --lease-seconds: a replica renews its leases (one statement) every T/8;
once it has gone 0.5 T without a successful renewal (noticed within 0.625 T), it cancels
the run before the next iteration and gives up storing its end (each store call waits at
most T/8 for a connection), so it stops by about 0.75 T, before its lease, renewed last at
most then, expires at T; a write it still attempts after that is refused by the store's
generation fence. Another replica scans for expired leases every T/8, so a dead replica's
run is taken over within about 1.125 T of its last renewal (plus the scan query).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..engine.records import StopReason
from ..store import ACTIVE_STATUSES, PostgresRunStore, RunStatus, StoreError
from .errors import ConflictError, LimitError, NotFoundError

if TYPE_CHECKING:
    from .runs import LiveRun, RunManager

log = logging.getLogger(__name__)
RENEW_FRACTION = 0.125
SAFE_FRACTION = 0.5


class LeaseKeeper:
    """Holds this replica's run leases and takes over runs whose leases expired."""

    def __init__(
        self,
        store: PostgresRunStore,
        runs: RunManager,
        resolve: Callable[[str], object],
        ttl_s: float,
    ) -> None:
        """`resolve(problem_id)` builds a run's objective for a takeover."""
        self.store = store
        self.runs = runs
        self.resolve = resolve
        self.ttl_s = ttl_s
        self._held: dict[str, tuple[LiveRun, float]] = {}  # run -> (live, renewal sent at)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.takeovers: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> None:
        """Begin renewing and scanning."""
        self._thread.start()

    def close(self) -> None:
        """Stop renewing (leases then expire, unless released) and scanning."""
        self._stop.set()
        self._thread.join(timeout=5)

    def acquire(self, run_id: str) -> None:
        """Take the run's lease (inside the caller's store transaction, if any); ConflictError
        (FAILED_PRECONDITION: retrying cannot help) when another replica holds a live lease
        on it, as a ResumeRun that lost a race to one on another replica finds."""
        if self.store.acquire_lease(run_id, self.ttl_s) is not None:
            return
        row = self.store.get_run(run_id)
        if row is not None and row.status in ACTIVE_STATUSES:
            raise ConflictError(
                "run_id", f"run {run_id} is executing on another replica (it holds its lease)"
            )
        # its last executor ended it but could not give the lease up: it lapses within T
        raise StoreError(
            f"run_id: run {run_id}'s last lease has not lapsed yet (its replica could not "
            f"release it); retry within {self.ttl_s:g} s"
        )

    def forget(self, run_id: str) -> None:
        """Drop what the store keeps of this replica's lease on the run (its fence): after a
        transaction that took it rolled back, or once the run no longer executes here. A
        stale fence refused this replica's later writes for the run: a ResumeRun here of a
        run another replica had taken over and then stopped failed "no longer leased"."""
        self.store.forget_lease(run_id)

    def _end(self, run_id: str, cancel_request: bool = False, **fields: object) -> bool:
        """Store the end of a run this takeover will not continue (`fields`), then give its
        lease up; with `cancel_request`, only where a cancel request was left for it, taken
        in the same transaction (a request consumed with its end refused let the next
        takeover run the run on). A write that fails gives the lease up for another scan.
        Whether the end was stored."""
        try:
            with self.store.transaction():
                if cancel_request and not self.store.take_cancel_requests([run_id]):
                    return False
                self.store.update_run(run_id, **fields)
        except BaseException:
            self._give_up(run_id)
            raise
        self.store.release_lease(run_id)
        return True

    def _give_up(self, run_id: str) -> None:
        """A lease taken for a takeover that did not happen: expire it for another scan, and
        drop its fence (it would refuse this replica's writes for the run, a ResumeRun or
        CancelRun here, after another replica had taken the run and stopped it)."""
        try:
            self.store.expire_lease(run_id)
        finally:
            self.store.forget_lease(run_id)

    def hold(self, live: LiveRun, acquired_at: float) -> None:
        """Keep the run's lease renewed, one acquired at monotonic time `acquired_at` (when
        the transaction that took it began: the lease runs from then)."""
        with self._lock:
            self._held[live.run_id] = (live, acquired_at)

    def release(self, run_id: str) -> None:
        """The run ended (its end is stored): give its lease up."""
        with self._lock:
            self._held.pop(run_id, None)
        try:
            self.store.release_lease(run_id)
        except StoreError as exc:
            log.warning("run %s: lease not released (it expires by itself): %s", run_id, exc)

    def hand_over(self, run_id: str) -> bool:
        """At shutdown: stop renewing the run and let its lease expire now, so that another
        replica continues it (or this one's successor, at its start). False if the store
        would not take it (the run is then stored INTERRUPTED as usual)."""
        with self._lock:
            self._held.pop(run_id, None)
        try:
            return self.store.expire_lease(run_id)
        except StoreError as exc:
            log.warning("run %s: not handed over: %s", run_id, exc)
            return False

    def holds(self, run_id: str) -> bool:
        """Whether this replica still safely holds the run's lease."""
        with self._lock:
            return run_id in self._held

    def abandon(self, run_id: str) -> None:
        """Stop renewing a run whose end could not be stored: its lease expires and a replica
        (maybe this one) takes it over from its last checkpoint and finishes it."""
        with self._lock:
            self._held.pop(run_id, None)

    def _loop(self) -> None:
        period = self.ttl_s * RENEW_FRACTION
        while not self._stop.wait(period):
            self._renew()
            self._stop_unsafe()
            self._scan()

    def _renew(self) -> None:
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        sent = time.monotonic()
        try:
            kept = self.store.renew_leases(list(held), self.ttl_s)
        except StoreError as exc:
            log.warning("%d run leases not renewed: %s", len(held), exc)
            return
        lost = []
        with self._lock:
            for run_id, (live, _) in held.items():
                if run_id not in self._held:
                    continue  # ended (or abandoned) meanwhile
                if run_id in kept:
                    self._held[run_id] = (live, sent)
                else:
                    self._held.pop(run_id)
                    lost.append(live)
        for live in lost:
            self._lose(live, "its lease was taken by another replica")
        try:  # CancelRun sent to another replica: the runs still held here stop now
            for run_id in self.store.take_cancel_requests(sorted(kept)):
                self.runs.cancel(run_id, "a CancelRun made on another replica")
                log.info("run %s: cancelled by a request made on another replica", run_id)
        except StoreError as exc:
            log.warning("cancel requests not read: %s", exc)

    def _stop_unsafe(self) -> None:
        """Cancel runs whose lease may expire before the next renewal could succeed."""
        now = time.monotonic()
        with self._lock:
            late = [
                live
                for live, sent in self._held.values()
                if now - sent > SAFE_FRACTION * self.ttl_s
            ]
            for live in late:
                self._held.pop(live.run_id, None)
        for live in late:
            self._lose(live, "its lease could not be renewed in time")

    @staticmethod
    def _lose(live: LiveRun, why: str) -> None:
        log.warning("run %s: stops executing here: %s", live.run_id, why)
        live.lost = True
        live.cancel.cancel()

    def _scan(self) -> None:
        try:
            expired = self.store.expired_leases()
        except StoreError as exc:
            log.warning("lease scan failed: %s", exc)
            return
        for run_id in expired:
            if self._stop.is_set() or self.runs.stopping:
                return
            try:
                self._take_over(run_id)
            except LimitError as exc:  # this replica is full: capacity, not a fault
                log.warning("run %s: not taken over here (%s); a later scan retries", run_id, exc)
            except Exception:
                log.exception("run %s: takeover failed (another replica may retry)", run_id)

    def _take_over(self, run_id: str) -> None:
        if self.runs.live(run_id) is not None:
            return
        acquired_at = time.monotonic()
        if self.store.acquire_lease(run_id, self.ttl_s) is None:
            return  # another replica won it
        row = self.store.get_run(run_id)
        if row is None:
            self.store.release_lease(run_id)
            return
        if self._end(
            run_id,
            # cancelled on a replica while its own was dead: it ends here, without another
            # iteration (it ran on for seconds before the renewal read the request), even
            # where this replica is full (it waited for a worker)
            cancel_request=True,
            status=RunStatus.CANCELLED,
            stop_reason=StopReason.CANCELLED,
            finished_at=time.time(),
            message="cancelled while its replica was down: no iteration ran after it",
        ):
            log.info("run %s: cancelled while its replica was down, stored CANCELLED", run_id)
            return
        if row.remote is not None:  # an Optimize run: its caller's stream died with its replica
            self._end(
                run_id,
                status=RunStatus.INTERRUPTED,
                stop_reason=StopReason.ERROR,
                message="its replica stopped while the caller's Optimize stream was open "
                "there; resume it with minimize(..., resume=run_id) (or Optimize's resume_run_id)",
            )
            log.info("run %s: an Optimize run whose replica died, stored INTERRUPTED", run_id)
            return
        try:
            objective = self.resolve(row.problem_id)
        except NotFoundError:
            # its problem is gone (a DeleteProblem that raced its start before the store
            # locked against that, or a damaged store): it can never continue, so it ends
            # here instead of every replica failing to take it over every T/8 for good
            self._end(
                run_id,
                status=RunStatus.FAILED,
                stop_reason=StopReason.ERROR,
                finished_at=time.time(),
                message=f"its problem {row.problem_id} was deleted while it ran: it cannot "
                "continue (its records remain)",
            )
            log.warning("run %s: its problem is gone, stored FAILED", run_id)
            return
        except BaseException:
            self._give_up(run_id)
            raise
        try:
            self.takeovers.append(run_id)
            self.runs.take_over(row, objective, acquired_at)
        except BaseException:
            self._give_up(run_id)  # not taken (full, shutting down?): free it again
            raise
        log.info("run %s: taken over from an expired lease", run_id)
