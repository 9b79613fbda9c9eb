"""Client-side load balancing over replicas on one PostgreSQL store: a list of addresses
spreads calls round robin over every replica, a replica whose health says NOT_SERVING
(draining) gets no more calls, and dns:/// targets work; a list of host names is refused."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hessian_client import Client, InvalidArgument, problems, status_name
from hessian_client.client import channel_target
from hessian_service.server import ServerConfig, build_server
from postgres_fixture import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401


class Count(grpc.ServerInterceptor):
    """Counts the hessian calls one replica serves (health checks are not counted)."""

    def __init__(self, name: str, seen: collections.Counter, lock: threading.Lock) -> None:
        self.name, self.seen, self.lock = name, seen, lock

    def intercept_service(self, continuation, details):
        if details.method.startswith("/hessian."):
            with self.lock:
                self.seen[self.name] += 1
        return continuation(details)


def _replicas(tmp_path, dsn, n):
    seen: collections.Counter = collections.Counter()
    lock = threading.Lock()
    handles = []
    for i in range(n):
        config = ServerConfig(
            address="127.0.0.1:0", data_dir=str(tmp_path / f"r{i}"), store=dsn,
            replica_id=f"r{i}", max_params=50_000, commit_interval_ms=20, grace_seconds=2.0,
        )  # fmt: skip
        handles.append(build_server(config, interceptors=[Count(f"r{i}", seen, lock)]))
    return handles, seen


def test_a_list_of_addresses_spreads_calls_and_skips_a_draining_replica(tmp_path, postgres_dsn):
    handles, seen = _replicas(tmp_path, postgres_dsn, 3)
    try:
        with Client([h.address for h in handles]) as c:
            x = np.random.default_rng(0).standard_normal((50, 3))
            problem = problems.least_squares(x, x @ np.ones(3))
            runs = [c.start_run(problem, method="newton", stopping={"max_iterations": 3})
                    for _ in range(9)]  # fmt: skip
            for r in runs:
                assert status_name(r.wait(60)) == "FINISHED"
            assert set(seen) == {"r0", "r1", "r2"} and min(seen.values()) >= 3, seen
            handles[0].events.run(handles[0].health.enter_graceful_shutdown())
            # the health watch reaches the client and r0 drops out of the rotation: while it
            # is in, any 3 calls in a row (round robin over 3) reach it once
            misses, deadline = 0, time.monotonic() + 60  # a hang guard
            while misses < 3 and time.monotonic() < deadline:
                before = seen["r0"]
                c.info()
                misses = misses + 1 if seen["r0"] == before else 0
            assert misses == 3, "r0 kept getting calls after it began draining"
            seen.clear()
            for _ in range(12):
                c.info()
            assert seen["r0"] == 0 and seen["r1"] + seen["r2"] == 12, seen
            assert seen["r1"] > 0 and seen["r2"] > 0, seen
    finally:
        for h in handles:
            h.stop()


def test_health_watch_streams_through_the_interceptors(server):
    """Client-side health checking uses Health.Watch; it must not fail in the server's
    interceptors (it failed with a TypeError: the handler writes with context.write)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_a_dns_target_reaches_a_replica(tmp_path, postgres_dsn):
    handle = start_server(tmp_path, store=postgres_dsn)
    try:
        port = handle.address.rsplit(":", 1)[1]
        with Client(f"dns:///localhost:{port}") as c:
            assert c.info().version
    finally:
        handle.stop()


@pytest.mark.parametrize(
    ("address", "target"),
    [
        (["127.0.0.1:1", "127.0.0.1:2"], ("ipv4:127.0.0.1:1,127.0.0.1:2", True)),
        (["[::1]:1", "[::1]:2"], ("ipv6:[::1]:1,[::1]:2", True)),
        (["10.0.0.1:5"], ("10.0.0.1:5", False)),
        ("dns:///hessian:50051", ("dns:///hessian:50051", True)),
        ("localhost:50051", ("localhost:50051", False)),
    ],
)
def test_channel_targets(address, target):
    assert channel_target(address) == target


def test_a_list_of_names_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match=r"address.*dns:///name:port"):
        Client(["a.example:1", "b.example:2"])
