"""Bearer-token auth on every RPC but health (methods read from the service descriptor, so a
new RPC is covered without editing this file), TLS with a CA generated at test time, and the
loopback-only rule for an unauthenticated server."""

from __future__ import annotations

import asyncio
import io
import logging
import pathlib
import shutil
import subprocess
import sys
from contextlib import redirect_stdout

import grpc
import numpy as np
import pytest
from conftest import ROOT, free_port, spawn_server, start_server
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hessian_client import Client, Unauthenticated, Unavailable, problems
from hessian_client.cli import main as cli_main
from hessian_client.proto import service_pb2
from hessian_service.server import ServerConfig, build_server

SERVICE = service_pb2.DESCRIPTOR.services_by_name["HessianService"]
TOKENS = ("s3cret-token-one", "another-token-2")
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def _token_file(tmp: pathlib.Path) -> pathlib.Path:
    path = tmp / "tokens"
    path.write_text(f"# operators\n{TOKENS[0]}\n\n  {TOKENS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    handle = start_server(tmp / "data", auth_token_file=str(_token_file(tmp)))
    yield handle
    handle.stop(grace=1.0)


def _call(channel: grpc.Channel, method, metadata) -> grpc.StatusCode:
    """Invoke `method` (a descriptor) with an empty request; the status code it ends with."""
    request = message_factory.GetMessageClass(method.input_type)()
    path = f"/{SERVICE.full_name}/{method.name}"
    kwargs = {"request_serializer": type(request).SerializeToString}
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10):
                pass
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Bearer {TOKENS[0]}x"),),
        (("authorization", TOKENS[0]),),  # no scheme
        (("authorization", "Basic " + TOKENS[0]),),
    ],
    ids=["none", "wrong", "prefix-of-real", "no-scheme", "basic"],
)
def test_every_rpc_refuses_missing_or_wrong_tokens(secured, metadata):
    assert len(SERVICE.methods) >= 13
    with grpc.insecure_channel(secured.address) as channel:
        codes = {m.name: _call(channel, m, metadata) for m in SERVICE.methods}
    assert codes == {m.name: UNAUTH for m in SERVICE.methods}


@pytest.mark.parametrize("token", TOKENS)
def test_every_configured_token_is_let_through_on_every_rpc(secured, token):
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(secured.address) as channel:
        codes = {m.name: _call(channel, m, metadata) for m in SERVICE.methods}
    assert UNAUTH not in codes.values(), codes
    assert codes["GetServerInfo"] == grpc.StatusCode.OK
    # streaming, reached the handler (which refuses the empty run id)
    assert codes["WatchRun"] == grpc.StatusCode.INVALID_ARGUMENT


def test_health_is_open_and_reflection_is_protected(secured):
    with grpc.insecure_channel(secured.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
        assert err.value.code() == UNAUTH
        answers = list(
            stub.ServerReflectionInfo(
                iter([ask]), timeout=5, metadata=(("authorization", f"Bearer {TOKENS[1]}"),)
            )
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert SERVICE.full_name in names


def test_sdk_errors_say_how_to_authenticate(secured):
    with Client(secured.address, token="nope") as c, pytest.raises(Unauthenticated, match="Bearer"):
        c.info()
    with Client(secured.address, token=TOKENS[0]) as c:
        run = c.start_run(problems.rosenbrock(dim=2), np.zeros(2), stopping={"max_iterations": 3})
        assert [r.iteration for r in run.stream()] == [0, 1, 2, 3]  # 3 steps: x_0 .. x_3


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> pathlib.Path:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=hessian test CA", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
             cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=d)  # fmt: skip
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.pem", "-days", "1",
             "-subj", "/CN=some other CA", cwd=d)  # fmt: skip
    # the same key certified for a period past and one to come (openssl ca sets the dates)
    (d / "ca").mkdir()
    (d / "ca" / "index.txt").write_text("")
    (d / "ca" / "serial").write_text("01\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndir = ./ca\ndatabase = ./ca/index.txt\n"
        "new_certs_dir = ./ca\nserial = ./ca/serial\ndefault_md = sha256\npolicy = p\n"
        "unique_subject = no\n[p]\ncommonName = supplied\n"
    )
    for name, start, end in (("expired", "20200101000000Z", "20200102000000Z"),
                             ("future", "20990101000000Z", "20991231000000Z")):  # fmt: skip
        _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
                 "-in", "server.csr", "-out", f"{name}.pem", "-startdate", start, "-enddate",
                 end, "-notext", cwd=d)  # fmt: skip
    return d


@pytest.mark.parametrize(
    ("cert", "says"),
    [("expired.pem", "the certificate expired at 2020-01-02 00:00:00 UTC"),
     ("future.pem", "the certificate is not valid before 2099-01-01 00:00:00 UTC")],
)  # fmt: skip
def test_a_certificate_outside_its_validity_period_is_refused_at_start(tmp_path, certs, cert, says):
    """An expired certificate was served without a word: every client's handshake failed
    (CERTIFICATE_VERIFY_FAILED) and the health probe with it, nothing in the server's log."""
    config = ServerConfig(
        address="127.0.0.1:0",
        data_dir=str(tmp_path),
        auth_token_file=str(_token_file(tmp_path)),
        tls_cert=str(certs / cert),
        tls_key=str(certs / "server.key"),
    )
    with pytest.raises(ValueError) as err:
        build_server(config)
    assert str(err.value).startswith(f"--tls-cert {certs / cert}: {says} (now ")


@pytest.mark.parametrize(
    ("cert", "key"),
    [("server.pem", "other.key"), ("server.csr", "server.key"), ("san.ext", "san.ext")],
)
def test_a_certificate_and_key_that_do_not_make_a_tls_identity_are_refused_naming_both(
    tmp_path, certs, cert, key
):
    # gRPC took any bytes and failed later as "Failed to bind to address"
    config = ServerConfig(
        address="127.0.0.1:0",
        data_dir=str(tmp_path),
        auth_token_file=str(_token_file(tmp_path)),
        tls_cert=str(certs / cert),
        tls_key=str(certs / key),
    )
    with pytest.raises(ValueError) as err:
        build_server(config)
    message = str(err.value)
    assert message.startswith(f"--tls-cert {certs / cert} and --tls-key {certs / key}: ")
    assert "expected a PEM certificate chain and its unencrypted private key" in message


def _tls_server(tmp_path: pathlib.Path, certs: pathlib.Path):
    """A server with TLS (the `certs` server certificate) and the TOKENS."""
    return start_server(
        tmp_path / "data",
        auth_token_file=str(_token_file(tmp_path)),
        tls_cert=str(certs / "server.pem"),
        tls_key=str(certs / "server.key"),
    )


def test_tls_with_a_ca_file_and_a_token(tmp_path, certs):
    handle = _tls_server(tmp_path, certs)
    try:
        with Client(handle.address, token=TOKENS[0], ca_file=certs / "ca.pem") as c:
            step = c.newton_step(problems.mse(np.ones(3)), np.zeros(3))
            np.testing.assert_allclose(step.params, np.ones(3))
        refusals = [
            ({"token": "wrong", "ca_file": certs / "ca.pem"}, Unauthenticated),
            ({"token": TOKENS[0]}, Unavailable),  # plaintext to a TLS port
            ({"token": TOKENS[0], "ca_file": certs / "other-ca.pem"}, Unavailable),  # untrusted
        ]
        for kwargs, error in refusals:
            with Client(handle.address, timeout=5, **kwargs) as c, pytest.raises(error):
                c.info()
        out = io.StringIO()
        args = ["--address", handle.address, "--ca-file", str(certs / "ca.pem")]
        with redirect_stdout(out):
            assert cli_main([*args, "--token", TOKENS[1], "info"]) == 0
        assert "limits:" in out.getvalue()
    finally:
        handle.stop(grace=1.0)


def test_unauthenticated_server_refuses_a_non_loopback_address(tmp_path):
    with pytest.raises(ValueError, match="--allow-unauthenticated-remote"):
        ServerConfig(address="0.0.0.0:50051", data_dir=str(tmp_path)).validated()
    for address in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        ServerConfig(address=address, data_dir=str(tmp_path)).validated()
    ServerConfig(address="0.0.0.0:1", allow_unauthenticated_remote=True).validated()
    ServerConfig(address="0.0.0.0:1", auth_token_file="/run/secrets/t").validated()
    flags = ServerConfig.from_args(["--allow-unauthenticated-remote"], {})
    assert flags.allow_unauthenticated_remote
    from_env = {"HESSIAN_ALLOW_UNAUTHENTICATED_REMOTE": "true", "HESSIAN_ADDRESS": "0.0.0.0:1"}
    assert ServerConfig.from_args([], from_env).allow_unauthenticated_remote
    out = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--address", "0.0.0.0:0",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "--auth-token-file" in out.stderr


def test_a_missing_or_empty_token_file_is_a_start_up_error(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        start_server(tmp_path / "d1", auth_token_file=str(empty))
    with pytest.raises(ValueError, match="cannot read"):
        start_server(tmp_path / "d2", auth_token_file=str(tmp_path / "absent"))
    foreign = tmp_path / "foreign"  # was taken: a token no client could ever send
    foreign.write_text("valid-token\ntök\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not printable ASCII"):
        start_server(tmp_path / "d3", auth_token_file=str(foreign))


def test_a_refused_listing_prints_no_table_header(secured, capsys):
    # `hessian runs` without a token printed the table's header, then the error
    assert cli_main(["--address", secured.address, "runs"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "UNAUTHENTICATED" in out.err
    assert cli_main(["--address", secured.address, "--token", TOKENS[0], "runs"]) == 0
    assert capsys.readouterr().out.startswith("run_id")


def _peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    (line,) = [x for x in status.splitlines() if x.startswith("VmHWM")]
    return int(line.split()[1]) / 1024


def test_a_caller_without_a_token_cannot_make_the_server_hold_its_body(tmp_path):
    """A unary handler is only called once the whole request has arrived: an unauthenticated
    CreateProblem of 60 MiB raised a real server's peak memory by ~120 MiB before its
    UNAUTHENTICATED (eight at once: 250 MiB -> 1.1 GB). The refusal now takes its request as
    a stream it never reads."""
    port = free_port()
    proc = spawn_server(tmp_path, port, "--auth-token-file", str(_token_file(tmp_path)))
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 30)]
        ) as channel:
            call = channel.unary_unary(
                "/hessian.v1.HessianService/CreateProblem",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError):  # warm up: the first call's own allocations
                call(b"", timeout=30)
            before = _peak_rss_mib(proc.pid)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    call(np.random.default_rng(0).bytes(60 << 20), timeout=60)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _peak_rss_mib(proc.pid) - before < 30
    finally:
        proc.kill()
        proc.wait(30)


def test_a_token_file_takes_exactly_its_tokens(tmp_path):
    """An indented `# ...` line became a token (a revoked one, kept as a comment), a UTF-8
    BOM became part of the first token (which then never matched), `token  # note` was one
    token with the note in it, and a file not in UTF-8 failed with the codec's bare error."""
    from hessian_service.server.auth import TokenCheck, load_tokens

    path = tmp_path / "tokens"
    path.write_bytes(
        "\ufefffirst-token\n  # revoked-token (2025)\n\t# another\n  second \n".encode()
    )
    tokens = load_tokens(str(path))
    assert tokens == [b"first-token", b"second"]
    check = TokenCheck(tokens)
    assert check.allowed(b"first-token") and check.allowed(b"second")
    assert not check.allowed(b"# revoked-token (2025)") and not check.allowed(None)
    path.write_text("token-one  # the CI's\n")
    with pytest.raises(ValueError, match=r"--auth-token-file .*: line 1 holds more than a token"):
        load_tokens(str(path))
    path.write_bytes(b"\xff\xfetoken\n")
    with pytest.raises(ValueError, match=r"--auth-token-file .*: not UTF-8 text"):
        load_tokens(str(path))


def test_a_chain_with_an_expired_certificate_after_the_servers_own_is_refused(tmp_path, certs):
    """Only the first certificate was read: an expired intermediate started silently and
    every handshake failed ("certificate has expired")."""
    chain = tmp_path / "chain.pem"
    chain.write_bytes((certs / "server.pem").read_bytes() + (certs / "expired.pem").read_bytes())
    config = ServerConfig(
        address="127.0.0.1:0",
        data_dir=str(tmp_path / "data"),
        auth_token_file=str(_token_file(tmp_path)),
        tls_cert=str(chain),
        tls_key=str(certs / "server.key"),
    )
    with pytest.raises(ValueError, match="certificate 2 of the chain expired at 2020-01-02"):
        build_server(config)


@pytest.mark.parametrize("separator", ["\u2028", "\x0b", "\x0c", "\u0085", "\r"])
def test_a_token_line_holding_a_line_separator_is_refused_not_split(tmp_path, separator):
    """str.splitlines split "abcdefgh<U+2028>ijklmnop" into two tokens, both accepted."""
    path = tmp_path / "tokens"
    # (bytes: no newline translation; the server's read_text split at a bare CR too)
    path.write_bytes(f"first-token\nabcdefgh{separator}ijklmnop\n".encode())
    with pytest.raises(ValueError, match="line 2 "):
        start_server(tmp_path / "d", auth_token_file=str(path))


def test_minimize_and_clients_reach_a_secured_server_from_the_environment(
    tmp_path, certs, monkeypatch
):
    """minimize / least_squares take no token or CA argument and the SDK read neither
    HESSIAN_TOKEN nor HESSIAN_CA_FILE (README: clients read them): a TLS server with tokens
    was out of their reach ("Socket closed")."""
    import numpy as np
    from hessian_client import aio, minimize
    from scipy.optimize import rosen, rosen_der, rosen_hess

    handle = _tls_server(tmp_path, certs)
    try:
        monkeypatch.setenv("HESSIAN_TOKEN", TOKENS[0])
        monkeypatch.setenv("HESSIAN_CA_FILE", str(certs / "ca.pem"))
        res = minimize(rosen, np.zeros(3), jac=rosen_der, hess=rosen_hess, address=handle.address)
        assert res.success
        with Client(handle.address) as c:
            assert c.get_run(res.run_id).status == "FINISHED"

        async def listed() -> list:
            async with aio.Client(handle.address) as c:
                return [r.run_id async for r in c.list_runs()]

        assert res.run_id in asyncio.run(listed())
        with Client(handle.address, token="wrong") as c, pytest.raises(Unauthenticated):
            c.info()  # an argument given wins over the variable
    finally:
        handle.stop(grace=1.0)


def test_tenant_tokens_that_are_also_admins_are_warned_about(tmp_path, caplog):
    # the same file as --auth-token-file and --admin-token-file started silently, every
    # tenant an admin who sees every other's runs
    path = _token_file(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hessian_service.server"):
        handle = start_server(tmp_path / "d", auth_token_file=str(path), admin_token_file=str(path))
        handle.stop(grace=1.0)
    warned = [r.getMessage() for r in caplog.records if "--admin-token-file" in r.getMessage()]
    assert warned == [
        "2 of the 2 --auth-token-file tokens are also in --admin-token-file: they are admins, "
        "who see and manage every tenant's runs and problems"
    ], warned
