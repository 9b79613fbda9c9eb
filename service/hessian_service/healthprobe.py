"""Container health probe: exit 0 only when the gRPC health service answers SERVING.

    python -m hessian_service.healthprobe [--address HOST:PORT|unix:PATH] [--service NAME]
                                          [--timeout S] [--ca-file PEM] [--server-name NAME]

The image's HEALTHCHECK and docker-compose.yml run this, so a container is healthy exactly
when `grpc.health.v1.Health/Check` says SERVING (a draining server says NOT_SERVING).
The address defaults to $HESSIAN_ADDRESS (the server's own setting) with a wildcard host
(0.0.0.0, [::]) replaced by loopback, so the probe follows the server without a flag (a
unix: socket address is dialled as it is).
Health needs no token. Against a TLS server (HESSIAN_TLS_CERT set) the probe needs the CA
that signed the certificate ($HESSIAN_CA_FILE, as the client uses) and, since it dials
loopback, a name the certificate holds ($HESSIAN_PROBE_SERVER_NAME).
Exit codes follow Docker's HEALTHCHECK: 0 healthy, 1 unhealthy (any other answer, no
answer within the timeout, or a bad argument).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}
UNIX_SCHEMES = ("unix:", "unix-abstract:")  # the server's socket-file addresses, dialled as is
MAX_TIMEOUT = 3600.0  # seconds: a probe waiting longer is a typo (gRPC fails 1e30 at once)


def probe_address(address: str) -> str:
    """The address to dial for a server bound to `address` (wildcard hosts -> loopback,
    a unix: socket as it is)."""
    if address.startswith(UNIX_SCHEMES):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address: expected HOST:PORT or unix:PATH, got {address!r}")
    return f"{WILDCARD_HOSTS.get(host, host)}:{port}"


def open_channel(address: str, ca_file: str = "", server_name: str = "") -> grpc.Channel:
    """Plaintext, or TLS verified against `ca_file` (checking `server_name` when given)."""
    if not ca_file:
        return grpc.insecure_channel(address)
    try:
        with open(ca_file, "rb") as f:
            roots = f.read()
    except OSError as exc:
        raise ValueError(f"--ca-file {ca_file}: cannot read it ({exc})") from None
    try:  # as the client checks it: gRPC's own failure is a handshake error on every call
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=roots.decode("ascii", "ignore")
        )
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"--ca-file {ca_file}: expected PEM CA certificates ({exc})") from None
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    *,
    ca_file: str = "",
    server_name: str = "",
) -> tuple[bool, str]:
    """Ask the health service once; (healthy, one-line reason)."""
    with open_channel(address, ca_file, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{address}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags, with the address falling back to $HESSIAN_ADDRESS."""
    parser = argparse.ArgumentParser(
        prog="python -m hessian_service.healthprobe",
        description="Exit 0 when the hessian server's gRPC health service answers SERVING.",
    )
    parser.add_argument(
        "--address",
        # (an empty or blank variable is unset, as the server reads it)
        default=environ.get("HESSIAN_ADDRESS", "").strip() or DEFAULT_ADDRESS,
        help=f"server HOST:PORT or unix:PATH (env HESSIAN_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        help=f"seconds to wait (default 3, at most {MAX_TIMEOUT:g})",
    )
    parser.add_argument(
        "--ca-file",
        default=environ.get("HESSIAN_CA_FILE", ""),
        help="PEM CA of the server's TLS certificate; turns TLS on (env HESSIAN_CA_FILE)",
    )
    parser.add_argument(
        "--server-name",
        default=environ.get("HESSIAN_PROBE_SERVER_NAME", ""),
        help="name to verify the certificate against (env HESSIAN_PROBE_SERVER_NAME)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT:  # nan too
        parser.error(
            f"--timeout: expected seconds > 0 and at most {MAX_TIMEOUT:g}, got {args.timeout}"
        )
    if environ.get("HESSIAN_TLS_CERT") and not args.ca_file:
        parser.error("the server serves TLS (HESSIAN_TLS_CERT): give --ca-file/HESSIAN_CA_FILE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Probe once and print the answer; 0 when SERVING, else 1."""
    try:
        args = parse_args(argv, os.environ)
        address = probe_address(args.address)
        healthy, reason = check(
            address,
            args.service,
            args.timeout,
            ca_file=args.ca_file,
            server_name=args.server_name,
        )
    except SystemExit as exc:  # argparse: Docker reserves exit code 2, so report unhealthy
        return 0 if exc.code == 0 else 1
    except ValueError as exc:
        print(f"healthprobe: {exc}", file=sys.stderr)
        return 1
    print(f"healthprobe: {reason}", file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
