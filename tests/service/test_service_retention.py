"""Store retention (--max-stored-runs), acknowledgement only after commit, and a full or
unwritable store: a clear error at start-up or on the affected RPC, never a silent loss."""

from __future__ import annotations

import os
import pathlib
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, free_port, spawn_server, start_server, wait_until
from hessian_client import Client, ResourceExhausted, problems, status_name
from hessian_service.engine.records import StepRecord
from hessian_service.engine.solvers.methods import Stepper
from hessian_service.server.runs import LiveRun, RunManager
from hessian_service.store import (
    RunRow,
    SQLiteRunStore,
    StoredCheckpoint,
    StoreError,
    StoreFullError,
)

GD = {"method": "gradient_descent", "learning_rate": 1e-4}


def _row(run_id: str, created: float, status: str) -> RunRow:
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 5}}
    return RunRow(run_id, "p-1", spec, status=status, created_at=created)


def _cp() -> StoredCheckpoint:
    return StoredCheckpoint(0, "float64", [2], bytes(16), {})


def _committed(path, run_id: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM records WHERE run_id = ?", (run_id,)).fetchone()[0]


def test_retention_deletes_the_oldest_finished_runs_and_never_an_active_one(tmp_path):
    store = SQLiteRunStore(tmp_path)
    statuses = ["RUNNING", "FINISHED", "QUEUED", "CANCELLED", "FAILED", "INTERRUPTED", "FINISHED"]
    for i, status in enumerate(statuses):
        store.create_run(_row(f"r-{i}", float(i), status), _cp())
        store.append_record(f"r-{i}", StepRecord(iteration=0, loss=1.0))
    store.flush()
    assert store.enforce_retention(4) == ["r-1", "r-3", "r-4"]
    left = {r.run_id for r in store.list_runs([], 100, None)}
    assert left == {"r-0", "r-2", "r-5", "r-6"}
    assert store.records("r-1", 0, 10) == [] and store.latest_checkpoint("r-1") is None
    # the two active runs and the resumable r-5 stay
    assert store.enforce_retention(1) == ["r-6"]
    assert store.count_runs_by_status() == {"RUNNING": 1, "QUEUED": 1, "INTERRUPTED": 1}
    assert store.enforce_retention(5) == []
    store.close()


def test_commit_listeners_hear_of_records_only_once_another_reader_can_see_them(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=3, commit_interval_s=3600)
    store.create_run(_row("r-a", 1.0, "RUNNING"), _cp())
    heard: list[tuple[dict, int]] = []
    store.add_commit_listener(lambda c: heard.append((dict(c), _committed(store.path, "r-a"))))
    for i in range(5):
        store.append_record("r-a", StepRecord(iteration=i, loss=float(i)))
    assert heard == [({"r-a": 2}, 3)]
    store.flush()
    assert heard[1] == ({"r-a": 4}, 5)
    store.close()


def test_retention_keeps_the_run_that_has_just_ended(tmp_path):
    store = SQLiteRunStore(tmp_path)
    for i, status in enumerate(["FINISHED", "FINISHED", "RUNNING"]):
        store.create_run(_row(f"r-{i}", float(i), status), _cp())
    assert store.enforce_retention(1, keep="r-0") == ["r-1"]  # not the oldest: it just ended
    assert {r.run_id for r in store.list_runs([], 100, None)} == {"r-0", "r-2"}
    store.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_runs_a_restart_finds_interrupted_survive_the_cap_and_resume(tmp_path, stop):
    """--max-stored-runs 2, three runs executing when the server process stops (shut down:
    it stores them INTERRUPTED; killed: the next start does): the next start's pass of the
    cap deleted the oldest, whose client had seen its records (NOT_FOUND for GetRun and
    ResumeRun), and each later start or end of a run deleted another. INTERRUPTED runs are
    now never the cap's: they wait for their clients (the ended ones go)."""
    port = free_port()
    proc = spawn_server(tmp_path, port, "--max-stored-runs", "2", "--workers", "3")
    try:
        with Client(f"127.0.0.1:{port}") as c:
            runs = [_long_run(c)[1] for _ in range(3)]
            seen = [r.info().num_records for r in runs]
    finally:
        proc.send_signal(stop)
        proc.wait(30)
    handle = start_server(tmp_path, max_stored_runs=2, workers=3)
    try:
        with Client(handle.address) as c:
            for run, count in zip(runs, seen, strict=True):
                info = c.get_run(run.id)
                assert info.status == "INTERRUPTED" and info.num_records >= count
            resumed = c.resume_run(runs[0].id)
            assert wait_until(lambda: c.get_run(resumed.id).num_records > seen[0] + 10)
            resumed.cancel()
            assert resumed.wait(30).status == "CANCELLED"
            # its end applied the cap (3 runs, cap 2): it is kept for its client's result,
            # and the cap takes no INTERRUPTED run (it took the oldest one left, before)
            assert {r.run_id for r in c.list_runs()} == {r.id for r in runs}
            assert [c.get_run(r.id).status for r in runs[1:]] == ["INTERRUPTED"] * 2
    finally:
        handle.stop(grace=1.0)


def _long_run(c: Client):
    """A Rosenbrock problem and a long gradient-descent run on it that has begun."""
    problem = problems.rosenbrock(dim=2)
    long = c.start_run(problem, np.zeros(2), stopping={"max_iterations": 10**6}, **GD)
    next(iter(long.stream()))
    return problem, long


def _end_before_start_returns(monkeypatch) -> None:
    """Make a short run (<= 3 iterations) end before its StartRun goes on past submitting it,
    so StartRun's own pass of the cap sees it ended."""
    real = RunManager._submit

    def submit_then_end(self, live, objective, params, options, stopping, checkpoint):
        real(self, live, objective, params, options, stopping, checkpoint)
        if stopping.max_iterations <= 3:
            with live.cond:
                assert live.cond.wait_for(lambda: live.done, 30)

    monkeypatch.setattr(RunManager, "_submit", submit_then_end)


@pytest.mark.parametrize("ends_first", [False, True], ids=["ends-later", "ends-before-start"])
def test_a_run_that_ends_while_an_older_one_runs_stays_readable_under_the_cap(
    tmp_path, monkeypatch, ends_first
):
    """Cap 1, an older run still going: the run that ends is kept for its client's result()
    (deleted at its own end, its client found NOT_FOUND), and goes once the older one ends.
    It may end before StartRun's own pass of the cap, which kept nothing and deleted it too
    (CI saw NOT_FOUND from wait())."""
    if ends_first:
        _end_before_start_returns(monkeypatch)
    handle = start_server(tmp_path, max_stored_runs=1)
    try:
        with Client(handle.address) as c:
            problem, long = _long_run(c)
            short = c.start_run(problem, np.zeros(2), stopping={"max_iterations": 3}, **GD)
            assert short.wait(30).status == "FINISHED"
            result = short.result(30)
            assert result.info.run_id == short.id and result.info.num_records == 4
            long.cancel()
            assert long.wait(30).status == "CANCELLED"
            # the cap is applied just after the end is visible (its watchers wake first)
            assert wait_until(lambda: [r.run_id for r in c.list_runs()] == [long.id])
    finally:
        handle.stop(grace=1.0)


def test_a_cap_too_small_for_any_run_is_refused_at_start_and_the_floor_holds_a_run(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--max-store-bytes", "40000",
         "--address", "127.0.0.1:0", "--data-dir", str(tmp_path / "small"), "--log-format",
         "text"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    found = re.search(
        r"--max-store-bytes 40000 cannot hold a run: .* at least (\d+) bytes", done.stderr
    )
    assert found, done.stderr
    floor = int(found.group(1))
    assert floor > 48 * 1024  # an empty store's tables alone take 48 KiB
    with pytest.raises(StoreError, match=f"give at least {floor} bytes"):
        SQLiteRunStore(tmp_path / "one-less", max_bytes=floor - 1)
    handle = start_server(tmp_path / "floor", max_store_bytes=floor)
    try:  # at the floor a short run is stored whole and read back
        with Client(handle.address) as c:
            stopping = {"max_iterations": 5, "gradient_tolerance": 0.0}
            run = c.start_run(problems.rosenbrock(dim=2), np.zeros(2), stopping=stopping)
            assert len(list(run.stream())) == 6 and run.wait().status == "FINISHED"
    finally:
        handle.stop()


def test_a_full_store_raises_and_keeps_the_records_queued(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=10, commit_interval_s=3600, max_bytes=64 * 1024)
    store.create_run(_row("r-a", 1.0, "RUNNING"), _cp())
    appended = 0
    with pytest.raises(StoreFullError, match=r"full \(--max-store-bytes 65536\)"):
        for i in range(100_000):
            appended += 1
            store.append_record("r-a", StepRecord(iteration=i, loss=float(i), backend="x" * 200))
    durable = _committed(store.path, "r-a")
    assert 0 < durable < appended
    assert len(store.records("r-a", 0, 10**6)) == durable
    with pytest.raises(StoreFullError):  # the queued records are still there, not dropped
        store.flush()
    with pytest.raises(StoreFullError):
        store.append_record("r-a", StepRecord(iteration=appended, loss=0.0))
    with pytest.raises(StoreFullError):
        store.close()


def test_server_keeps_at_most_max_stored_runs_and_spares_a_running_one(tmp_path):
    handle = start_server(tmp_path, max_stored_runs=2)
    try:
        with Client(handle.address) as c:
            problem, long = _long_run(c)
            short = []
            for _ in range(3):
                run = c.start_run(problem, np.zeros(2), stopping={"max_iterations": 3}, **GD)
                run.wait(30)
                short.append(run.id)
            kept = {r.run_id for r in c.list_runs()}
            assert kept == {long.id, short[-1]}, "oldest finished first; the running one stays"
            long.cancel()
            assert status_name(long.wait(30)) == "CANCELLED"
            c.start_run(problem, np.zeros(2), stopping={"max_iterations": 3}, **GD).wait(30)
            assert long.id not in {r.run_id for r in c.list_runs()}
            assert len(list(c.list_runs())) == 2
    finally:
        handle.stop(grace=1.0)


def test_the_stored_runs_cap_holds_once_runs_end_without_another_start(tmp_path):
    """Three runs started together end after the last start: the cap is applied as each
    ends (before, the store kept all three until some later StartRun)."""
    handle = start_server(tmp_path, max_stored_runs=2)
    try:
        with Client(handle.address) as c:
            problem, stopping = problems.rosenbrock(dim=2), {"max_iterations": 3000}
            started = {
                c.start_run(problem, np.zeros(2), stopping=stopping, **GD).id for _ in range(3)
            }
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = list(c.list_runs())
                if all(r.done for r in runs) and len(runs) <= 2:
                    break
                time.sleep(0.05)
            assert len(runs) == 2 and all(r.done for r in runs), [
                (r.run_id, r.status) for r in runs
            ]
            assert {r.run_id for r in runs} < started
    finally:
        handle.stop(grace=1.0)


def test_a_full_store_stops_the_run_with_a_clear_error_and_loses_nothing_acknowledged(
    tmp_path, monkeypatch
):
    # The run's first step waits until the watcher holds the live run, so the watcher is live
    # when the store fills (not a late one replaying a run that has already ended).
    watching = threading.Event()
    step, listen = Stepper.step, LiveRun.listen

    def held_step(self, point):
        assert watching.wait(60)
        return step(self, point)

    def watched(self, listener):
        undo = listen(self, listener)
        watching.set()  # a watcher follows the live run now
        return undo

    monkeypatch.setattr(Stepper, "step", held_step)
    monkeypatch.setattr(LiveRun, "listen", watched)
    handle = start_server(tmp_path, max_store_bytes=96 * 1024, commit_every_records=16)
    seen = []
    try:
        with Client(handle.address) as c:
            run = c.start_run(
                problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 10**6}, **GD
            )
            with pytest.raises(ResourceExhausted, match=r"run store .* is full"):
                for record in run.stream():
                    seen.append((record.iteration, record.loss))
            with pytest.raises(ResourceExhausted, match="full"):
                c.start_run(problems.rosenbrock(dim=2), np.zeros(2))
    finally:
        handle.stop(grace=1.0)
    assert len(seen) > 16
    reopened = start_server(tmp_path)  # the same data, no size cap
    try:
        with Client(reopened.address) as c:
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED"
            stored = [(r.iteration, r.loss) for r in c.run(run.id).stream()]
            assert stored[: len(seen)] == seen, "every record a client saw survived"
    finally:
        reopened.stop(grace=1.0)


def _serve(data_dir, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "hessian_service.server",
         "--address", "127.0.0.1:0", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


def test_an_unwritable_store_is_a_clear_start_up_error(tmp_path):
    (tmp_path / "runs.sqlite3").mkdir()  # the database path cannot be a file
    out = _serve(tmp_path)
    assert out.returncode == 2
    assert "--data-dir" in out.stderr and "runs.sqlite3" in out.stderr


def test_a_read_only_data_dir_is_a_clear_start_up_error(tmp_path):
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
        try:
            out = _serve(tmp_path)
        finally:
            tmp_path.chmod(0o700)
    else:  # root writes through permissions (CI runs as root): serve as nobody instead
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing to drop privileges")
        nobody = pwd.getpwnam("nobody")
        # tmp_path's parents are closed to other users; a fresh folder under /tmp is not
        data_dir = pathlib.Path(tempfile.mkdtemp(prefix="hessian-read-only-"))
        try:
            os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)
            data_dir.chmod(0o500)
            drop = [f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
            out = _serve(data_dir, [setpriv, *drop])
        finally:
            shutil.rmtree(data_dir)
    assert out.returncode == 2, out.stderr
    assert "--data-dir" in out.stderr and "cannot be written" in out.stderr, out.stderr


def test_concurrent_appends_from_many_runs_are_all_acknowledged_in_order(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_every=7, commit_interval_s=0.01)
    heard: dict[str, list[int]] = {}
    lock = threading.Lock()

    def listen(committed: dict[str, int]) -> None:
        with lock:
            for run_id, it in committed.items():
                heard.setdefault(run_id, []).append(it)

    store.add_commit_listener(listen)
    ids = [f"r-{i}" for i in range(8)]
    for i, run_id in enumerate(ids):
        store.create_run(_row(run_id, float(i), "RUNNING"), _cp())

    def work(run_id: str) -> None:
        for it in range(200):
            store.append_record(run_id, StepRecord(iteration=it, loss=float(it)))

    threads = [threading.Thread(target=work, args=(r,)) for r in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    for run_id in ids:
        assert heard[run_id] == sorted(heard[run_id]) and heard[run_id][-1] == 199
        assert [r.iteration for r in store.records(run_id, 0, 1000)] == list(range(200))
    store.close()
