"""A live run wakes its watchers when records become durable (a commit), not once per record:
a wake-up per record made every iteration hand the GIL to the watcher and back (3x slower)."""

from __future__ import annotations

import threading

from hessian_service.engine import StepRecord
from hessian_service.server.runs import LiveRun


class CountingCondition(threading.Condition):
    """A Condition that counts notify_all calls."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def notify_all(self) -> None:
        self.wakeups += 1
        super().notify_all()


def test_appending_records_wakes_no_watcher_until_they_are_committed():
    live = LiveRun("r-test", base=0)
    live.cond = CountingCondition()
    for k in range(100):
        live.append(StepRecord(iteration=k, loss=1.0 / (k + 1)))
    assert live.cond.wakeups == 0
    assert live.wait_from(0, timeout=0) == ([], False)  # nothing durable yet
    live.acknowledge(99)  # one commit made all 100 durable
    assert live.cond.wakeups == 1
    records, done = live.wait_from(0, timeout=0)
    assert [r.iteration for r in records] == list(range(100)) and not done
    live.finish()
    assert live.cond.wakeups == 2
    assert live.wait_from(100, timeout=0) == ([], True)
