"""SIGTERM while a run's iteration is inside a long torch call: the server exits 0 soon after
the drain and grace, without waiting for the iteration (an orchestrator would SIGKILL it),
and the run is INTERRUPTED and resumable after a restart. SIGHUP drains the same way."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port, server_output, spawn_server, wait_until
from hessian_client import Client, problems, status_name
from hessian_service import healthprobe
from hessian_service.engine import StopReason
from hessian_service.store import RunStatus, SQLiteRunStore
from long_runs import SADDLE_FREE_THREE, start_endless_run

GRACE = 1.0
# one saddle-free iteration (an autograd Hessian and its eigendecomposition) of a 3000-dim
# Rosenbrock on one torch thread takes ~9 s here (72 MB matrix): far past GRACE + EXIT_MARGIN
N = 3000
SPEC = SADDLE_FREE_THREE
EXIT_MARGIN = 4.0  # seconds past the grace: the drain, LINGER_SECONDS, the interpreter's exit


def _stop(proc, signum: int) -> tuple[int, float]:
    """Send `signum` and wait for the exit: (exit code, seconds it took); a server still
    running after a minute is killed."""
    signalled = time.monotonic()
    proc.send_signal(signum)
    try:
        return proc.wait(60), time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_sigterm_exits_promptly_while_an_iteration_is_in_a_long_torch_call(tmp_path):
    port = free_port()
    flags = ("--grace-seconds", str(GRACE), "--workers", "1", "--intra-op-threads", "1")
    proc = spawn_server(tmp_path, port, *flags, "--log-format", "text")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            run = c.start_run(problems.rosenbrock(dim=N), np.zeros(N), **SPEC)
            deadline = time.monotonic() + 60
            while status_name(c.get_run(run.id)) != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.5)  # inside its first iteration's Hessian or eigendecomposition
            assert c.get_run(run.id).num_records == 0, "still inside its first iteration"
    finally:
        code, took = _stop(proc, signal.SIGTERM)
    log = server_output(proc)
    assert code == 0, log
    assert took < GRACE + EXIT_MARGIN, f"exited {took:.1f} s after SIGTERM: {log}"
    assert "Traceback" not in log, log
    assert "runs cut mid-iteration (stored INTERRUPTED, resumable): 1" in log, log

    again = spawn_server(tmp_path, port, *flags)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            info = c.get_run(run.id)
            assert (status_name(info), info.stop_reason) == ("INTERRUPTED", "shutdown")
            resumed = c.resume_run(run.id)
            assert status_name(c.get_run(resumed.id)) in ("QUEUED", "RUNNING")
            c.cancel_run(run.id)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(60) == 0, server_output(again)


def test_sighup_drains_as_sigterm_does(tmp_path):
    # SIGHUP (a closed terminal, some supervisors' stop) killed the server outright: no
    # drain, its run left RUNNING until the next start found it
    port = free_port()
    # the server as a terminal would start it: a test run under nohup (CI's may be) hands
    # its children SIGHUP ignored, which the server rightly keeps (the test below)
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        proc = spawn_server(tmp_path, port, "--grace-seconds", str(GRACE), "--log-format", "text")
    finally:
        signal.signal(signal.SIGHUP, inherited)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            run = start_endless_run(c)
            assert wait_until(lambda: c.get_run(run.id).num_records > 0, 30)
    finally:
        code, _ = _stop(proc, signal.SIGHUP)
    log = server_output(proc)
    assert code == 0, log
    assert "draining" in log and "stopped" in log, log
    store = SQLiteRunStore(tmp_path)
    try:
        row = store.get_run(run.id)
    finally:
        store.close()
    assert (row.status, row.stop_reason) == (RunStatus.INTERRUPTED, StopReason.SHUTDOWN), row


def test_a_sighup_ignored_by_the_parent_stays_ignored(tmp_path):
    # nohup, `trap '' HUP`, supervisors: an inherited ignore was replaced by the drain, so
    # a closed terminal or a log rotator's HUP stopped the server
    port = free_port()
    script = (
        "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from hessian_service.server.app import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    args = ["--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path), "--grace-seconds", "1"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args])
    try:
        address = f"127.0.0.1:{port}"
        assert wait_until(lambda: healthprobe.check(address, timeout=1.0)[0], 60)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # a drain would have begun (health NOT_SERVING) and ended by now
        assert proc.poll() is None and healthprobe.check(address, timeout=1.0)[0]
    finally:
        code, _ = _stop(proc, signal.SIGTERM)
    assert code == 0
