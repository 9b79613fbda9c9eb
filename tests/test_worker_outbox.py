"""A run worker's outbox (server/workers.py, `--run-processes`): how a child sends a run's
records over its real socket. A record is sent within BATCH_SECONDS even when no other
follows it (the next iteration may take minutes: it used to wait for that one), the record
a run stops at goes only with the run's end, and records, checkpoints and the end keep
their order."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
import torch
from hessian_service.engine import Checkpoint, MethodOptions, Run, StopCriteria, make_objective
from hessian_service.server import workers

WAIT = 2.0  # far above BATCH_SECONDS: only a record never sent misses it


@pytest.fixture
def pair() -> Iterator[tuple[Connection, Connection]]:
    """(the child's end, the server's end) of a socket pair, closed afterwards (each test
    ends its run, so its outbox's flusher has nothing left to send)."""
    ours, theirs = socket.socketpair()
    child, server = Connection(ours.detach()), Connection(theirs.detach())
    yield child, server
    child.close()
    server.close()


def _records(count: int) -> list:
    objective = make_objective("rosenbrock", {}, {"dim": 3})
    stopping = StopCriteria(max_iterations=count - 1, gradient_tolerance=0.0)
    options = MethodOptions(method="gradient_descent", learning_rate=1e-3)
    return list(Run(objective, objective.init_params(), options, stopping))


def _next(conn: Connection, timeout: float = WAIT) -> tuple | None:
    """The next message, its records as (iteration, loss) (a record's NaN fields make
    unpickled copies unequal)."""
    if not conn.poll(timeout):
        return None
    message = pickle.loads(conn.recv_bytes())
    return (*message[:2], _keys(message[2]), *message[3:])


def _keys(records: list) -> list[tuple[int, float]]:
    return [(r.iteration, r.loss) for r in records]


def test_a_lone_record_is_sent_without_waiting_for_the_next(pair, monkeypatch):
    child, server = pair
    monkeypatch.setattr(workers, "BATCH_SECONDS", 0.2)  # a window the test can see
    box = workers._Outbox(child)
    first, second = _records(2)
    box.begin(7)
    box.add(first, None, False)  # within BATCH_SECONDS of the start: queued...
    assert _next(server, 0.05) is None
    assert _next(server) == ("records", 7, _keys([first]), [])  # ...then flushed
    box.add(second, None, False)
    assert _next(server) == ("records", 7, _keys([second]), [])
    box.end("end", ("done",))
    assert _next(server) == ("end", 7, [], [], None, ("done",))


def test_the_stop_record_goes_with_the_end_and_order_is_kept(pair):
    child, server = pair
    box = workers._Outbox(child)
    records = _records(4)
    mark = Checkpoint(2, torch.zeros(3, dtype=torch.float64), {"lr": 1.0})
    box.begin(3)
    for i, record in enumerate(records[:3]):
        box.add(record, mark if i == 2 else None, False)
    sent, marks = [], []
    while len(sent) < 3 and (message := _next(server)) is not None:
        kind, seq, batch, batch_marks = message
        assert (kind, seq) == ("records", 3)
        marks += [(len(sent) + i, cp.iteration) for i, cp in batch_marks]
        sent += batch
    assert sent == _keys(records[:3]) and marks == [(2, 2)]
    box.add(records[3], None, True)
    assert _next(server, 5 * workers.BATCH_SECONDS) is None  # held for the end
    box.end("end", ("stopped",))
    kind, seq, batch, batch_marks, stop_index, end = _next(server)
    assert (kind, seq, batch, batch_marks, stop_index, end) == (
        "end",
        3,
        _keys(records[3:]),
        [],
        0,
        ("stopped",),
    )


def test_an_error_before_the_first_record_names_its_own_run(pair):
    child, server = pair
    box = workers._Outbox(child)
    box.begin(1)
    box.end("end", ("x",))
    assert _next(server)[:2] == ("end", 1)
    box.begin(2)  # the next run fails while it is built
    box.end("error", None, ValueError("bad"))
    kind, seq, batch, marks, checkpoint, exc = _next(server)
    assert (kind, seq, batch, marks, checkpoint) == ("error", 2, [], [], None)
    assert isinstance(exc, ValueError) and str(exc) == "bad"
