"""One server per --data-dir. A second server on a live server's directory (same port or
not) and --recover-store on it exit 2 naming the holder, and leave its running run RUNNING;
before, each marked that run INTERRUPTED at start (a resume then ran it in two processes)
and the recovery renamed the file under the live writer. The lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, free_port, spawn_server, start_server, wait_until
from hessian_client import Client, problems

LONG = {"method": "gradient_descent", "learning_rate": 1e-4,
        "stopping": {"max_iterations": 1_000_000, "gradient_tolerance": 0.0}}  # fmt: skip


def _server(data_dir, port: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hessian_service.server", "--address",
               f"127.0.0.1:{port}", "--data-dir", str(data_dir), *extra]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_second_server_and_a_recovery_leave_a_live_directory_alone(tmp_path):
    port = free_port()
    first = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            run = client.start_run(problems.rosenbrock(dim=10), np.zeros(10), **LONG)
            assert wait_until(lambda: client.get_run(run.id).status == "RUNNING")
            holder = f"in use by another hessian-server (pid {first.pid}"
            for extra_port, extra in ((free_port(), ()), (port, ()), (free_port(), ("--recover-store",))):  # fmt: skip  # noqa: E501
                refused = _server(tmp_path, extra_port, *extra)
                assert refused.returncode == 2, refused.stderr
                assert holder in refused.stderr and "--data-dir" in refused.stderr
                info = client.get_run(run.id)
                assert info.status == "RUNNING", info.message
            assert not (tmp_path / "runs.sqlite3.damaged").exists()
            before = client.get_run(run.id).num_records
            assert wait_until(lambda: client.get_run(run.id).num_records > before)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # the lock died with its holder: the next server opens the directory, the run resumable
    port = free_port()
    second = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert client.get_run(run.id).status == "INTERRUPTED"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0


def test_a_stopped_or_failed_server_lets_its_directory_go(tmp_path):
    handle = start_server(tmp_path)
    handle.stop()
    again = start_server(tmp_path)  # the same directory, in the same process
    try:
        refused = _server(tmp_path, free_port())
        assert refused.returncode == 2 and f"pid {os.getpid()}" in refused.stderr
    finally:
        again.stop()
    # a start that fails after opening the store (its port is taken) holds nothing either
    holder = start_server(tmp_path / "other")
    try:
        with pytest.raises(RuntimeError):  # gRPC: the port is taken
            start_server(tmp_path, address=holder.address)
        handle = start_server(tmp_path)
        handle.stop()
    finally:
        holder.stop()


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    # the server followed it and truncated the target to its pid
    data = tmp_path / "data"
    data.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("important content")
    (data / "server.lock").symlink_to(precious)
    refused = _server(data, free_port())
    assert refused.returncode == 2
    assert "server.lock is a symbolic link" in refused.stderr, refused.stderr
    assert precious.read_text() == "important content"


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")
    refused = _server(plain, free_port())
    assert refused.returncode == 2
    assert f"the data directory {plain} is not a directory" in refused.stderr, refused.stderr
