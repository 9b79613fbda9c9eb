"""A run's end is one SQLite commit: its last records, its last checkpoint and its final status.

A short job's time is much of it store commits, so the final checkpoint is folded into the
commit that stores the run's end. Seen on a real server's real SQLite file through the
connection's statement trace (BEGIN ... COMMIT groups). The stored run must still say what
the engine's own run says: the final parameters equal an in-process Run's, bit for bit.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import start_server
from hessian_client import Client, problems
from hessian_service.engine import MethodOptions, Run, StopCriteria, make_objective

TIMEOUT = 120  # generous: guards against a hang only


@pytest.fixture
def traced(tmp_path):
    """A server and the SQL statements its store runs, in order. The background flusher never
    commits here (an hour's interval, a batch no run fills), so only a run's end commits its
    records: a slow machine cannot let the flusher take the last ones first."""
    handle = start_server(tmp_path, commit_interval_ms=3_600_000, commit_every_records=10**6)
    statements: list[str] = []
    lock = threading.Lock()

    def keep(sql: str) -> None:
        with lock:
            statements.append(sql.strip())

    handle.store._db.set_trace_callback(keep)
    yield handle, statements
    handle.store._db.set_trace_callback(None)
    handle.stop(grace=1.0)


def _transactions(statements: list[str]) -> list[list[str]]:
    """The statements grouped by transaction (BEGIN IMMEDIATE ... COMMIT)."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for sql in statements:
        if sql.startswith("BEGIN"):
            current = []
        elif sql == "COMMIT" and current is not None:
            groups.append(current)
            current = None
        elif current is not None:
            current.append(sql)
    return groups


def test_the_last_checkpoint_records_and_end_commit_together(traced):
    handle, statements = traced
    rng = np.random.default_rng(torch.initial_seed())
    a = rng.standard_normal((40, 6))
    b = rng.integers(0, 2, 40).astype(np.float64)
    x0 = 0.1 * rng.standard_normal(7)
    stopping = {"max_iterations": 5, "gradient_tolerance": 0.0, "parameter_tolerance": 0.0}
    with Client(handle.address, timeout=TIMEOUT) as client:
        run = client.start_run(
            problems.logistic_regression(a, b), x0, method="newton", stopping=stopping
        )
        records = list(run.stream())
        result = run.result(timeout=TIMEOUT)
    assert result.info.status == "FINISHED", result.info
    groups = _transactions(list(statements))
    end = [g for g in groups if any(s.startswith("UPDATE runs SET finished_at") for s in g)]
    assert len(end) == 1, groups
    assert any(s.startswith("INSERT OR REPLACE INTO checkpoints") for s in end[0]), end[0]
    assert any(s.startswith("INSERT OR IGNORE INTO records") for s in end[0]), end[0]
    # what was stored is the engine's own answer
    objective = make_objective(
        "logistic_regression",
        {"X": torch.from_numpy(a), "y": torch.from_numpy(b)},
        {"fit_intercept": True},
    )
    engine = Run(
        objective,
        torch.from_numpy(x0),
        MethodOptions(method="newton"),
        StopCriteria(max_iterations=5, gradient_tolerance=0.0, parameter_tolerance=0.0),
    )
    expected = [r.loss for r in engine]
    assert [r.loss for r in records] == expected
    assert np.array_equal(np.asarray(result.params), engine.checkpoint().params.numpy())
