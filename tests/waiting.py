"""A guard against a hang in a test: the call runs on a thread of its own, and the test fails
(the thread left behind) unless it ends in time."""

from __future__ import annotations

import threading
from collections.abc import Callable


def ended_within(fn: Callable[[], object], seconds: float, what: str) -> dict[str, object]:
    """Call `fn` on a thread of its own and fail unless it ends within `seconds` (a guard
    against a hang, not a timing claim): {"result": its value} or {"error": what it raised}."""
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["result"] = fn()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} still going after {seconds} s"
    return outcome
