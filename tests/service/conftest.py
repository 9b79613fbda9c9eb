"""A real hessian server on a free loopback port, shared by the service tests (no gRPC mocks)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hessian_client import Client
from hessian_client.proto import service_pb2_grpc
from hessian_service.server import ServerConfig, build_server

ROOT = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: pathlib.Path, **overrides):
    """An in-process server on a free port with a fresh data directory."""
    values = {
        "address": "127.0.0.1:0",
        "data_dir": str(tmp),
        "workers": 2,
        "max_params": 50_000,
        "commit_interval_ms": 50,
        "grace_seconds": 2.0,
    }
    values.update(overrides)
    return build_server(ServerConfig(**values))


def spawn_server(
    data_dir: pathlib.Path, port: int, *extra: str, hold: str | None = None
) -> subprocess.Popen:
    """`python -m hessian_service.server` in a subprocess; returns once it is SERVING.

    Its output (a JSON log line per RPC) goes to the file `proc.log_path`, not a pipe: a pipe
    nobody reads fills up and blocks the server. `hold` ("WHEN:ITERATION"): the same server
    run by held_server.py, whose runs hold at that iteration (see there).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    entry = ["-m", "hessian_service.server"]
    if hold is not None:
        env["HESSIAN_TEST_HOLD"] = hold
        entry = [str(pathlib.Path(__file__).with_name("held_server.py"))]
    with tempfile.NamedTemporaryFile(prefix="hessian-server-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                *entry,
                "--address",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(data_dir),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    proc.log_path = log.name  # type: ignore[attr-defined]
    wait_serving(f"127.0.0.1:{port}", proc)
    return proc


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Poll grpc.health.v1 until the server answers SERVING (the channel retries a refused
    connection within a second, not on gRPC's default backoff, which grows to minutes)."""
    deadline = time.monotonic() + timeout
    fast_retry = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    with grpc.insecure_channel(address, options=fast_retry) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                out = server_output(proc)
                raise RuntimeError(f"server exited with {proc.returncode}: {out}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING after {timeout} s")


def server_output(proc: subprocess.Popen) -> str:
    """What a spawned server has written so far (its log file, else its stdout pipe)."""
    path = getattr(proc, "log_path", None)
    if path is not None:
        return pathlib.Path(path).read_text()
    return proc.stdout.read().decode() if proc.stdout else ""


def occupy_workers(handle) -> threading.Event:
    """Give every run worker of `handle` a wait on the returned event: runs started meanwhile
    stay QUEUED (live, counted against the limits) until the caller sets it."""
    gate = threading.Event()
    for _ in range(handle.config.workers):
        handle.runs._executor.submit(gate.wait)
    return gate


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` passes (False): the timeout
    guards against a hang, it is not a timing claim."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def hold_record(
    monkeypatch: pytest.MonkeyPatch,
    store,
    iteration: int,
    until: Callable[[str], bool],
    *,
    only: Callable[[str], bool] | None = None,
    reached: threading.Event | None = None,
    timeout: float = 60.0,
) -> list[bool]:
    """Make a run's worker wait before it stores record `iteration` until `until(run_id)`,
    so the run is certainly still executing at that record however slow the machine.

    `only(run_id)` picks the runs to hold (default all); `reached` is set when a worker
    starts waiting; `monkeypatch` undoes the hold after the test. Returns a list that gets,
    per hold, whether `until` came true within `timeout` (a hang guard): a test asserts
    its holds really happened.
    """
    append = store.append_record
    held: list[bool] = []

    def held_append(run_id, record):
        if record.iteration == iteration and (only is None or only(run_id)):
            if reached is not None:
                reached.set()
            held.append(wait_until(lambda: until(run_id), timeout))
        append(run_id, record)

    monkeypatch.setattr(store, "append_record", held_append)
    return held


def health_status(address: str) -> int:
    """The server's overall health status (a liveness check, not a speed one: a loaded server
    has a minute to answer)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=60).status


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("hessian-data"))
    yield handle
    handle.stop(grace=1.0)


@pytest.fixture(scope="session")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.HessianServiceStub(channel)
