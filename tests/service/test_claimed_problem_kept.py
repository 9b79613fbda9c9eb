"""A StartRun's inline problem is kept from the stored-problems cap until its run row (which
pins it) is written. Before, the problem was stored in one transaction and the run created
in another: another call's cap pass between them evicted it, and the StartRun, which carried
its problem inline, failed NOT_FOUND naming a problem id it never sent (41 of 120 StartRuns
from 4 threads under --max-problem-bytes 3000)."""

from __future__ import annotations

import numpy as np
from conftest import start_server
from hessian_client import Client, problems
from hessian_service.store import SQLiteRunStore


def _quadratic(rng, n: int = 15):
    m = rng.standard_normal((n, n))
    return problems.quadratic(m @ m.T + np.eye(n), rng.standard_normal(n))  # ~1.8 KB


def test_a_problem_stored_for_a_run_is_not_evicted_before_its_run_exists(
    tmp_path, rng, monkeypatch
):
    handle = start_server(tmp_path, max_problem_bytes=3000)  # room for one such problem
    real = SQLiteRunStore.create_run
    other = _quadratic(rng)

    def another_call_first(self, row, checkpoint, **kwargs):
        # between the hold and the run row: another client's problem applies the cap
        with Client(handle.address) as elsewhere:
            elsewhere.create_problem(other)
        return real(self, row, checkpoint, **kwargs)

    try:
        with Client(handle.address) as client:
            monkeypatch.setattr(SQLiteRunStore, "create_run", another_call_first)
            run = client.start_run(_quadratic(rng), np.zeros(15), method="newton",
                                   stopping={"max_iterations": 2})  # fmt: skip
            monkeypatch.undo()
            assert run.wait(30).status == "FINISHED"
    finally:
        handle.stop()
