"""Server configuration from flags and HESSIAN_* variables; interceptors plug in; a drain
lets in-flight unary calls finish and stops runs as INTERRUPTED."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from conftest import start_server
from hessian_client import Client, ResourceExhausted, problems, status_name
from hessian_client.proto import service_pb2
from hessian_service.server import ServerConfig, build_server
from hessian_service.server.config import redacted


def test_flags_override_environment_override_defaults():
    env = {"HESSIAN_MAX_PARAMS": "123", "HESSIAN_WORKERS": "3", "HESSIAN_DATA_DIR": "/tmp/x"}
    config = ServerConfig.from_args(["--workers", "5"], env)
    assert config.max_params == 123
    assert config.workers == 5
    assert config.data_dir == "/tmp/x"
    assert config.address == ServerConfig().address


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--max-concurrent-runs"):
        ServerConfig.from_args(["--max-concurrent-runs", "0"], {})
    with pytest.raises(ValueError, match="--default-backend"):
        ServerConfig.from_args([], {"HESSIAN_DEFAULT_BACKEND": "gpu"})


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-message-bytes", "2147483648", "--max-message-bytes must be at most 2147483647"),
        ("--metrics-port", "70000", "--metrics-port must be at most 65535"),
        ("--log-level", "FOO", "--log-level must be one of CRITICAL, FATAL, ERROR, WARN"),
        ("--intra-op-threads", "1000000", "--intra-op-threads must be at most 1024"),
        ("--workers", "100000", "--workers must be at most 1024"),
        ("--max-params", str(10**20), "--max-params must be at most 9223372036854775807"),
        ("--max-stored-runs", str(2**63), "--max-stored-runs must be at most"),
        ("--address", "127.0.0.1:99999", "--address must be host:port with a port in 0-65535"),
        ("--address", "127.0.0.1:-5", "--address must be host:port"),
        ("--address", "127.0.0.1", "--address must be host:port"),
        ("--address", ":50051", "--address must be host:port"),
        ("--max-message-bytes", "10", "--max-message-bytes must be >= 1024"),
        ("--max-data-bytes", "-1", "--max-data-bytes must be >= 1"),
        ("--max-data-bytes", "0", "--max-data-bytes must be >= 1"),
        ("--metrics-port", "50051", "--metrics-port 50051 is --address's port"),
        # past threading.TIMEOUT_MAX the lease keeper's wait raised OverflowError
        ("--lease-seconds", "1e300", "--lease-seconds must be at most 86400"),
        ("--grace-seconds", "1e10", "--grace-seconds must be at most 86400"),
        ("--exported-evaluation-seconds", "1e12", "--exported-evaluation-seconds must be at most"),
        # a replica at 0.02 s started, answered SERVING, then failed every store write
        ("--lease-seconds", "0.02", "--lease-seconds must be >= 1"),
        ("--lease-seconds", "0", "--lease-seconds must be >= 1"),
    ],
)
def test_values_the_server_could_not_run_with_are_refused_at_start(flag, value, message):
    # they crashed the start with a traceback (gRPC's C int, the metrics bind, logging's
    # level), segfaulted (a million torch threads), listened on another port (99999 wraps,
    # no port is 443), or started a server whose GetServerInfo failed (past int64)
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig.from_args([flag, value], {})
    var = "HESSIAN_" + flag.removeprefix("--").upper().replace("-", "_")
    with pytest.raises(ValueError, match=re.escape(f"(from {var}=")):
        ServerConfig.from_args([], {var: value})


def test_the_largest_values_the_server_runs_with_are_accepted():
    config = ServerConfig.from_args(
        ["--max-message-bytes", "2147483647", "--metrics-port", "65535", "--log-level",
         "debug", "--address", "[::1]:0", "--max-params", str(2**63 - 1)], {}
    )  # fmt: skip
    assert config.max_message_bytes == 2**31 - 1 and config.address == "[::1]:0"
    for level in ("warn", "fatal", "notset", "Warning"):  # every name logging knows
        assert ServerConfig.from_args(["--log-level", level], {}).log_level == level
    for address in ("unix:/tmp/hessian.sock", "unix-abstract:hessian", "localhost:0"):
        # a socket file is reachable from this machine only: no token needed, as loopback
        assert ServerConfig.from_args(["--address", address], {}).address == address


def test_a_refused_start_exits_2_with_the_message_and_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--metrics-port", "70000",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == "hessian-server: --metrics-port must be at most 65535"


@pytest.mark.parametrize("recover", [False, True], ids=["serve", "recover"])
def test_an_unreadable_store_password_file_is_named_not_the_store(tmp_path, recover):
    # it said "cannot open the run store --store: [Errno 2] ..." (and a traceback on recovery)
    missing = tmp_path / "nope"
    done = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--store",
         "postgresql://hessian@127.0.0.1:1/hessian", "--store-password-file", str(missing),
         "--log-format", "text", *(["--recover-store"] if recover else [])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--store-password-file {missing}: cannot read it" in done.stderr
    assert "cannot open the run store" not in done.stderr and "Traceback" not in done.stderr


def test_a_metrics_port_in_use_is_refused_naming_the_flag_not_the_store(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "hessian_service.server", "--metrics-port", str(port),
             "--address", "127.0.0.1:0", "--data-dir", str(tmp_path), "--log-format", "text"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"--metrics-port {port}: cannot serve metrics on 127.0.0.1" in done.stderr
    assert "cannot open the run store" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("HESSIAN_WORKERS", "two", "expected an integer"),
        ("HESSIAN_INTRA_OP_THREADS", "1.5", "expected an integer"),
        ("HESSIAN_LEASE_SECONDS", "ten", "expected a number"),
        ("HESSIAN_SKIP_STORE_CHECK", "maybe", "expected one of 1, true, yes, on, 0, false"),
    ],
)
def test_a_bad_environment_value_exits_naming_the_variable(capsys, var, value, expected):
    with pytest.raises(SystemExit) as exit_:
        ServerConfig.from_args([], {var: value})
    assert exit_.value.code == 2  # as a bad flag exits
    assert f"error: {var}={value!r}: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("HESSIAN_EXPORTED_EVALUATION_SECONDS", "-1", "--exported-evaluation-seconds (from "
         "HESSIAN_EXPORTED_EVALUATION_SECONDS='-1') must be > 0"),
        ("HESSIAN_LEASE_SECONDS", "nan", "--lease-seconds (from HESSIAN_LEASE_SECONDS='nan') "
         "must be a finite number"),
        ("HESSIAN_GRACE_SECONDS", "inf", "--grace-seconds (from HESSIAN_GRACE_SECONDS='inf') "
         "must be at most 86400"),
        ("HESSIAN_GRACE_SECONDS", "-2", "--grace-seconds (from HESSIAN_GRACE_SECONDS='-2') "
         "must be >= 0"),
        ("HESSIAN_WORKERS", "0", "--workers (from HESSIAN_WORKERS='0') must be >= 1"),
    ],
)  # fmt: skip
def test_an_out_of_range_environment_value_names_its_variable(var, value, message):
    with pytest.raises(ValueError) as err:
        ServerConfig.from_args([], {var: value})
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:  # the flag given: the flag alone is named
        ServerConfig.from_args(["--" + var.removeprefix("HESSIAN_").lower().replace("_", "-"),
                                value], {var: "1"})  # fmt: skip
    assert "from HESSIAN_" not in str(err.value)


def test_an_empty_number_variable_is_unset_and_flags_are_not_abbreviated(capsys):
    assert ServerConfig.from_args([], {"HESSIAN_WORKERS": ""}).workers == ServerConfig().workers
    with pytest.raises(SystemExit):
        ServerConfig.from_args(["--grace", "5"], {})
    assert "unrecognized arguments: --grace" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "on"), [("1", True), ("Yes", True), ("off", False), ("", False)])
def test_boolean_environment_words(value, on):
    assert ServerConfig.from_args([], {"HESSIAN_SKIP_STORE_CHECK": value}).skip_store_check is on


class CountingInterceptor(grpc.ServerInterceptor):
    """Counts the calls it sees by method name."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def intercept_service(self, continuation, handler_call_details):
        self.seen.append(handler_call_details.method)
        return continuation(handler_call_details)


class HoldingInterceptor(grpc.aio.ServerInterceptor):
    """Holds calls to `method` in the server: sets `entered` when one reaches its handler,
    which then waits (off the server's event loop) for `release` before doing its work."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.entered = threading.Event()
        self.release = threading.Event()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith(self.method):
            return handler
        inner = handler.unary_unary

        async def behaviour(request, context):
            self.entered.set()
            await asyncio.to_thread(self.release.wait, 60)
            return await inner(request, context)

        return handler._replace(unary_unary=behaviour)


def test_interceptors_see_every_call(tmp_path):
    interceptor = CountingInterceptor()
    handle = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path)), interceptors=[interceptor]
    )
    try:
        with Client(handle.address) as c:
            c.info()
            c.newton_step(problems.mse(np.ones(2)), np.zeros(2))
        assert interceptor.seen == [
            "/hessian.v1.HessianService/GetServerInfo",
            "/hessian.v1.HessianService/NewtonStep",
        ]
    finally:
        handle.stop(grace=1.0)


def test_drain_finishes_in_flight_unary_calls_and_interrupts_runs(tmp_path):
    # The step is held in its handler until the drain has begun, so it is in flight by
    # construction (no need for a slow step); the generous grace only guards a loaded machine.
    in_flight = HoldingInterceptor("/NewtonStep")
    handle = build_server(
        ServerConfig(address="127.0.0.1:0", data_dir=str(tmp_path), grace_seconds=120.0),
        interceptors=[in_flight],
    )
    outcome: dict[str, object] = {}
    with Client(handle.address) as c:
        run = c.start_run(
            problems.rosenbrock(dim=4),
            np.zeros(4),
            method="gradient_descent",
            learning_rate=1e-4,
            stopping={"max_iterations": 1_000_000},
        )
        next(iter(run.stream()))

        def step() -> None:
            try:
                outcome["result"] = c.newton_step(
                    problems.mse(np.ones(3)), np.zeros(3), timeout=180
                )
            except Exception as exc:  # the client's typed errors; reported below
                outcome["error"] = exc

        t = threading.Thread(target=step)
        t.start()
        assert in_flight.entered.wait(60), "the NewtonStep never reached its handler"
        stopper = threading.Thread(target=handle.stop)
        stopper.start()
        # Release the held step only once the server refuses new calls (it is draining), so
        # the step is certainly in flight during the drain; the bounds guard hangs only.
        with pytest.raises(grpc.RpcError) as refused:
            for _ in range(6000):
                c.stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=60)
                stopper.join(0.01)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert "draining" in refused.value.details()
        in_flight.release.set()
        t.join(180)
        stopper.join(180)
    assert "result" in outcome, f"the in-flight NewtonStep failed: {outcome.get('error')}"
    assert outcome["result"].record.loss == 1.0, "the in-flight NewtonStep completed"
    reopened = start_server(tmp_path)
    try:
        with Client(reopened.address) as c:
            info = c.get_run(run.id)
            assert status_name(info) == "INTERRUPTED"
            assert info.num_records >= 1
    finally:
        reopened.stop(grace=1.0)


def test_unusable_data_dir_is_a_clear_start_up_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hessian_service.server",
            "--address",
            "127.0.0.1:0",
            "--data-dir",
            str(not_a_dir / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--data-dir" in out.stderr and str(not_a_dir) in out.stderr


def test_message_size_limit_is_enforced_before_any_work(tmp_path):
    handle = start_server(tmp_path, max_message_bytes=4096)
    try:
        with Client(handle.address) as c:
            with pytest.raises(ResourceExhausted):
                c.newton_step(problems.mse(np.ones(1000)), np.zeros(1000))
            assert c.newton_step(problems.mse(np.ones(10)), np.zeros(10)).record.loss == 1.0
    finally:
        handle.stop(grace=1.0)


def test_an_engine_backend_naming_no_backend_is_refused_at_start(monkeypatch):
    """HESSIAN_BACKEND is read by the engine for every request that names no backend: a
    value naming none would fail each such request, blaming a field the caller never set."""
    monkeypatch.setenv("HESSIAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"HESSIAN_BACKEND='bogus'.*auto, native, autograd"):
        ServerConfig.from_args([], {})
    monkeypatch.setenv("HESSIAN_BACKEND", "autograd")
    assert ServerConfig.from_args([], {}).default_backend == ""


def test_process_after_ms_is_checked_and_named_for_what_it_does(tmp_path, caplog):
    """0 sends every run to a worker (it is not "off"); set without --run-processes it does
    nothing, and the server says so."""
    with pytest.raises(ValueError, match=r"0: every run starts in a worker process"):
        ServerConfig.from_args(["--process-after-ms", "-1"], {})
    for after, warned in ((5, True), (ServerConfig.process_after_ms, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "hessian_service.server"):
            handle = start_server(tmp_path / str(after), process_after_ms=after)
            handle.stop(0)
        said = "--process-after-ms has no effect without --run-processes" in caplog.text
        assert said == warned


@pytest.mark.parametrize(
    "dsn",
    ["postgres+psycopg://hessian:S3cretPW@db:5432/runs", "postgresql://hessian:S3cret%ZZPW@db/r"],
    ids=["wrong-scheme", "bad-percent-encoding"],
)
def test_a_refused_store_dsn_never_shows_its_password(dsn):
    """A DSN refused at start was echoed whole (HESSIAN_STORE='...:S3cretPW@...'), and one
    PostgreSQL's parser refuses was quoted by the connection pool's log every retry."""
    for argv, env in ((["--store", dsn], {}), ([], {"HESSIAN_STORE": dsn})):
        with pytest.raises(ValueError) as err:
            ServerConfig.from_args(argv, env)
        message = str(err.value)
        assert "--store" in message and "S3cret" not in message and "***" in message


def test_a_boolean_set_in_the_environment_is_switched_off_by_its_no_flag():
    """Flag, else environment: HESSIAN_SKIP_STORE_CHECK=1 could not be undone by a flag
    (there was no --no-skip-store-check; argparse exited 2)."""
    env = {"HESSIAN_SKIP_STORE_CHECK": "1", "HESSIAN_RUN_PROCESSES": "true"}
    assert ServerConfig.from_args([], env).skip_store_check
    config = ServerConfig.from_args(["--no-skip-store-check", "--no-run-processes"], env)
    assert not config.skip_store_check and not config.run_processes
    assert ServerConfig.from_args(["--skip-store-check"], {}).skip_store_check


@pytest.mark.parametrize("value", ["false", "off", "no", " 0"])
def test_a_cuda_kernels_switch_the_extension_would_misread_is_refused(monkeypatch, value):
    """The extension turns its CUDA kernels off for exactly "0": "false", "off" or "no"
    left them on, silently."""
    monkeypatch.setenv("HESSIAN_CUDA_KERNELS", value)
    with pytest.raises(ValueError, match=r"HESSIAN_CUDA_KERNELS=.* must be 0 or 1"):
        ServerConfig().validated()
    monkeypatch.setenv("HESSIAN_CUDA_KERNELS", "0")
    ServerConfig().validated()


@pytest.mark.parametrize(
    ("var", "value"),
    [("HESSIAN_STORE_PASSWORD_FILE", "/run/secrets/pw"), ("HESSIAN_REPLICA_ID", "replica-a")],
)
def test_a_postgresql_setting_without_a_postgresql_store_is_refused(var, value):
    # both were accepted and ignored: an operator who forgot HESSIAN_STORE ran on SQLite
    flag = "--" + var.removeprefix("HESSIAN_").lower().replace("_", "-")
    with pytest.raises(ValueError, match=re.escape(f"{flag} (from {var}='{value}') applies to")):
        ServerConfig.from_args([], {var: value})
    with pytest.raises(ValueError, match=f"{flag} applies to a PostgreSQL --store only"):
        ServerConfig.from_args([flag, value], {})
    dsn = "postgresql://hessian@127.0.0.1:5432/hessian"
    config = ServerConfig.from_args([flag, value, "--store", dsn], {})
    assert getattr(config, flag[2:].replace("-", "_")) == value


def test_a_misspelt_setting_is_warned_about_at_start(tmp_path):
    # HESSIAN_MAX_PARAM (no S) was ignored in silence: the server ran with the default limit
    from hessian_service.server.config import misspelt_variables

    env = {
        "HESSIAN_MAX_PARAM": "10",
        "HESSIAN_WORKER": "1",
        "HESSIAN_TOKEN": "t",
        "HESSIAN_CA_FILE": "ca.pem",
        "HESSIAN_MAX_PARAMS": "1",
        "HESSIAN_TEST_SEED": "3",
    }
    assert misspelt_variables(env) == [
        "HESSIAN_MAX_PARAM is not a setting (ignored); did you mean HESSIAN_MAX_PARAMS?",
        "HESSIAN_WORKER is not a setting (ignored); did you mean HESSIAN_WORKERS?",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--recover-store", "--data-dir",
         str(tmp_path), "--log-format", "text"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HESSIAN_MAX_ITERATION": "5"},
    )  # fmt: skip
    assert done.returncode == 2 and "no run store at" in done.stderr  # an empty folder
    assert "did you mean HESSIAN_MAX_ITERATIONS?" in done.stderr


@pytest.mark.parametrize("flags", [["--lease-seconds", "5"], ["--replica-id", "a"]])
def test_postgresql_only_flags_are_refused_without_a_store(flags):
    # --lease-seconds was accepted silently beside SQLite, where nothing leases a run
    with pytest.raises(ValueError, match=re.escape(f"{flags[0]} applies to a PostgreSQL")):
        ServerConfig.from_args(flags, {})
    dsn = "postgresql://hessian@127.0.0.1:5432/hessian"
    assert ServerConfig.from_args([*flags, "--store", dsn], {}).store == dsn


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://hessian:s3cret@db:5432/hessian",
        "postgresql://db/hessian?password=s3cret&sslmode=require",
        "host=db password = s3cret dbname=hessian",
        "host=db password='s3 cret' dbname=hessian",
        "host=db password='s3\\'cret' dbname=hessian",
    ],
)
def test_a_store_password_is_never_shown(dsn):
    # the start-up line logs the store at every start; key=value forms with spaces around
    # '=' or a quoted value kept the password (whole or in part)
    shown = redacted(dsn)
    assert "s3" not in shown and "cret" not in shown, shown
    assert "***" in shown
