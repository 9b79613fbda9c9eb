"""SIGKILL the server in the middle of 20 concurrent runs, restart it on the same data: every
record a client received is served again, each run is INTERRUPTED or finished, and ResumeRun
takes the interrupted ones to the same records and final loss as uninterrupted runs."""

from __future__ import annotations

import contextlib
import pathlib
import signal
import sqlite3
import time

import pytest
from conftest import free_port, spawn_server
from hessian_client import Client, status_name
from sigkill_runs import RUNS, Watcher, kind, problem, served_records, specs

SPECS = specs(150, 300)


def _running_threads(pid: int) -> int:
    """Threads of process `pid` not yet stopped (one that exits meanwhile counts as stopped)."""
    count = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        count += state not in ("T", "t")
    return count


def _freeze(proc) -> None:
    """SIGSTOP the server and wait until every one of its threads is stopped."""
    proc.send_signal(signal.SIGSTOP)
    while _running_threads(proc.pid):
        time.sleep(0.001)


def _stored(data_dir: pathlib.Path) -> tuple[int, dict[str, str]]:
    """(records committed, status by run id) as the server's SQLite file holds them now."""
    uri = f"file:{data_dir / 'runs.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        committed = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return committed, dict(db.execute("SELECT run_id, status FROM runs").fetchall())


@pytest.mark.slow
def test_sigkill_during_20_runs_loses_no_acknowledged_record_and_resume_matches(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    flags = ("--workers", "4", "--checkpoint-every", "25", "--commit-interval-ms", "100")
    proc = spawn_server(tmp_path, port, *flags)
    try:
        with Client(address) as c:
            ids = []
            for i in range(RUNS):
                name, seed = kind(i)
                spec = SPECS[name]
                ids.append(c.start_run(problem(seed), seed=0, name=f"{name}-{seed}", **spec).id)
        watchers = [Watcher(address, run_id) for run_id in ids]
        for w in watchers:
            w.start()
        # Kill at a point of progress, not of time: freeze the server, read its store, and
        # kill it there once 1200 of the 4520 records are committed (so most runs cannot
        # have finished, however fast or loaded the machine) and a watcher has some.
        deadline = time.monotonic() + 300  # a hang guard
        while True:
            _freeze(proc)
            committed, at_kill = _stored(tmp_path)
            if committed >= 1200 and any(w.seen for w in watchers):
                break
            assert time.monotonic() < deadline, f"{committed} records committed"
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    for w in watchers:
        w.join(30)
    seen = {w.run_id: w.seen for w in watchers}
    assert sum(map(len, seen.values())) > 0

    proc = spawn_server(tmp_path, port, *flags)
    try:
        with Client(address) as c:
            statuses = {}
            for run_id in ids:
                info = c.get_run(run_id)
                statuses[run_id] = status_name(info)
                served = served_records(c, run_id)
                assert served[: len(seen[run_id])] == seen[run_id], run_id
                assert [it for it, _ in served] == list(range(len(served)))
                assert info.num_records == len(served)
            assert set(statuses.values()) <= {"INTERRUPTED", "FINISHED"}
            interrupted = [r for r, s in statuses.items() if s == "INTERRUPTED"]
            # Interrupted: what the store held unfinished at the kill (a subset: a commit under
            # way at the SIGSTOP may still finish one on recovery). At least 4: the kill came
            # at the first frozen look past 1200 of 4520 records, and 1200 finish at most 7.
            assert set(interrupted) <= {r for r, s in at_kill.items() if s != "FINISHED"}
            assert len(interrupted) >= 4, (statuses, at_kill)
            resumed = [c.resume_run(run_id) for run_id in interrupted]
            references = {}
            for i in range(4):
                name, seed = kind(i)
                run = c.start_run(problem(seed), seed=0, **SPECS[name])
                references[(name, seed)] = served_records(c, run.id)
            for run in resumed:
                assert status_name(run.wait(120)) == "FINISHED"
            for i, run_id in enumerate(ids):
                name, seed = kind(i)
                info = c.get_run(run_id)
                assert status_name(info) == "FINISHED"
                reference = references[(name, seed)]
                assert info.last_record.loss == reference[-1][1], (run_id, statuses[run_id])
                assert served_records(c, run_id) == reference
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
