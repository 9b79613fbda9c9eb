"""SIGTERM while a run is inside a long iteration (longer than the grace period): the server
process closes its store while the worker still computes, yet exits 0 with no exception trace,
and the stored run (read straight from the SQLite file, without a restart) is INTERRUPTED with
every stored record counted."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import sqlite3
import sys
import time

import numpy as np
import pytest
from conftest import free_port, server_output, spawn_server
from hessian_client import Client, problems, status_name
from long_runs import SADDLE_FREE_THREE

# A saddle-free iteration (autograd Hessian + eigendecomposition) whose step the server holds
# until its store has closed (held_server.py), so it outlasts the 0.1 s grace however fast the
# machine; n = 100 keeps the step itself cheap once released.
N = 100
SPEC = SADDLE_FREE_THREE


@pytest.mark.slow
def test_sigterm_during_a_long_iteration_leaves_the_run_interrupted_and_no_trace(tmp_path):
    port = free_port()
    flags = ("--grace-seconds", "0.1", "--log-format", "text")
    proc = spawn_server(tmp_path, port, *flags, hold="store_closed:0")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            run = c.start_run(problems.rosenbrock(dim=N), np.zeros(N), **SPEC)
            deadline = time.monotonic() + 30
            while status_name(c.get_run(run.id)) != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert status_name(c.get_run(run.id)) == "RUNNING"
            assert c.get_run(run.id).num_records == 0, "still inside its first iteration"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log = server_output(proc)
    assert "Traceback" not in log and "internal error" not in log, log
    assert f"run {run.id} ended after the store closed" in log, "the worker outlived the store"
    with sqlite3.connect(tmp_path / "runs.sqlite3") as db:
        status, reason, kept = db.execute(
            "SELECT status, stop_reason, num_records FROM runs WHERE run_id = ?", (run.id,)
        ).fetchone()
        stored = db.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (run.id,)).fetchone()
    assert (status, reason) == ("INTERRUPTED", "shutdown")
    assert kept == stored[0] < SPEC["stopping"]["max_iterations"] + 1


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send `signum` to one thread of another process (Linux tgkill)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # 234: SYS_tgkill on x86_64
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="tgkill number"
)
def test_sigterm_delivered_to_a_worker_thread_still_drains_and_exits(tmp_path):
    # The kernel may hand a process-wide SIGTERM to any thread (gRPC's, OpenMP's); Python runs
    # the handler only once the main thread wakes, so the main thread must not wait untimed.
    port = free_port()
    proc = spawn_server(tmp_path, port)
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
        workers = [t for t in tids if t != proc.pid]
        assert workers, "the server runs more than its main thread"
        _tgkill(proc.pid, workers[-1], signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "draining" in server_output(proc)
