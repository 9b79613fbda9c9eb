"""`hessian` in a real terminal (a pty): the progress bar's rate, ETA and final n/n, and
Ctrl-C cancelling the run (or, detached, leaving it running) with exit code 130."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

from long_runs import start_endless_run


class Terminal:
    """`python -m hessian_client ARGS` on a pty it controls (so ^C is a real SIGINT)."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal
            # as at a user's prompt: a suite started in the background (`make test &` from a
            # script) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, "-m", "hessian_client", *args])
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.pid, self.fd, self.text = pid, fd, ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Read the terminal until `pattern` appears (a hang guard, not a timing check)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text)
            if match:
                return match
            if not self._read(0.2):
                break
        raise AssertionError(f"{pattern!r} never appeared in {self.text!r}")

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if ready:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                return False
            if not chunk:
                return False
            self.text += chunk.decode(errors="replace")
        return True

    def finish(self, timeout: float = 60.0) -> int:
        """Read to the end; the child's exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(0.2):
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)  # a hang guard: the command never exited
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the command hung; its terminal showed {self.text!r}")


def test_progress_bar_has_rate_eta_and_ends_at_the_last_iteration(server):
    term = Terminal(
        "--address",
        server.address,
        "run",
        "--objective",
        "rosenbrock",
        "--method",
        "newton",
        "--step-policy",
        "line_search",
        "--max-iterations",
        "100",
    )
    assert term.finish() == 0, term.text
    records = int(re.search(r"FINISHED stop=gradient_tolerance records=(\d+)", term.text)[1])
    last = records - 1
    assert last < 100  # an early finish: the bar must not stay at last/100
    assert re.search(rf"100%\|[^\n]*\| {last}/{last} \[", term.text), term.text
    assert "it/s" in term.text and "loss" in term.text and "|g|" in term.text
    assert "<" in term.text  # tqdm's [elapsed<remaining] ETA


def test_ctrl_c_cancels_the_run_and_exits_130(server, client):
    term = Terminal(
        "--address",
        server.address,
        "run",
        "--objective",
        "rosenbrock",
        "--method",
        "gradient_descent",
        "--lr",
        "1e-6",
        "--max-iterations",
        str(10**6),
        "--gradient-tolerance",
        "0",
        "--function-tolerance",
        "0",
        "--parameter-tolerance",
        "0",
    )
    run_id = term.read_until(r"run (r-[0-9a-f]+)")[1]
    try:
        term.read_until(r"[1-9]\d*/1000000")  # the bar has moved: the run is executing
        os.write(term.fd, b"\x03")
        assert term.finish() == 130, term.text
        assert "Traceback" not in term.text and "KeyboardInterrupt" not in term.text
        assert f"cancel requested for run {run_id}" in term.text
        assert client.run(run_id).wait(timeout=60).status == "CANCELLED"
    finally:  # a failure must not leave an endless run holding the shared server's workers
        client.cancel_run(run_id)


def test_ctrl_c_with_detach_leaves_the_run_running_and_says_so(server, client):
    run = start_endless_run(client)
    try:
        term = Terminal("--address", server.address, "watch", run.id, "--detach")
        term.read_until(r"\n\s+\d+ loss")
        os.write(term.fd, b"\x03")
        assert term.finish() == 130, term.text
        assert "Traceback" not in term.text
        assert f"run {run.id} keeps running" in term.text
        assert client.get_run(run.id).status == "RUNNING"
    finally:
        run.cancel()
    assert run.wait(timeout=60).status == "CANCELLED"
