"""What an operator meets at start-up: flags win over bad environment values (and --help,
--version always answer), each flag's own limit in its message, --commit-interval-ms
bounded, word settings in any case, and a unix: socket server with metrics and a probe."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request

import pytest
from conftest import free_port, start_server
from hessian_client import Client
from hessian_service import __version__, healthprobe
from hessian_service.server import ServerConfig

HUGE = "9" * 23  # past int64
HOUR_MS = 3_600_000  # --commit-interval-ms at most (README)


def _server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m hessian_service.server ARGS` with only `env` as HESSIAN_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "hessian_service.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("HESSIAN_")} | (env or {}),
    )


def test_a_flag_wins_over_a_bad_environment_value(capsys):
    env = {"HESSIAN_WORKERS": "abc", "HESSIAN_SKIP_STORE_CHECK": "maybe"}
    config = ServerConfig.from_args(["--workers", "2", "--skip-store-check"], env)
    assert (config.workers, config.skip_store_check) == (2, True)
    assert ServerConfig.from_args(["--workers=3", "--no-skip-store-check"], env).workers == 3
    with pytest.raises(SystemExit) as exit_:  # without its flag the variable is still named
        ServerConfig.from_args(["--skip-store-check"], env)
    assert exit_.value.code == 2
    assert "HESSIAN_WORKERS='abc': expected an integer" in capsys.readouterr().err


def test_help_and_version_answer_whatever_the_environment():
    bad = {"HESSIAN_WORKERS": "abc", "HESSIAN_LEASE_SECONDS": "ten"}
    helped = _server("--help", env=bad)
    assert helped.returncode == 0, helped.stderr
    assert "--workers WORKERS" in helped.stdout
    version = _server("--version", env=bad)
    assert (version.returncode, version.stdout) == (0, f"hessian-server {__version__}\n")


@pytest.mark.parametrize(
    ("flag", "most"),
    [
        ("--workers", 1024),
        ("--rpc-threads", 1024),
        ("--intra-op-threads", 1024),
        ("--max-optimize-runs", 1024),
        ("--metrics-port", 65535),
        ("--max-message-bytes", 2**31 - 1),
        ("--commit-interval-ms", HOUR_MS),
    ],
)
def test_a_value_past_int64_is_refused_with_the_flags_own_limit(flag, most):
    with pytest.raises(ValueError, match=re.escape(f"{flag} must be at most {most}")):
        ServerConfig.from_args([flag, HUGE], {})


def test_commit_interval_is_at_most_an_hour():
    hour = ServerConfig.from_args(["--commit-interval-ms", str(HOUR_MS)], {})
    assert hour.commit_interval_ms == HOUR_MS
    # 1e13 ms passed validation and killed the store's flush thread (timestamp out of range)
    for value in (str(HOUR_MS + 1), "10000000000000"):
        with pytest.raises(ValueError, match="--commit-interval-ms must be at most 3600000"):
            ServerConfig.from_args(["--commit-interval-ms", value], {})


def test_word_settings_take_any_case():
    config = ServerConfig.from_args(
        ["--log-format", "JSON", "--default-backend", "AutoGrad", "--log-level", "Debug",
         "--sqlite-synchronous", "full"], {}
    )  # fmt: skip
    assert (config.log_format, config.default_backend) == ("json", "autograd")
    assert ServerConfig.from_args([], {"HESSIAN_LOG_FORMAT": "Text"}).log_format == "text"
    with pytest.raises(ValueError, match="--log-format must be json or text"):
        ServerConfig.from_args(["--log-format", "yaml"], {})


def test_a_server_logs_in_the_format_named_in_upper_case(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    done = _server("--log-format", "TEXT", "--data-dir", str(not_a_dir), "--address", "127.0.0.1:0")
    assert done.returncode == 2
    assert re.search(r"^\S+ \S+ ERROR hessian_service.server: cannot open", done.stderr, re.M), (
        done.stderr
    )


def test_a_unix_socket_server_serves_metrics_on_loopback_and_the_probe_accepts_it(tmp_path):
    with tempfile.TemporaryDirectory(prefix="hs-") as short:  # a socket path has 107 bytes
        address = f"unix:{short}/s.sock"
        port = free_port()
        handle = start_server(tmp_path, address=address, metrics_port=port)
        try:
            assert handle.address == address
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                assert b"hessian_rpcs_total" in r.read()
            assert healthprobe.probe_address(address) == address
            assert healthprobe.main(["--address", address]) == 0
            with Client(handle.address, timeout=30) as client:
                assert client.info().version == __version__
        finally:
            handle.stop(grace=1.0)


@pytest.mark.parametrize("address", ["unix:", "unix: ", "unix://", "unix-abstract:"])
def test_a_unix_address_without_a_path_is_refused(address):
    """It was taken: the log said "listening on unix:" and no socket existed."""
    with pytest.raises(ValueError, match="needs a socket path"):
        ServerConfig(address=address).validated()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True),
     ("127.attacker.example", False), ("127.0.0.1.nip.io", False), ("0.0.0.0", False),
     ("10.0.0.1", False), ("::", False)],
)  # fmt: skip
def test_only_loopback_literals_and_localhost_count_as_loopback(host, loopback):
    """A DNS name starting with "127." counted as loopback (a text test), so a server on it
    needed no token though the name may resolve to a public interface."""
    address = f"[{host}]:1" if ":" in host else f"{host}:1"
    config = ServerConfig(address=address)
    if loopback:
        config.validated()
    else:
        with pytest.raises(ValueError, match="not a loopback address"):
            config.validated()


def test_an_empty_data_dir_flag_is_refused_and_an_empty_variable_is_the_default():
    """--data-dir "" put the store in the working directory (the log said "data ,");
    HESSIAN_DATA_DIR="" meant ./data."""
    with pytest.raises(ValueError, match="--data-dir must be a directory path"):
        ServerConfig.from_args(["--data-dir", ""], {})
    assert ServerConfig.from_args([], {"HESSIAN_DATA_DIR": ""}).data_dir == "./data"


def test_an_empty_variable_is_not_named_as_the_source_of_a_refusal():
    """ "no --auth-token-file (from HESSIAN_AUTH_TOKEN_FILE='')": the empty variable was taken
    as unset, yet named as where the value came from."""
    env = {"HESSIAN_AUTH_TOKEN_FILE": "", "HESSIAN_ADDRESS": "0.0.0.0:1"}
    with pytest.raises(ValueError) as err:
        ServerConfig.from_args([], env)
    assert "no --auth-token-file is given" in str(err.value)
    assert "HESSIAN_AUTH_TOKEN_FILE" not in str(err.value)
    with pytest.raises(ValueError) as err:  # a variable that is set is still named
        ServerConfig.from_args(["--address", "127.0.0.1:1"], {"HESSIAN_WORKERS": "0"})
    assert "(from HESSIAN_WORKERS='0')" in str(err.value)


def test_an_ipv6_address_without_brackets_is_refused_saying_how_to_write_it():
    """ "::1:52201" passed the check and failed at bind ("Failed to bind")."""
    with pytest.raises(ValueError, match=r"an IPv6 address goes in brackets, \[::1\]:52201"):
        ServerConfig(address="::1:52201").validated()
    ServerConfig(address="[::1]:52201").validated()
    ServerConfig(address="vsock:3:52201", allow_unauthenticated_remote=True).validated()


def test_an_ipv4_mapped_loopback_is_loopback_and_a_port_needs_ascii_digits():
    """[::ffff:127.0.0.1] binds to loopback only but was refused as remote; a port of "²"
    crashed with int()'s message, full-width digits passed and failed at bind."""
    ServerConfig(address="[::ffff:127.0.0.1]:1").validated()
    with pytest.raises(ValueError, match="not a loopback address"):
        ServerConfig(address="[::ffff:10.0.0.1]:1").validated()
    for port in ("²", "５２８２１"):
        with pytest.raises(ValueError, match="--address must be host:port"):
            ServerConfig(address=f"127.0.0.1:{port}").validated()


def test_json_logs_carry_warnings_and_thread_exceptions_as_json_lines():
    # a Python warning and an exception ending a thread were raw stderr text between the
    # JSON lines (a log shipper parsing each line as JSON dropped or choked on them)
    script = (
        "import threading, warnings\n"
        "from hessian_service.server.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "warnings.warn('a library warning')\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='worker-x'); t.start(); t.join()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert [line["level"] for line in lines] == ["WARNING", "ERROR"], done.stderr
    assert "a library warning" in lines[0]["msg"]
    assert "worker-x" in lines[1]["msg"] and "ZeroDivisionError" in lines[1]["exc"]
