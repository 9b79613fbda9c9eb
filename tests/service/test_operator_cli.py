"""The `hessian` CLI and the health probe refuse timeouts and addresses they cannot honour
(gRPC failed a 1e30 s deadline at once, and dialled port 443 for a host without a port),
and a run that failed before its first record is reported as FAILED with its stop reason."""

from __future__ import annotations

import numpy as np
import pytest
from hessian_client.cli import main
from hessian_service import healthprobe


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["1e30", "nan", "inf", "0", "-1", "86401"])
def test_the_cli_refuses_a_timeout_it_cannot_honour(capsys, timeout):
    with pytest.raises(SystemExit) as exit_:
        main(["--timeout", timeout, "info"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--timeout" in err and "at most 86400" in err, err


@pytest.mark.parametrize("address", ["localhost", "10.0.0.7", "[::1]"])
def test_the_cli_refuses_an_address_without_a_port(capsys, address):
    with pytest.raises(SystemExit) as exit_:
        main(["--address", address, "info"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--address (or HESSIAN_ADDRESS): expected host:port (no port given: gRPC would "
        f"dial 443), got {address!r}" in err
    ), err


def test_the_cli_accepts_the_longest_timeout_and_a_resolver_address(server, capsys):
    host, port = server.address.rsplit(":", 1)
    code, err = _cli(capsys, "--timeout", "86400", "--address", f"ipv4:{host}:{port}", "info")
    assert code == 0, err


def test_a_run_failing_before_its_first_record_is_reported_failed_with_its_reason(
    server, capsys, tmp_path
):
    params = tmp_path / "x.npy"
    np.save(params, np.full(2, 1e200))  # not finite at the start: FAILED, no record
    code, err = _cli(
        capsys, "--address", server.address, "run", "--objective", "rosenbrock",
        "--option", "dim=2", "--params", str(params), "--quiet",
    )  # fmt: skip
    assert code == 1
    started, error = err.strip().splitlines()  # the run's id, then the one error line
    assert started.startswith("run r-"), err
    assert error.startswith(f"hessian run: error: FAILED (non_finite): {started} failed before")
    assert "UNKNOWN" not in err, err


@pytest.mark.parametrize("timeout", ["nan", "1e30", "inf", "0", "-2", "3601"])
def test_the_probe_refuses_a_timeout_it_cannot_honour(capsys, timeout):
    assert healthprobe.main(["--timeout", timeout]) == 1
    err = capsys.readouterr().err
    assert "--timeout: expected seconds > 0 and at most 3600" in err, err


def test_the_probe_dials_a_unix_socket_as_it_is():
    for address in ("unix:/run/hessian.sock", "unix-abstract:hessian"):
        assert healthprobe.probe_address(address) == address
    with pytest.raises(ValueError, match="HOST:PORT or unix:PATH"):
        healthprobe.probe_address("no-port")


def test_the_probe_takes_an_empty_address_variable_as_unset():
    # the server serves its default address when HESSIAN_ADDRESS= is empty; the probe
    # refused the empty address, so such a container stayed unhealthy
    args = healthprobe.parse_args([], {"HESSIAN_ADDRESS": ""})
    assert healthprobe.probe_address(args.address) == healthprobe.DEFAULT_ADDRESS


def test_the_probe_names_a_ca_file_that_is_not_pem(tmp_path, capsys):
    # gRPC-core's log lines and a handshake UNAVAILABLE were all it said
    garbage = tmp_path / "ca.pem"
    garbage.write_bytes(b"not a certificate\n")
    assert healthprobe.main(["--address", "127.0.0.1:1", "--ca-file", str(garbage)]) == 1
    err = capsys.readouterr().err
    assert f"--ca-file {garbage}: expected PEM CA certificates" in err, err


def test_the_probe_takes_a_blank_address_variable_as_unset():
    args = healthprobe.parse_args([], {"HESSIAN_ADDRESS": "  "})
    assert healthprobe.probe_address(args.address) == healthprobe.DEFAULT_ADDRESS
