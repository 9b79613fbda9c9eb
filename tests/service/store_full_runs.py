"""The run a store's size cap stops, shared by the SQLite and PostgreSQL cap tests: 800
gradient-descent steps on Rosenbrock (about 300 KB of records, far over the caps used), and
the check that, resumed once the cap is lifted, it lost nothing a client saw and equals a
run that was never stopped."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hessian_client import Client, ResourceExhausted, problems, status_name
from long_runs import EXACT

CAPPED_ITERATIONS = 800
STOPPING = {"max_iterations": CAPPED_ITERATIONS, **EXACT}
GD = {"method": "gradient_descent", "learning_rate": 1e-3}


def start_capped_run(client: Client) -> Any:
    """Start the run (from the origin) that fills the store."""
    return client.start_run(problems.rosenbrock(dim=2), np.zeros(2), stopping=STOPPING, **GD)


def stream_until_full(run: Any) -> list[tuple[int, float]]:
    """(iteration, loss) of every record the run's stream showed before the store refused
    more (the stream must end with ResourceExhausted naming the full store)."""
    seen = []
    with pytest.raises(ResourceExhausted, match=r"run store .* is full"):
        for record in run.stream():
            seen.append((record.iteration, record.loss))
    return seen


def assert_resumed_run_lost_nothing(
    client: Client, run_id: str, seen: list[tuple[int, float]], timeout: float
) -> None:
    """Resume the stopped run to its end: every record seen survived, and its records equal
    those of the same run never stopped."""
    final = client.resume_run(run_id).wait(timeout)
    assert status_name(final) == "FINISHED", final.message
    stored = [(r.iteration, r.loss) for r in client.run(run_id).stream()]
    assert stored[: len(seen)] == seen, "every record a client saw survived"
    reference = start_capped_run(client)
    assert stored == [(r.iteration, r.loss) for r in reference.stream()]
