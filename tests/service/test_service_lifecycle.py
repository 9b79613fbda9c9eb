"""The server process: SIGTERM drains (health NOT_SERVING, runs stopped with records kept),
a restart serves every stored run, and ResumeRun finishes an interrupted run with exactly
the records an uninterrupted run of the same spec produces."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import free_port, spawn_server
from hessian_client import Client, problems, status_name

HELD_AT = 7  # the first server's run waits at iteration 7 until SIGTERM's drain cancels it
SPEC = {
    "method": "newton",
    "damping": 1e-3,
    "backend": "autograd",
    "stopping": {
        "max_iterations": 24,
        "gradient_tolerance": 0.0,
        "function_tolerance": 0.0,
        "parameter_tolerance": 0.0,
    },
}


def _problem():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((48, 5))
    y = np.tanh(x @ rng.standard_normal((5, 1)))
    return problems.mlp(x, y, layer_sizes=[5, 6, 1], l2=1e-3)


@pytest.mark.slow
def test_sigterm_then_restart_then_resume_matches_an_uninterrupted_run(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The run holds at iteration 7 until the drain cancels it (held_server.py), so SIGTERM
    # lands mid-run however fast its millisecond steps are; its records are the same.
    flags = ("--checkpoint-every", "5", "--grace-seconds", "5")
    proc = spawn_server(tmp_path, port, *flags, hold=f"cancelled:{HELD_AT}")
    try:
        with Client(address) as c:
            run = c.start_run(_problem(), seed=0, **SPEC)
            for record in run.stream():
                if record.iteration >= HELD_AT - 1:
                    break
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0  # the bound only guards against a hang
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = spawn_server(tmp_path, port)
    try:
        with Client(address) as c:
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED"
            kept = list(c.run(run.id).stream())
            assert len(kept) == info.num_records == HELD_AT
            assert [r.iteration for r in kept] == list(range(len(kept)))
            resumed = c.resume_run(run.id)
            after = list(resumed.stream(len(kept)))
            assert status_name(resumed.final) == "FINISHED"
            combined = kept + after
            assert [r.iteration for r in combined] == list(range(25))
            whole = c.start_run(_problem(), seed=0, **SPEC)
            reference = list(whole.stream())
            assert [r.loss for r in combined] == [r.loss for r in reference]
            assert [r.step_norm for r in combined] == [r.step_norm for r in reference]
            assert c.get_run(run.id).last_record.loss == reference[-1].loss
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
