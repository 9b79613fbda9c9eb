"""Past one machine: StartRun+WatchRun throughput with 1, 2 and 3 replicas on one
PostgreSQL, and the per-record cost of the PostgreSQL store against SQLite.

A throwaway PostgreSQL 15 (initdb + pg_ctl, as the tests start it) serves every replica;
replicas are real `hessian-server --store postgresql://...` processes; clients are threads
with one round-robin Client over all replicas, each job a StartRun then a WatchRun of every
record. All replicas share this machine's cores, so more replicas here measure overhead and
contention, not scale-out. HESSIAN_BENCH_QUICK=1 runs a few-second smoke version.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from common import markdown_table

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "service"))

from postgres_fixture import PostgresServer, find_bin  # noqa: E402

TITLE = "Scaling out: replicas on PostgreSQL, store cost per record"
QUICK = os.environ.get("HESSIAN_BENCH_QUICK", "") not in ("", "0")
JOB_SECONDS = 2.0 if QUICK else 15.0
CLIENT_THREADS = 4 if QUICK else 8
STORE_RECORDS = 2_000 if QUICK else 50_000
ITERATIONS = 20


def _progress(message: str) -> None:
    print(f"[bench postgres] {message}", file=sys.stderr, flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_cost(dsn: str, tmp: pathlib.Path) -> list[list[str]]:
    """Seconds per appended record (committed in batches of 256) and per checkpoint."""
    from hessian_service.engine.records import StepRecord
    from hessian_service.store import PostgresRunStore, RunRow, SQLiteRunStore, StoredCheckpoint

    rows = []
    for name, store in (
        ("SQLite (WAL, synchronous=NORMAL)", SQLiteRunStore(tmp / "sqlite")),
        ("PostgreSQL 15 (loopback, fsync off)", PostgresRunStore(dsn)),
    ):
        cp = StoredCheckpoint(0, "float64", [1000], bytes(8000), {})
        store.create_run(RunRow("r-bench", "p", {"options": {}, "stopping": {}}), cp)
        start = time.perf_counter()
        for i in range(STORE_RECORDS):
            store.append_record("r-bench", StepRecord(iteration=i, loss=1.0 / (i + 1)))
        store.flush()
        per_record = (time.perf_counter() - start) / STORE_RECORDS
        start = time.perf_counter()
        for i in range(20):
            store.put_checkpoint("r-bench", StoredCheckpoint(i + 1, "float64", [1000], bytes(8000)))
        per_checkpoint = (time.perf_counter() - start) / 20
        store.close()
        rows.append(
            [
                name,
                f"{per_record * 1e6:.1f} µs",
                f"{1 / per_record:,.0f}",
                f"{per_checkpoint * 1e3:.2f} ms",
            ]
        )
    return rows


def _spawn(dsn: str, port: int, name: str, tmp: pathlib.Path) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hessian_service.server",
            "--address",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp / name),
            "--store",
            dsn,
            "--replica-id",
            name,
            "--workers",
            "2",
            "--commit-interval-ms",
            "50",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait_serving(address: str) -> None:
    from hessian_client import Client

    deadline = time.monotonic() + 120
    while True:
        try:
            with Client(address, timeout=2) as c:
                c.info()
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def throughput(dsn: str, replicas: int, tmp: pathlib.Path) -> list[str]:
    """Jobs (StartRun + WatchRun of all records) per second through `replicas` servers."""
    from hessian_client import Client, problems

    ports = [_port() for _ in range(replicas)]
    procs = [_spawn(dsn, p, f"r{replicas}-{i}", tmp) for i, p in enumerate(ports)]
    try:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        for a in addresses:
            _wait_serving(a)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((200, 8))
        problem = problems.logistic_regression(x, (x[:, 0] > 0).astype(np.float64), l2=1e-3)
        done, latencies, lock = [0], [], threading.Lock()
        stop = time.monotonic() + JOB_SECONDS

        def client() -> None:
            with Client(addresses if replicas > 1 else addresses[0]) as c:
                pid = c.create_problem(problem)
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    run = c.start_run(pid, method="newton",
                                      stopping={"max_iterations": ITERATIONS,
                                                "gradient_tolerance": 0.0,
                                                "function_tolerance": 0.0,
                                                "parameter_tolerance": 0.0})  # fmt: skip
                    records = sum(1 for _ in run.stream())
                    assert records == ITERATIONS + 1, records
                    with lock:
                        done[0] += 1
                        latencies.append(time.perf_counter() - t0)

        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        latencies.sort()
        p50 = latencies[len(latencies) // 2] if latencies else float("nan")
        return [str(replicas), str(done[0]), f"{done[0] / elapsed:.1f}", f"{p50 * 1e3:.0f} ms"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
            p.log.close()


def run() -> str:
    bindir = find_bin()
    if bindir is None:
        return "Skipped: no PostgreSQL binaries (initdb, pg_ctl) on this machine."
    server = PostgresServer(bindir, _port())
    server.init()
    server.start()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-pg-"))
    load_before = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    try:
        _progress("store cost per record")
        cost = store_cost(server.create_database(), tmp)
        dsn = server.create_database()
        rows = []
        for n in (1, 2, 3):
            _progress(f"throughput with {n} replica(s)")
            rows.append(throughput(dsn, n, tmp))
    finally:
        server.stop("immediate")
        server.remove()
    load_after = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return "\n\n".join(
        [
            f"Load average before / after: {load_before} → {load_after}"
            + (" (quick smoke run)" if QUICK else ""),
            f"Store cost: {STORE_RECORDS:,} records appended and committed in batches of 256, "
            "then 20 checkpoints of 8 KB (one run).",
            markdown_table(["store", "per record", "records/s", "per checkpoint"], cost),
            f"StartRun + WatchRun (Newton, {ITERATIONS} iterations, logistic regression "
            f"200x8), {CLIENT_THREADS} client threads round robin over the replicas for "
            f"{JOB_SECONDS:.0f} s; all replicas and PostgreSQL share this machine.",
            markdown_table(["replicas", "jobs", "jobs/s", "median job"], rows),
        ]
    )


if __name__ == "__main__":
    print(run())
