"""The benchmark helpers the verdicts rest on (bench/common.py): interleaved rounds, the
unreliable-load flag, the CPU burner of a loaded run, and the others' load sampler."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import common


def _state(pid: int) -> str | None:
    stat = common._proc_stat(str(pid))
    return None if stat is None else stat[0]


def _cmdline(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_text()


def test_interleaved_rounds_time_every_call_once_per_round_alternating_the_order():
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    common.interleaved_medians(calls, rounds=4, warmup=1)
    assert order == list("abc") + list("abc" + "cba" + "abc" + "cba")


def test_a_section_is_flagged_unreliable_only_when_other_load_moved_by_more_than_1():
    assert "Unreliable" not in common.load_line(2.0, 3.0, (2.0, 5.0))
    assert "Unreliable" not in common.load_line(3.0, 2.0, (0.0, 0.0))
    flagged = common.load_line(0.5, 1.75, (0.5, 3.0))
    assert "**Unreliable**" in flagged and "moved by 1.25" in flagged
    assert "**Unreliable**" in common.load_line(4.0, 2.5, (4.0, 2.5))


def test_the_burner_spins_one_process_per_core_and_stops_them():
    burner = common.CpuBurner(processes=2)
    with burner.running():
        pids = [p.pid for p in burner.procs]
        assert len(pids) == 2
        # busy-looping: both are seen runnable (R) at one moment, at once or soon (a spinning
        # process can still be caught in D for an instant, a page fault: the states asserted
        # are the ones the loop saw, not a fresh read); 60 s only guards a hang
        deadline = time.monotonic() + 60
        states = [_state(pid) for pid in pids]
        while states != ["R", "R"] and time.monotonic() < deadline:
            time.sleep(0.01)
            states = [_state(pid) for pid in pids]
        assert states == ["R", "R"]
    assert burner.procs == []
    assert all(_state(pid) is None for pid in pids), "killed and reaped"


def _children(pid: int) -> list[int]:
    return [
        int(e.name)
        for e in os.scandir("/proc")
        if e.name.isdigit() and (stat := common._proc_stat(e.name)) and stat[1] == pid
    ]


def test_own_running_threads_count_children_but_not_burners():
    # a sleeping parent with two spinning children, one of them marked as a burner
    spawn = (
        "import subprocess, sys, time\n"
        "spin = [sys.executable, '-c', 'while True: pass']\n"
        f"subprocess.Popen(spin + [{common.BURNER_MARK!r}])\n"
        "subprocess.Popen(spin)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    try:
        # A spinner can be caught off the CPU for an instant (D: a page fault), so a single
        # count may read 0: sample until it reads 1, the unmarked spinner, and never more
        # (the burner and the sleeping parent never count). 60 s only guards a hang.
        deadline = time.monotonic() + 60
        counts: list[int] = []  # taken once both children exist and the parent sleeps
        while time.monotonic() < deadline and (not counts or counts[-1] != 1):
            kids = _children(parent.pid)
            if len(kids) == 2 and _state(parent.pid) == "S":
                counts.append(common._own_running(parent.pid))
            time.sleep(0.01)
        assert counts and counts[-1] == 1 and max(counts) == 1, counts
        # without the unmarked spinner only the burner spins: every count is 0 (a count
        # that included the burner would read 1 here)
        unmarked = [k for k in kids if common.BURNER_MARK not in _cmdline(k)]
        assert len(kids) == 2 and len(unmarked) == 1
        os.kill(unmarked[0], signal.SIGKILL)
        while _state(unmarked[0]) not in (None, "Z") and time.monotonic() < deadline + 60:
            time.sleep(0.01)
        assert _state(unmarked[0]) in (None, "Z"), "the killed spinner is gone"
        assert [common._own_running(parent.pid) for _ in range(20)] == [0] * 20
    finally:
        for pid in _children(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait(30)
