"""`python held_server.py FLAGS`: the real hessian server (same flags, same main), except that
a run holds at one iteration until something the test drives from outside has happened, so a
test signals the process at a known point of a run instead of racing the run's speed.

HESSIAN_TEST_HOLD="WHEN:ITERATION" (spawn_server(..., hold=...) sets it):
- "cancelled:K": iteration K, before its stop test, waits until the run's cancel token is
  cancelled (a SIGTERM drain, CancelRun); the stop test then stops the run there, so it
  holds records 0..K-1 whatever the machine's speed.
- "store_closed:K": iteration K, after its stop test let it go on, waits until the server
  has closed its run store, then takes its step: the run is inside an iteration for as long
  as shutdown takes, however short the grace period.
Each wait is bounded (HOLD_GUARD), only against a hang: past it the run goes on unheld.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from hessian_service.engine.solvers.run import Run
from hessian_service.server.app import main
from hessian_service.store.sqlite import SQLiteRunStore

HOLD_GUARD = 120.0  # seconds


def install(spec: str) -> None:
    """Patch Run._stop_test (and SQLiteRunStore.close) for the hold `spec` names."""
    when, _, at = spec.partition(":")
    hold_at = int(at)
    store_closed = threading.Event()
    real_close, real_stop_test = SQLiteRunStore.close, Run._stop_test

    def close(self: SQLiteRunStore) -> None:
        try:
            real_close(self)
        finally:
            store_closed.set()

    def wait_until(done) -> None:
        stop = time.monotonic() + HOLD_GUARD
        while not done() and time.monotonic() < stop:
            time.sleep(0.005)

    def stop_test(self: Run, k: int, *args, **kwargs):
        if k == hold_at and when == "cancelled":
            wait_until(lambda: self.cancel_token.cancelled)
        stop = real_stop_test(self, k, *args, **kwargs)
        if k == hold_at and when == "store_closed" and stop is None:
            store_closed.wait(HOLD_GUARD)
        return stop

    if when not in ("cancelled", "store_closed"):
        raise SystemExit(f"held_server: unknown hold {spec!r}")
    SQLiteRunStore.close = close
    Run._stop_test = stop_test


if __name__ == "__main__":
    install(os.environ["HESSIAN_TEST_HOLD"])
    sys.exit(main())
