"""A live run wakes its watchers when records become durable (a commit), not once per record:
a wake-up per record made every iteration hand the GIL to the watcher and back (3x slower)."""

from __future__ import annotations

from hessian_service.engine import StepRecord
from hessian_service.server.runs import LiveRun


def test_appending_records_wakes_no_watcher_until_they_are_committed():
    live = LiveRun("r-test", base=0)
    wakeups = []
    unlisten = live.listen(lambda: wakeups.append(len(wakeups)))
    for k in range(100):
        live.append(StepRecord(iteration=k, loss=1.0 / (k + 1)))
    assert wakeups == []
    assert live.committed_from(0) == ([], False)  # nothing durable yet
    live.acknowledge(99)  # one commit made all 100 durable
    assert len(wakeups) == 1
    records, done = live.committed_from(0)
    assert [r.iteration for r in records] == list(range(100)) and not done
    live.finish()
    assert len(wakeups) == 2
    assert live.committed_from(100) == ([], True)
    unlisten()
    live.acknowledge(99)
    assert len(wakeups) == 2  # a watcher that left is not called
