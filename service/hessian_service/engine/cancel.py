"""Cancellation of engine work: a token set from any thread or by a deadline, checked in loops.

A `CancelToken` is cancelled explicitly (`cancel`, e.g. from a gRPC termination callback or
CancelRun) or implicitly once its monotonic deadline passes. Runs check it between
iterations (`cancelled`); long unary work (CG iterations, Lanczos blocks, probe batches,
dense-Hessian row chunks) calls `check()` through the ambient token of the request, which
`scope(token)` binds for the current thread of execution (a ContextVar, so concurrent
requests never see each other's token), and raises `Cancelled` to abandon the work.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator

from .errors import EngineError

DEADLINE = "deadline"
CANCELLED = "cancelled"


class Cancelled(EngineError):
    """The work was abandoned: `reason` is DEADLINE (its deadline passed) or CANCELLED."""

    def __init__(self, reason: str, where: str = "") -> None:
        self.reason = reason
        what = "the deadline passed" if reason == DEADLINE else "cancelled"
        super().__init__(f"{what}; the computation stopped{' ' + where if where else ''}")


class CancelToken:
    """Set from any thread (or by passing its monotonic `deadline`); work checks it."""

    def __init__(self, deadline: float | None = None) -> None:
        self._lock = threading.Lock()
        self._set = False  # written once, under the lock; read without it (a plain bool)
        self._reason = CANCELLED
        self.deadline = deadline

    @classmethod
    def after(cls, seconds: float | None) -> CancelToken:
        """A token whose deadline is `seconds` from now (None: no deadline)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cancel(self, reason: str = CANCELLED) -> None:
        """Cancel the work (the first reason given is kept)."""
        with self._lock:
            if not self._set:
                self._reason = reason
                self._set = True

    @property
    def cancelled(self) -> bool:
        """Whether the work should stop: cancelled, or past the deadline."""
        if self._set:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel(DEADLINE)
            return True
        return False

    @property
    def reason(self) -> str | None:
        """DEADLINE or CANCELLED once cancelled, else None."""
        return self._reason if self.cancelled else None

    def check(self, where: str = "") -> None:
        """Raise `Cancelled` if the work should stop (`where`: what was being computed)."""
        if self.cancelled:
            raise Cancelled(self._reason, where)


_CURRENT: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "hessian_cancel_token", default=None
)


@contextlib.contextmanager
def scope(token: CancelToken | None) -> Iterator[None]:
    """Make `token` the one `check()` consults in this context (None: leave the current one)."""
    if token is None:
        yield
        return
    reset = _CURRENT.set(token)
    try:
        yield
    finally:
        _CURRENT.reset(reset)


def check(where: str = "") -> None:
    """Raise `Cancelled` if the current request's token is cancelled (no token: never)."""
    token = _CURRENT.get()
    if token is not None:
        token.check(where)
