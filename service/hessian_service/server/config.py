"""Server configuration: one frozen dataclass built from flags, each also an environment variable.

Precedence: flag, then HESSIAN_<NAME> (e.g. HESSIAN_MAX_PARAMS), then the default here.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .. import __version__
from ..engine.options import BACKEND_ENV, BACKENDS

# read by the extension's CUDA ops (csrc/cuda/small_solve.cu): "0" sends them to ATen
CUDA_KERNELS_ENV = "HESSIAN_CUDA_KERNELS"

MiB = 1024**2
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
KIND_NAMES = {int: "an integer", float: "a number"}
LOOPBACK_HOSTS = ("localhost", "::1")
LOG_LEVELS = tuple(logging.getLevelNamesMapping())  # WARN, FATAL and NOTSET too
UNIX_SCHEMES = ("unix:", "unix-abstract:")  # gRPC's Unix domain socket addresses
INT64_MAX = 2**63 - 1  # the wire's int64 (ServerInfo reports the limits)
GRPC_INT_MAX = 2**31 - 1  # gRPC's channel arguments are C ints
MIN_MESSAGE_BYTES = 1024
MAX_THREADS = 1024  # workers, RPC threads and torch threads: more is a typo, not a machine
# a record waiting longer than an hour for its commit is a typo (the store-flush thread's
# deadline arithmetic overflowed past ~9.2e12 ms and killed it)
MAX_COMMIT_INTERVAL_MS = 3_600_000
# any *_seconds setting (a day): past threading.TIMEOUT_MAX (~9e9 s) a wait on it raises
# OverflowError in the thread that waits (the lease keeper's, the drain's)
MAX_SECONDS = 86_400
MIN_LEASE_SECONDS = 1.0
# read by the other programs that share a server's environment (the client and CLI, the
# health probe, the compose file): never reported as misspelt server settings
OTHER_PROGRAMS_VARIABLES = (
    "HESSIAN_TOKEN",
    "HESSIAN_CA_FILE",
    "HESSIAN_PROBE_SERVER_NAME",
    "HESSIAN_PORT",
    "HESSIAN_METRICS_HOST_PORT",
)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: localhost, or an IP literal in 127.0.0.0/8 or
    ::1 (a DNS name that merely starts with "127." may resolve anywhere)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 binds to loopback too
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _ipv6(host: str) -> bool:
    """Whether `host` is a bare IPv6 literal (no brackets)."""
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Everything `hessian-server` can be told; limits are enforced before work is done."""

    address: str = "127.0.0.1:50051"
    data_dir: str = "./data"
    store: str = ""
    store_password_file: str = ""
    replica_id: str = ""
    lease_seconds: float = 10.0
    workers: int = 2
    run_processes: bool = False  # runs iterate in --workers child processes, not threads
    process_after_ms: int = 20  # with run_processes, a lone run's time on its thread (0: none)
    rpc_threads: int = 64
    max_message_bytes: int = 64 * MiB
    max_params: int = 1_000_000
    dense_budget_bytes: int = 2 * 1024 * MiB
    max_iterations: int = 1_000_000
    max_concurrent_runs: int = 64
    checkpoint_every: int = 100
    commit_every_records: int = 256
    commit_interval_ms: int = 200
    grace_seconds: float = 10.0
    default_backend: str = ""
    log_level: str = "INFO"
    log_format: str = "json"
    max_data_bytes: int = 256 * MiB
    max_runs_per_token: int = 0
    max_stored_runs: int = 0
    max_store_bytes: int = 0
    sqlite_synchronous: str = "NORMAL"
    skip_store_check: bool = False
    recover_store: bool = False
    max_problem_bytes: int = 0
    problem_cache_bytes: int = 256 * MiB
    auth_token_file: str = ""
    admin_token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    allow_unauthenticated_remote: bool = False
    metrics_port: int = 0
    intra_op_threads: int = 0
    single_thread_below: int = 1_000_000
    inline_step_below: int = 100_000
    max_optimize_streams_per_token: int = 0  # open Optimize streams per token (0: no limit)
    optimize_evaluation_seconds: float = 60.0  # an Optimize caller's time per evaluation
    max_optimize_runs: int = 32  # Optimize runs at once, on their own threads (not --workers)
    exported_evaluation_seconds: float = 60.0  # one evaluation of an exported program
    exported_compile: bool = False  # torch.compile exported programs when they are built

    def __post_init__(self) -> None:
        """--log-format and --default-backend in any case (JSON, Native), as --log-level and
        --sqlite-synchronous are: stored lower-case, as the server compares them."""
        for name in ("log_format", "default_backend"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.lower())

    def validated(self) -> ServerConfig:
        """Check ranges; raise ValueError naming the flag."""
        for name, most in (  # each flag's own limit first, then the wire's int64 for the rest
            ("max_message_bytes", GRPC_INT_MAX),
            ("metrics_port", 65535),
            ("workers", MAX_THREADS),
            ("rpc_threads", MAX_THREADS),
            ("max_optimize_runs", MAX_THREADS),
            ("intra_op_threads", MAX_THREADS),
            ("commit_interval_ms", MAX_COMMIT_INTERVAL_MS),
            *((f.name, MAX_SECONDS) for f in fields(self) if f.name.endswith("_seconds")),
        ):
            if getattr(self, name) > most:
                raise ValueError(f"--{name.replace('_', '-')} must be at most {most}")
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is int and value > INT64_MAX:
                raise ValueError(f"--{f.name.replace('_', '-')} must be at most {INT64_MAX}")
        self._check_address()
        for name in (
            "workers",
            "rpc_threads",
            "max_message_bytes",
            "max_params",
            "dense_budget_bytes",
            "max_iterations",
            "max_concurrent_runs",
            "checkpoint_every",
            "commit_every_records",
            "commit_interval_ms",
            "max_optimize_runs",
            "max_data_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(
                f"--max-message-bytes must be >= {MIN_MESSAGE_BYTES} (a run's info, a record "
                "and GetServerInfo's answer must fit one message)"
            )
        for name in (
            "max_runs_per_token",
            "max_stored_runs",
            "max_store_bytes",
            "max_problem_bytes",
            "problem_cache_bytes",
            "metrics_port",
            "single_thread_below",
            "inline_step_below",
            "max_optimize_streams_per_token",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: off)")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number")
        if self.process_after_ms < 0:
            raise ValueError(
                "--process-after-ms must be >= 0 (0: every run starts in a worker process)"
            )
        if not self.optimize_evaluation_seconds > 0:
            raise ValueError("--optimize-evaluation-seconds must be > 0")
        if not self.exported_evaluation_seconds > 0:
            raise ValueError("--exported-evaluation-seconds must be > 0")
        if self.intra_op_threads < 0:
            raise ValueError("--intra-op-threads must be >= 0 (0: usable CPUs / --workers)")
        if self.default_backend not in ("", *BACKENDS):
            raise ValueError(f"--default-backend must be one of {', '.join(BACKENDS)}")
        engine_backend = os.environ.get(BACKEND_ENV, "")
        if engine_backend not in ("", *BACKENDS):
            raise ValueError(
                f"{BACKEND_ENV}={engine_backend!r} (the engine's backend where nothing else "
                f"names one) must be empty or one of {', '.join(BACKENDS)}"
            )
        kernels = os.environ.get(CUDA_KERNELS_ENV, "1")
        if kernels not in ("0", "1"):  # the extension reads exactly "0" as off
            raise ValueError(f"{CUDA_KERNELS_ENV}={kernels!r} must be 0 or 1")
        if self.log_format not in ("json", "text"):
            raise ValueError("--log-format must be json or text")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.store and not self.store.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                "--store must be empty (SQLite under --data-dir) or a postgresql:// DSN, got "
                f"{redacted(self.store)!r}"
            )
        if self.store:
            _check_dsn(self.store)
        if not self.data_dir.strip():
            raise ValueError("--data-dir must be a directory path (default ./data), got ''")
        if self.grace_seconds < 0:
            raise ValueError("--grace-seconds must be >= 0")
        if not self.lease_seconds >= MIN_LEASE_SECONDS:
            # renewals every T/8 and the store's waits of T/8 (a connection) and T/4 (a row
            # lock): at 0.02 s a replica started, answered SERVING, and failed every write
            raise ValueError(
                f"--lease-seconds must be >= {MIN_LEASE_SECONDS:g} (a replica renews its "
                "leases every 1/8 of it and waits up to 1/8 for a store connection)"
            )
        if self.sqlite_synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("--sqlite-synchronous must be NORMAL or FULL")
        if not self.store:
            given = {
                "store_password_file": bool(self.store_password_file),
                "replica_id": bool(self.replica_id),
                "lease_seconds": self.lease_seconds != ServerConfig.lease_seconds,
            }
            for name, set_here in given.items():
                if set_here:
                    raise ValueError(
                        f"--{name.replace('_', '-')} applies to a PostgreSQL --store only "
                        "(none is given: runs are stored in SQLite under --data-dir)"
                    )
        if self.admin_token_file and not self.auth_token_file:
            raise ValueError("--admin-token-file needs --auth-token-file (tenants need tokens)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if (
            not self.auth_token_file
            and not self.allow_unauthenticated_remote
            and not self.address.startswith(UNIX_SCHEMES)  # a socket file: this machine only
            and not is_loopback(self.host)
        ):
            raise ValueError(
                f"--address {self.address} is not a loopback address and no --auth-token-file "
                "is given: anyone who can reach it could use the server. Give "
                "--auth-token-file, bind to 127.0.0.1, or pass --allow-unauthenticated-remote"
            )
        return self

    def _check_address(self) -> None:
        """--address is host:port with a port in 0-65535 (0: one the system picks), or a
        unix: socket path; gRPC would otherwise wrap a port past 65535, or default a missing
        one to 443."""
        if self.address.startswith(UNIX_SCHEMES):
            scheme = next(s for s in UNIX_SCHEMES if self.address.startswith(s))
            if not self.address.removeprefix(scheme).removeprefix("//").strip():
                raise ValueError(
                    f"--address {scheme}PATH needs a socket path, got {self.address!r}"
                )
            return
        host, colon, port = self.address.rpartition(":")
        if _ipv6(host):  # "::1:50051": which colon ends it?
            raise ValueError(
                f"--address {self.address!r}: an IPv6 address goes in brackets, [{host}]:{port}"
            )
        if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(
                f"--address must be host:port with a port in 0-65535 (or unix:PATH), got "
                f"{self.address!r}"
            )
        if self.metrics_port and int(port) == self.metrics_port:
            raise ValueError(
                f"--metrics-port {self.metrics_port} is --address's port: give them two ports"
            )

    @property
    def host(self) -> str:
        """The host part of --address (brackets of an IPv6 literal removed)."""
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def metrics_host(self) -> str:
        """Where /metrics listens: --address's host, or loopback for a unix: socket (which
        has no host; Prometheus scrapes over TCP)."""
        return "127.0.0.1" if self.address.startswith(UNIX_SCHEMES) else self.host

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Parse flags (falling back to HESSIAN_* environment variables, then defaults).

        A variable that does not parse is reported only when its flag is not given (the
        flag wins), and never stops --help or --version."""
        env = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(
            prog="hessian-server",
            description="Second-order optimisation gRPC server",
            allow_abbrev=False,  # a flag is named in full (errors say where a value came from)
        )
        # not in --help's list, which README's Configuration table mirrors flag by flag (a
        # setting each, with its variable): README's text documents it
        parser.add_argument(
            "--version",
            action="version",
            version=f"hessian-server {__version__}",
            help=argparse.SUPPRESS,
        )
        bad_env: dict[str, str] = {}  # setting -> why its variable does not parse
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            var = "HESSIAN_" + f.name.upper()
            kind: Any = type(f.default)
            help_text = f"(env {var}, default {f.default!r})"
            given = var in env and (kind is bool or env[var].strip() != "")  # "": unset
            default = f.default
            if given:
                try:
                    default = _from_env(var, env[var], kind)
                except ValueError as exc:
                    bad_env[f.name], default = str(exc), _UNPARSED
            if kind is bool:
                # --no-X too: a flag overrides its environment variable both ways
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
                )
            else:
                parser.add_argument(flag, type=kind, default=default, help=help_text)
        args = parser.parse_args(argv)
        for name, problem in bad_env.items():
            if getattr(args, name) is _UNPARSED:  # no flag replaced the variable's value
                parser.error(problem)
        try:
            return cls(**vars(args)).validated()
        except ValueError as exc:
            raise ValueError(_with_source(str(exc), argv, env)) from None


def misspelt_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for HESSIAN_* variables that are no setting but close to one: a typo
    (HESSIAN_MAX_PARAM) the server would otherwise ignore in silence."""
    env = os.environ if environ is None else environ
    settings = {f.name.upper(): "HESSIAN_" + f.name.upper() for f in fields(ServerConfig)}
    known = {*settings.values(), BACKEND_ENV, CUDA_KERNELS_ENV, *OTHER_PROGRAMS_VARIABLES}
    warnings = []
    for var in sorted(env):
        if not var.startswith("HESSIAN_") or var in known:
            continue
        close = difflib.get_close_matches(var.removeprefix("HESSIAN_"), settings, 1, 0.8)
        if close:
            warnings.append(f"{var} is not a setting (ignored); did you mean {settings[close[0]]}?")
    return warnings


_UNPARSED = object()  # a setting's default while its variable does not parse


def _from_env(var: str, text: str, kind: type) -> Any:
    """An environment variable's value as the flag's type; ValueError naming the variable
    and what it should hold (from_args exits with it as a bad flag does, status 2)."""
    if kind is bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(
                f"{var}={text!r}: expected one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}"
            )
        return word in TRUE_WORDS
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"{var}={text!r}: expected {KIND_NAMES.get(kind, kind.__name__)}"
        ) from None


def redacted(dsn: str) -> str:
    """`dsn` with any password in it shown as ***, for messages and logs."""
    dsn = re.sub(r"(://[^:/@?#]*:)[^@/?#]*@", r"\1***@", dsn)
    # a query parameter, or a key=value DSN's (spaces around '=', a quoted value)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]*)", r"\1***", dsn)


def _check_dsn(dsn: str) -> None:
    """Refuse a DSN PostgreSQL's parser refuses, without echoing it (its error quotes the
    bad part, a password included; the connection pool logged it again every retry)."""
    import psycopg

    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        raise ValueError(
            f"--store {redacted(dsn)!r} is not a valid PostgreSQL DSN (a password with '%', "
            "'@' or '/' must be percent-encoded; the parser's message is not shown: it may "
            "quote the password)"
        ) from None


def _with_source(message: str, argv: Sequence[str] | None, env: Mapping[str, str]) -> str:
    """A validation message naming a flag, with the environment variable that set it when
    the flag itself was not given."""
    given = sys.argv[1:] if argv is None else argv
    for f in fields(ServerConfig):
        flag, var = "--" + f.name.replace("_", "-"), "HESSIAN_" + f.name.upper()
        named = message.startswith(flag + " ") or f" {flag} " in message
        from_env = env.get(var, "").strip()  # an empty variable is taken as unset
        if named and from_env and not any(a == flag or a.startswith(flag + "=") for a in given):
            shown = redacted(env[var]) if f.name == "store" else env[var]
            message = message.replace(flag, f"{flag} (from {var}={shown!r})", 1)
    return message
