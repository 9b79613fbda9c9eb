"""Prometheus metrics scraped over HTTP on loopback move by exactly what the calls did; every
RPC gets one JSON access-log line with its request id, echoed in the trailing metadata."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import free_port, server_output, spawn_server, start_server
from hessian_client import Client, DeadlineExceeded, NotFound, minimize, problems, tensors
from hessian_client.aio import Client as AsyncClient
from hessian_client.proto import service_pb2, service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from scipy.optimize import rosen, rosen_der, rosen_hess

LONG = {"method": "gradient_descent", "learning_rate": 1e-4}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The access-log records captured so far (the server writes each after its answer)."""
    return [r for r in caplog.records if r.name == "hessian_service.access"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("metrics"), metrics_port=free_port())
    yield handle
    handle.stop(grace=1.0)


def test_rpc_counters_latency_records_and_run_gauges_move_by_what_was_done(observed):
    port = observed.metrics_port
    before = scrape(port)
    with Client(observed.address) as c:
        for _ in range(3):
            c.info()
        for _ in range(2):
            with pytest.raises(NotFound):
                c.get_run("r-nope")
        run = c.start_run(
            problems.rosenbrock(dim=3), np.zeros(3), stopping={"max_iterations": 40}, **LONG
        )
        first = list(run.stream())
        second = list(c.run(run.id).stream())
    after = scrape(port)
    assert [r.iteration for r in first] == [r.iteration for r in second] == list(range(41))
    assert delta(before, after, "hessian_rpcs_total", method="GetServerInfo", code="OK") == 3
    assert delta(before, after, "hessian_rpcs_total", method="GetRun", code="NOT_FOUND") == 2
    assert delta(before, after, "hessian_rpcs_total", method="StartRun", code="OK") == 1
    assert delta(before, after, "hessian_rpcs_total", method="WatchRun", code="OK") == 2
    assert delta(before, after, "hessian_rpc_latency_seconds_count", method="WatchRun") == 2
    assert delta(before, after, "hessian_rpc_latency_seconds_count", method="GetServerInfo") == 3
    backend = first[0].backend
    assert delta(before, after, "hessian_records_appended_total", backend=backend) == 41
    assert delta(before, after, "hessian_runs", status="FINISHED") == 1
    assert after[("hessian_run_queue_depth", ())] == 0
    assert after[("hessian_runs_active", ())] == 0
    assert any(name == "hessian_backend_info" and v == 1 for (name, _), v in after.items())


def test_a_stream_is_timed_to_its_end_and_counted_once_however_it_ends(observed):
    port = observed.metrics_port
    with Client(observed.address) as c:
        run = c.start_run(
            problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 10**6}, **LONG
        )
        before = scrape(port)
        with grpc.insecure_channel(observed.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            opened = time.monotonic()  # before the server can start timing the call
            call = stub.WatchRun(service_pb2.WatchRunRequest(run_id=run.id))
            next(call)
            time.sleep(0.6)
            call.cancel()
        deadline = time.monotonic() + 60  # a hang guard
        while time.monotonic() < deadline:
            after = scrape(port)
            if delta(before, after, "hessian_rpc_latency_seconds_count", method="WatchRun"):
                break
            time.sleep(0.05)
        # the server observed the latency before this scrape showed it: an upper bound that
        # holds however loaded the machine is
        held = time.monotonic() - opened
        c.cancel_run(run.id)
        run.wait(30)
    assert delta(before, after, "hessian_rpcs_total", method="WatchRun", code="CANCELLED") == 1
    assert delta(before, after, "hessian_rpcs_total", method="WatchRun", code="OK") == 0
    assert delta(before, after, "hessian_rpc_latency_seconds_count", method="WatchRun") == 1
    timed = delta(before, after, "hessian_rpc_latency_seconds_sum", method="WatchRun")
    # at least the 0.6 s between the first message and the cancel (0.5: float slack)
    assert 0.5 <= timed <= held, (timed, held)


def test_request_id_is_echoed_and_logged_once_per_rpc(observed, caplog):
    caplog.set_level("INFO", logger="hessian_service.access")
    with grpc.insecure_channel(observed.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        _, call = stub.GetServerInfo.with_call(
            service_pb2.GetServerInfoRequest(), metadata=(("x-request-id", "req-42"),)
        )
        assert ("x-request-id", "req-42") in call.trailing_metadata()
        _, call = stub.GetServerInfo.with_call(service_pb2.GetServerInfoRequest())
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32 and generated != "req-42"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetRun(service_pb2.GetRunRequest(run_id="r-x"), metadata=(("x-request-id", "q"),))
        assert ("x-request-id", "q") in err.value.trailing_metadata()
    deadline = time.monotonic() + 60  # a hang guard
    while len(access_lines(caplog)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = [r.fields for r in caplog.records if r.name == "hessian_service.access"]
    assert [(x["request_id"], x["code"]) for x in lines] == [
        ("req-42", "OK"),
        (generated, "OK"),
        ("q", "NOT_FOUND"),
    ]
    assert lines[0]["method"] == "/hessian.v1.HessianService/GetServerInfo"
    assert all(x["duration_ms"] >= 0 and x["caller"] == "anonymous" for x in lines)


def test_optimize_streams_are_counted_timed_and_logged_like_other_rpcs(observed, caplog):
    """The bidi Optimize stream gets its access-log line (with the request id), its count
    by final code and its latency, once per stream: one finished, one refused."""
    caplog.set_level("INFO", logger="hessian_service.access")
    port = observed.metrics_port
    before = scrape(port)
    res = minimize(rosen, np.full(3, 0.5), jac=rosen_der, hess=rosen_hess,
                   address=observed.address)  # fmt: skip
    assert res.run_status == "FINISHED"
    refused = service_pb2.OptimizeRequest(start=service_pb2.OptimizeStart())  # no params
    with grpc.insecure_channel(observed.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        call = stub.Optimize(iter([refused]), metadata=(("x-request-id", "opt-7"),))
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "opt-7") in err.value.trailing_metadata()
    deadline = time.monotonic() + 60  # a hang guard: the server logs as the stream ends

    def logged() -> int:
        return sum(r.fields["method"].endswith("/Optimize") for r in access_lines(caplog))

    while time.monotonic() < deadline:
        after = scrape(port)
        if (
            delta(before, after, "hessian_rpc_latency_seconds_count", method="Optimize") >= 2
            and logged() >= 2
        ):
            break
        time.sleep(0.05)
    assert delta(before, after, "hessian_rpcs_total", method="Optimize", code="OK") == 1
    assert (
        delta(before, after, "hessian_rpcs_total", method="Optimize", code="INVALID_ARGUMENT") == 1
    )
    assert delta(before, after, "hessian_rpc_latency_seconds_count", method="Optimize") == 2
    lines = [r.fields for r in access_lines(caplog)]
    optimize = [x for x in lines if x["method"].endswith("/Optimize")]
    assert [x["code"] for x in optimize] == ["OK", "INVALID_ARGUMENT"]
    assert optimize[1]["request_id"] == "opt-7"


def test_an_optimize_stream_cancelled_before_its_first_request_is_logged_cancelled(
    observed, caplog
):
    """A client that opened Optimize and cancelled before sending anything was logged and
    counted INVALID_ARGUMENT ("an empty stream"): the end of its requests reached the handler
    before its cancel. A stream closed empty by its client is still refused so."""
    caplog.set_level("INFO", logger="hessian_service.access")
    port = observed.metrics_port
    before = scrape(port)
    with grpc.insecure_channel(observed.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        never = threading.Event()
        call = stub.Optimize(
            iter(lambda: never.wait(60) or None, 0), metadata=(("x-request-id", "gone-1"),)
        )
        time.sleep(0.3)  # the server has opened the stream and waits for its first request
        call.cancel()
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.Optimize(iter([]), metadata=(("x-request-id", "empty-1"),)))
        never.set()
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "an empty stream" in empty.value.details()

    def codes() -> dict[str, str]:
        lines = [r.fields for r in access_lines(caplog)]
        return {x["request_id"]: x["code"] for x in lines if x["method"].endswith("/Optimize")}

    deadline = time.monotonic() + 60  # a hang guard: the server logs as each stream ends
    while len(codes().keys() & {"gone-1", "empty-1"}) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert codes()["gone-1"] == "CANCELLED"
    assert codes()["empty-1"] == "INVALID_ARGUMENT"
    after = scrape(port)
    assert delta(before, after, "hessian_rpcs_total", method="Optimize", code="CANCELLED") == 1
    assert (
        delta(before, after, "hessian_rpcs_total", method="Optimize", code="INVALID_ARGUMENT") == 1
    )


def test_every_optimize_stream_cancelled_after_started_gets_its_access_line(observed, caplog):
    """Streams cancelled just after `started` were counted CANCELLED but logged 9-15 times in
    20: their handler's generator was closed after the call had ended, and a done callback
    added then never runs. One line per call, as the metric counts."""
    caplog.set_level("INFO", logger="hessian_service.access")
    port = observed.metrics_port
    before = scrape(port)
    start = service_pb2.OptimizeRequest(
        start=service_pb2.OptimizeStart(
            initial_params=tensors.encode(np.zeros(2)),
            capabilities=service_pb2.Capabilities(gradient=True),
        )
    )
    ids = [f"gone-after-start-{i}" for i in range(20)]
    with grpc.insecure_channel(observed.address) as channel:
        stub = service_pb2_grpc.HessianServiceStub(channel)
        never = threading.Event()
        for rid in ids:
            requests = itertools.chain([start], iter(lambda: never.wait(60) or None, 0))
            call = stub.Optimize(requests, metadata=(("x-request-id", rid),))
            assert next(call).WhichOneof("kind") == "started"
            call.cancel()
        never.set()

    def logged() -> set[str]:
        return {r.fields["request_id"] for r in access_lines(caplog)} & set(ids)

    deadline = time.monotonic() + 60  # a hang guard: the server logs as each stream ends
    while time.monotonic() < deadline:
        after = scrape(port)
        counted = delta(before, after, "hessian_rpc_latency_seconds_count", method="Optimize")
        if counted >= len(ids) and len(logged()) == len(ids):
            break
        time.sleep(0.05)
    assert counted == len(ids)
    assert logged() == set(ids)


def test_the_process_logs_json_lines_and_warns_loudly_when_unauthenticated(tmp_path):
    port = free_port()
    proc = spawn_server(tmp_path, port)
    try:
        with Client(f"127.0.0.1:{port}") as c:
            c.stub.GetServerInfo(
                service_pb2.GetServerInfoRequest(), metadata=(("x-request-id", "from-test"),)
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    lines = [json.loads(line) for line in server_output(proc).splitlines() if line.strip()]
    warnings = [x for x in lines if x["level"] == "WARNING" and "UNAUTHENTICATED" in x["msg"]]
    assert warnings and "loopback" in warnings[0]["msg"]
    access = [x for x in lines if x.get("event") == "rpc" and "HessianService" in x["method"]]
    assert [(x["request_id"], x["code"]) for x in access] == [("from-test", "OK")]


class _HeldHandler(logging.Handler):
    """A log handler that holds the thread writing a line until released (or 60 s pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.unblock = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.unblock.wait(60)


def test_the_access_log_line_is_written_after_the_answer_has_gone_out(observed):
    """A slow log sink does not delay the answer: the line is written once the call is done
    (before, the client waited for the line to be formatted and written)."""
    held = _HeldHandler()
    logger = logging.getLogger("hessian_service.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(held)
    try:
        with grpc.insecure_channel(observed.address) as channel:
            stub = service_pb2_grpc.HessianServiceStub(channel)
            info = stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=20)
            assert info.version  # answered while the line could not be written
            assert held.entered.wait(60)  # and the line is written all the same
    finally:
        held.unblock.set()
        logger.removeHandler(held)
        logger.setLevel(level)


def test_a_stream_left_early_closes_its_watchrun_while_the_client_stays_open(observed):
    """Breaking out of `run.stream()` (sync and asyncio): the WatchRun call stayed open on
    the server until the client was closed, one stream leaked per break. Each is now
    cancelled at once: the server counts it CANCELLED while the client is still open."""
    port = observed.metrics_port

    def cancelled_watches(before: dict, count: int) -> bool:
        deadline = time.monotonic() + 30  # a hang guard, not a timing claim
        while time.monotonic() < deadline:
            after = scrape(port)
            if delta(before, after, "hessian_rpcs_total", method="WatchRun", code="CANCELLED"):
                return (
                    delta(before, after, "hessian_rpcs_total", method="WatchRun", code="CANCELLED")
                    == count
                )
            time.sleep(0.05)
        return False

    with Client(observed.address) as c:
        run = c.start_run(
            problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 10**6}, **LONG
        )
        before = scrape(port)
        for _ in run.stream():
            break
        assert cancelled_watches(before, 1)

        async def leave_early() -> bool:
            async with AsyncClient(observed.address) as client:
                before = scrape(port)
                async for _ in client.run(run.id).stream():
                    break
                return await asyncio.to_thread(cancelled_watches, before, 1)

        assert asyncio.run(leave_early())
        c.cancel_run(run.id)
        run.wait(30)


def _raw_call(address: str, method: str, request, request_id: bytes) -> dict[str, str]:
    """One unary call over HTTP/2 by curl, with an x-request-id gRPC's own clients refuse to
    send (a proxy may pass such bytes on); the response's headers and trailers."""
    body = request.SerializeToString()
    frame = b"\0" + len(body).to_bytes(4, "big") + body
    done = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-", "-m", "30",
         "-X", "POST", f"http://{address}/hessian.v1.HessianService/{method}",
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "-H", b"x-request-id: " + request_id, "--data-binary", "@-"],
        input=frame, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    lines = done.stdout.decode("latin-1").splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl, to send raw HTTP/2")
@pytest.mark.parametrize("bad", ["caf\u00e9".encode(), b"a\tb", b"x\x7fy"])
def test_a_request_id_that_cannot_be_echoed_is_replaced_not_answered_internal(observed, bad):
    """A request id with a byte outside printable ASCII failed the trailing metadata after
    the call had run: a StartRun that started its run was answered INTERNAL."""
    answer = _raw_call(observed.address, "GetServerInfo", service_pb2.GetServerInfoRequest(), bad)
    assert answer.get("grpc-status") == "0", answer
    assert len(answer["x-request-id"]) == 32 and answer["x-request-id"].isalnum()
    good = _raw_call(observed.address, "GetServerInfo", service_pb2.GetServerInfoRequest(), b"r 1")
    assert good.get("grpc-status") == "0" and good["x-request-id"] == "r 1"


def test_idle_connections_to_the_metrics_port_are_capped_and_timed_out(tmp_path, monkeypatch):
    """Each connection to /metrics got a thread that waited for ever for its request: 500
    idle ones took every file descriptor. Past MAX_CONNECTIONS a connection is closed at
    once, and each after CONNECTION_SECONDS, a slow drip of header bytes too; scrapes go on
    meanwhile."""
    from hessian_service.server import metrics_http

    monkeypatch.setattr(metrics_http._Handler, "timeout", 3.0)
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 4)
    handle = start_server(tmp_path, metrics_port=free_port())
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", handle.metrics_port)))
            idle[-1].sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
        refused = False  # the accepting thread may take a moment to reach them all
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", handle.metrics_port), timeout=10) as e:
                e.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                refused = e.recv(1) == b""  # closed at once: every slot is taken
            if refused:
                break
            time.sleep(0.01)
        assert refused
        started = time.monotonic()
        for conn in idle:  # each closed by the server once its 3 s have passed
            conn.settimeout(10)
            assert conn.recv(65536) == b""
        assert time.monotonic() - started < 10
        with socket.create_connection(("127.0.0.1", handle.metrics_port), timeout=0.5) as drip:
            drip.sendall(b"GET /metrics HTTP/1.1\r\n")
            opened, cut = time.monotonic(), False
            while not cut and time.monotonic() - opened < 20:  # a header byte every 0.5 s
                try:
                    drip.sendall(b"X")
                    cut = drip.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset by the server
                    cut = True
            assert cut and time.monotonic() - opened < 10
        time.sleep(0.2)
        assert scrape(handle.metrics_port)[("hessian_runs_active", ())] == 0  # scrapes go on
    finally:
        for conn in idle:
            conn.close()
        handle.stop(grace=1.0)


def test_an_answer_ready_after_its_deadline_is_logged_and_counted_as_deadline_exceeded(
    observed, caplog
):
    """A unary handler that finished after the call's deadline had its answer dropped (the
    caller got DEADLINE_EXCEEDED) while the access log and hessian_rpcs_total said OK."""
    caplog.set_level("INFO", logger="hessian_service.access")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 40))
    problem = problems.mlp(x, rng.standard_normal((200_000, 1)), layer_sizes=[40, 64, 1])
    before = scrape(observed.metrics_port)
    with Client(observed.address, timeout=120) as client:
        pid = client.create_problem(problem)
        params = rng.standard_normal(40 * 64 + 64 + 64 + 1)
        started = time.perf_counter()
        client.predict(pid, params)  # the time it takes, untimed
        took = time.perf_counter() - started
        with pytest.raises(DeadlineExceeded):
            client.predict(pid, params, timeout=took / 10)
    deadline = time.monotonic() + 60  # a hang guard
    while time.monotonic() < deadline:
        lines = [r.fields for r in caplog.records if r.name == "hessian_service.access"]
        codes = [x["code"] for x in lines if x["method"].endswith("/Predict")]
        if len(codes) == 2:
            break
        time.sleep(0.01)
    assert codes == ["OK", "DEADLINE_EXCEEDED"]
    after = scrape(observed.metrics_port)
    assert delta(before, after, "hessian_rpcs_total", method="Predict", code="OK") == 1
    assert (
        delta(before, after, "hessian_rpcs_total", method="Predict", code="DEADLINE_EXCEEDED") == 1
    )
