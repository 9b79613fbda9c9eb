"""Assemble and run the server: store, registry, run manager, servicer, health, reflection.

`build_server(config, interceptors=[...])` returns a started `ServerHandle`; the
interceptor list is where authentication, metrics and logging plug in. The server is
grpc.aio, its event loop in a thread of its own behind the handle's synchronous API:
WatchRun is async (a waiting watcher holds no thread), every other handler runs on the
--rpc-threads pool (the loop's default executor) through sync_bridge, but a step on a small
built problem (--inline-step-below), which runs on the loop itself. `main` is the
`hessian-server` console script: SIGTERM/SIGINT/SIGHUP drain gracefully (health NOT_SERVING,
runs stopped before their next iteration and marked INTERRUPTED, in-flight calls given
`grace_seconds`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import pathlib
import signal
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import thread as executor_threads
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from hessian_client.proto import service_pb2, service_pb2_grpc

from .. import __version__
from ..engine import native_status
from ..engine.objectives.exported import Exported
from ..engine.options import requested_backend
from ..store import PostgresRunStore, RunStore, SQLiteRunStore, StoreError
from ..store.recovery import recover_store
from . import certificates
from .auth import Tenancy, TokenCheck, load_tokens
from .config import UNIX_SCHEMES, ServerConfig, misspelt_variables, redacted
from .drain import Drain
from .failover import LeaseKeeper
from .logs import configure_logging
from .observability import CallInterceptor, Metrics
from .problems import ProblemRegistry
from .runs import RunManager
from .service import HessianService
from .sync_bridge import asyncify
from .threads import install_thread_policy
from .workers import DRAIN_SIGNALS, WorkerPool

log = logging.getLogger("hessian_service.server")
# after the drain, how long threads about to end (a run finishing its last step) may take
# before the process exits without them
LINGER_SECONDS = 1.0
MIN_CLIENT_PING_MS = 10_000  # the most often a client may ping an open call (keepalive)
CERT_WARNING_DAYS = 14  # a --tls-cert ending sooner is logged at start
CERT_CLOCK_SKEW_MINUTES = 5  # a certificate issued by a machine this far ahead still starts
SERVICE = service_pb2.DESCRIPTOR.services_by_name["HessianService"]
SERVICE_NAME = SERVICE.full_name


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; `run` waits for a coroutine there."""

    def __init__(self, executor: futures.ThreadPoolExecutor) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(executor)
        self._thread = threading.Thread(target=self.loop.run_forever, name="hessian-aio")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Any) -> Any:
        """Run `coro` on the loop and return its result (or raise its exception)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Finish its async generators, stop the loop, join its thread and close it (its
        executor is shut down without waiting for handlers still running on it)."""
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _SyncInterceptor(grpc.aio.ServerInterceptor):
    """A plain grpc.ServerInterceptor on the aio server: it sees the resolved handler."""

    def __init__(self, inner: grpc.ServerInterceptor) -> None:
        self.inner = inner

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        return self.inner.intercept_service(lambda _details: handler, details)


@dataclass
class ServerHandle:
    """A started server and its parts; `stop()` drains it gracefully (idempotent)."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    store: RunStore
    runs: RunManager
    health: health_aio.HealthServicer
    events: EventLoopThread
    metrics: Metrics | None = None
    metrics_port: int = 0
    leases: LeaseKeeper | None = None
    drain: Drain | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        """host:port actually bound (the real port when the config asked for 0), or the
        unix: socket address as configured (it has no port)."""
        if self.config.address.startswith(UNIX_SCHEMES):
            return self.config.address
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop runs (records kept), let in-flight calls finish, close."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            if self.drain is not None:
                self.drain.begin()  # new calls: UNAVAILABLE at once (health still answers)
            self.events.run(self.health.enter_graceful_shutdown())
            self.runs.shutdown(timeout=grace)
            if self.leases is not None:
                self.leases.close()
            if self.drain is not None:
                self.events.run(self.drain.wait_idle(deadline - time.monotonic()))
            self.events.run(self.server.stop(max(deadline - time.monotonic(), 0.0)))
            self.events.close()
            if self.metrics is not None:
                self.metrics.close()
            try:
                self.store.close()
            except StoreError as exc:
                log.error("records still queued at shutdown were not stored: %s", exc)
            finally:
                self._stopped.set()

    def wait(self) -> None:
        """Block until stop() has finished.

        Waits in short slices: a SIGTERM the kernel hands to another thread (gRPC's, OpenMP's)
        does not interrupt an untimed wait, and Python runs the handler only once the main
        thread wakes.
        """
        while not self._stopped.wait(0.25):
            pass


def open_store(config: ServerConfig) -> RunStore:
    """The store --store names: PostgreSQL for a postgresql:// DSN, else SQLite (--data-dir)."""
    if config.store:
        return PostgresRunStore(
            config.store,
            password=store_password(config),
            max_bytes=config.max_store_bytes,
            check_integrity=not config.skip_store_check,
            pool_size=config.workers * 2 + 4,
            pool_timeout_s=min(10.0, config.lease_seconds / 8),
            lock_wait_s=config.lease_seconds / 4,
            commit_every=config.commit_every_records,
            commit_interval_s=config.commit_interval_ms / 1000,
            replica_id=config.replica_id or f"{socket.gethostname()}-{os.getpid()}",
        )
    return SQLiteRunStore(
        config.data_dir,
        commit_every=config.commit_every_records,
        commit_interval_s=config.commit_interval_ms / 1000,
        max_bytes=config.max_store_bytes,
        synchronous=config.sqlite_synchronous,
        check_integrity=not config.skip_store_check,
        exclusive=True,
    )


def store_password(config: ServerConfig) -> str:
    """The PostgreSQL password from --store-password-file ('' without one)."""
    if not config.store_password_file:
        return ""
    try:
        return pathlib.Path(config.store_password_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"--store-password-file {config.store_password_file}: cannot read it ({exc})"
        ) from None


def build_server(
    config: ServerConfig,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor | grpc.ServerInterceptor] = (),
    store: RunStore | None = None,
) -> ServerHandle:
    """Create, bind and start the server described by `config`.

    Interceptors run in this order: the server's own (observability.CallInterceptor: drain,
    authentication when --auth-token-file is set, metrics/logging/request id), then
    `interceptors` (grpc.aio ones; a plain grpc.ServerInterceptor is given the already
    resolved handler).
    """
    config = config.validated()
    tokens = load_tokens(config.auth_token_file) if config.auth_token_file else []
    admin_file = config.admin_token_file
    admins = load_tokens(admin_file, "--admin-token-file") if admin_file else []
    if both := len(set(tokens) & set(admins)):  # (the same file twice made every tenant one)
        log.warning(
            "%d of the %d --auth-token-file tokens are also in --admin-token-file: they are "
            "admins, who see and manage every tenant's runs and problems",
            both,
            len(set(tokens)),
        )
    credentials = _tls_credentials(config)
    if store is not None:
        return _assemble(config, store, tokens, admins, credentials, interceptors)
    store = open_store(config)
    try:
        return _assemble(config, store, tokens, admins, credentials, interceptors)
    except BaseException:
        store.close()  # lets its data directory go: a failed start holds nothing
        raise


def _assemble(
    config: ServerConfig,
    store: RunStore,
    tokens: list[bytes],
    admins: list[bytes],
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor | grpc.ServerInterceptor],
) -> ServerHandle:
    """build_server's work once the store is open: runs, servicer, pools, the bound server."""
    interrupted = store.mark_interrupted("the server stopped while the run was queued or executing")
    if interrupted:
        log.warning("marked %d runs INTERRUPTED from a previous process", len(interrupted))
    if config.max_stored_runs:
        store.enforce_retention(config.max_stored_runs)
    if config.max_problem_bytes:
        store.enforce_problem_retention(config.max_problem_bytes)
    metrics = Metrics() if config.metrics_port else None
    registry = ProblemRegistry(
        store,
        config.max_params,
        config.problem_cache_bytes,
        config.max_data_bytes,
        config.max_problem_bytes,
        # each of the exported objective's server options is the flag --exported-<name>
        {name: getattr(config, f"exported_{name}") for name in Exported.server_option_names},
    )
    threads = install_thread_policy(config)
    runs = RunManager(
        store,
        workers=config.workers,
        max_concurrent_runs=config.max_concurrent_runs,
        max_optimize_runs=config.max_optimize_runs,
        checkpoint_every=config.checkpoint_every,
        max_runs_per_owner=config.max_runs_per_token,
        on_record=metrics.count_record if metrics else None,
        threads=threads,
        max_iterations=config.max_iterations,
        max_stored_runs=config.max_stored_runs,
        process_after=config.process_after_ms / 1000,
    )
    if not config.run_processes and config.process_after_ms != ServerConfig.process_after_ms:
        log.warning("--process-after-ms has no effect without --run-processes")
    leases = _keep_leases(config, store, runs, registry)
    drain = Drain()
    auth = TokenCheck(tokens + admins) if tokens else None
    chain: list[grpc.aio.ServerInterceptor] = [CallInterceptor(metrics, drain, auth)]
    if not tokens:
        log.warning(
            "UNAUTHENTICATED: no --auth-token-file, so anyone who can reach %s can use this "
            "server%s",
            config.address,
            "" if config.allow_unauthenticated_remote else " (bound to loopback only)",
        )
    servicer = HessianService(config, store, registry, runs, Tenancy(bool(tokens), admins), metrics)
    pool = futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="hessian-rpc")
    events = EventLoopThread(pool)
    chain += [
        i if isinstance(i, grpc.aio.ServerInterceptor) else _SyncInterceptor(i)
        for i in interceptors
    ]
    metrics_port = 0
    try:
        if metrics is not None:
            metrics_port = _serve_metrics(config, metrics, store, runs)
        if config.run_processes:  # spawned last: a failed start leaves no child behind
            every = config.checkpoint_every
            runs.processes = WorkerPool(
                config.workers,
                every,
                threads.threads_for,
                config.problem_cache_bytes,
                (config.log_format, config.log_level),
            )
        server, port, health_servicer = events.run(
            _serve(config, asyncify(servicer, SERVICE), pool, chain, credentials)
        )
    except BaseException:
        events.close()
        if metrics is not None:
            metrics.close()
        if leases is not None:
            leases.close()
        if runs.processes is not None:
            runs.processes.close()
        raise
    return ServerHandle(
        config,
        server,
        port,
        store,
        runs,
        health_servicer,
        events,
        metrics,
        metrics_port,
        leases,
        drain,
    )


def _serve_metrics(
    config: ServerConfig, metrics: Metrics, store: RunStore, runs: RunManager
) -> int:
    """Start /metrics on --metrics-port; returns the port bound. One that cannot be bound is
    refused naming the flag (it was reported as the run store failing to open)."""
    metrics.watch_runs(runs.queue_depth, runs.active_count)
    metrics.watch_store(store.count_runs_by_status)
    available, _ = native_status()
    default = requested_backend(config.default_backend)
    metrics.backend.labels(default, str(available).lower()).set(1)
    try:
        return metrics.serve(config.metrics_host, config.metrics_port)
    except OSError as exc:
        raise ValueError(
            f"--metrics-port {config.metrics_port}: cannot serve metrics on "
            f"{config.metrics_host} ({exc})"
        ) from None


def _keep_leases(
    config: ServerConfig, store: RunStore, runs: RunManager, registry: ProblemRegistry
) -> LeaseKeeper | None:
    """For a store shared by replicas: lease every run this replica executes, take over
    runs whose replica died. None for the embedded SQLite store."""
    if not isinstance(store, PostgresRunStore):
        return None
    keeper = LeaseKeeper(
        store, runs, lambda pid: registry.by_id(pid, None, "run.problem_id"), config.lease_seconds
    )
    runs.leases = keeper
    keeper.start()
    return keeper


async def _serve(
    config: ServerConfig,
    servicer: object,
    pool: futures.ThreadPoolExecutor,
    interceptors: list[grpc.aio.ServerInterceptor],
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Create, bind and start the aio server on the running loop; health says SERVING."""
    size = config.max_message_bytes
    server = grpc.aio.server(
        migration_thread_pool=pool,
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
            # clients ping an open call's connection (hessian_client every 30 s) to find a
            # dead network; gRPC's default of one ping in 5 min ends a quiet stream
            # (GOAWAY too_many_pings) after two pings
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_MS),
        ],
    )
    service_pb2_grpc.add_HessianServiceServicer_to_server(servicer, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is not None:
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def _tls_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Server credentials from --tls-cert/--tls-key (PEM), or None for plaintext."""
    if not config.tls_cert:
        return None
    pems = []
    for flag, path in (("--tls-key", config.tls_key), ("--tls-cert", config.tls_cert)):
        try:
            pems.append(pathlib.Path(path).read_bytes())
        except OSError as exc:
            raise ValueError(f"{flag} {path}: cannot read it ({exc})") from None
    try:  # gRPC takes any bytes here and fails later, as "Failed to bind to address"
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            config.tls_cert, config.tls_key, password=b""
        )
    except ssl.SSLError as exc:
        raise ValueError(
            f"--tls-cert {config.tls_cert} and --tls-key {config.tls_key}: expected a PEM "
            f"certificate chain and its unencrypted private key ({exc.reason or exc})"
        ) from None
    _check_validity(config.tls_cert, pems[1].decode("ascii", "replace"))
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


def _check_validity(path: str, pem: str) -> None:
    """Refuse a chain with a certificate outside its validity period (every client's
    handshake would fail, and the server would look healthy to itself); warn when one ends
    within CERT_WARNING_DAYS, or starts within the clock skew allowed."""
    try:
        periods = certificates.validities(pem)
    except ValueError as exc:
        raise ValueError(f"--tls-cert {path}: {exc}") from None
    now = datetime.now(UTC)
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    for index, (not_before, not_after) in enumerate(periods):
        which = "the certificate" if index == 0 else f"certificate {index + 1} of the chain"
        if now > not_after:
            raise ValueError(
                f"--tls-cert {path}: {which} expired at {not_after:{stamp}} (now "
                f"{now:{stamp}}): no client would accept it"
            )
        if now < not_before - timedelta(minutes=CERT_CLOCK_SKEW_MINUTES):
            raise ValueError(
                f"--tls-cert {path}: {which} is not valid before {not_before:{stamp}} "
                f"(now {now:{stamp}}; is this machine's clock right?)"
            )
        if now < not_before:
            log.warning("--tls-cert %s: %s is valid only from %s", path, which,
                        f"{not_before:{stamp}}")  # fmt: skip
        if not_after - now < timedelta(days=CERT_WARNING_DAYS):
            log.warning("--tls-cert %s: %s expires at %s: renew it", path, which,
                        f"{not_after:{stamp}}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """`hessian-server`: serve until SIGTERM, SIGINT or SIGHUP, then drain."""
    try:
        config = ServerConfig.from_args(argv)
    except ValueError as exc:
        print(f"hessian-server: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    for warning in misspelt_variables():
        log.warning("%s", warning)
    if config.recover_store:
        try:
            if config.store:
                print(PostgresRunStore.recover(config.store, store_password(config)).summary())
            else:
                print(recover_store(config.data_dir).summary())
        except (OSError, sqlite3.Error, StoreError) as exc:
            where = "--store" if config.store else f"under --data-dir {config.data_dir}"
            log.error("cannot recover the run store %s: %s", where, exc)
            return 2
        except ValueError as exc:  # a flag's file (--store-password-file)
            log.error("cannot recover the run store: %s", exc)
            return 2
        return 0
    # the handlers go in before the server reports SERVING: a SIGTERM right after readiness
    # (an orchestrator's) drains instead of killing the process outright
    built: list[ServerHandle] = []
    signalled = threading.Event()

    def drain() -> None:
        if built:
            threading.Thread(target=built[0].stop, name="drain", daemon=True).start()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining (grace %.1f s)", signum, config.grace_seconds)
        signalled.set()
        drain()

    # SIGHUP too (a closed terminal, a supervisor's stop): it killed the server outright,
    # its runs left RUNNING until the next start
    for signum in DRAIN_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # (nohup's ignored SIGHUP kept)
            signal.signal(signum, on_signal)
    try:
        handle = build_server(config)
    except (OSError, sqlite3.Error, StoreError) as exc:
        where = "--store" if config.store else f"under --data-dir {config.data_dir}"
        log.error("cannot open the run store %s: %s", where, exc)
        return 2
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:
        log.error("cannot serve on --address %s: %s", config.address, exc)
        return 2
    available, reason = native_status()
    log.info(
        "hessian-server %s listening on %s (%s, %s; runs in %s, %d workers, native backend: %s%s)",
        __version__,
        handle.address,
        "TLS" if config.tls_cert else "plaintext",
        "bearer tokens" if config.auth_token_file else "UNAUTHENTICATED",
        redacted(config.store) if config.store else f"SQLite under {config.data_dir}",
        config.workers,
        reason if available else f"unavailable ({reason})",
        f"; metrics on http://{config.metrics_host}:{handle.metrics_port}/metrics"
        if handle.metrics_port
        else "",
    )

    built.append(handle)
    if signalled.is_set():  # it came while the server was being built
        drain()
    handle.wait()
    log.info("stopped")
    _exit_now(handle)
    return 0


def _exit_now(handle: ServerHandle) -> None:
    """End the process once the drain is done, without the interpreter's teardown.

    A run's iteration in a long torch call (or a slow RPC handler) cannot be interrupted,
    and the interpreter's exit would join its thread, outliving the orchestrator's kill
    timeout (exit 137). Its run is already stored INTERRUPTED (resumable) and the store
    closed, so after LINGER_SECONDS the process exits 0 without it (os._exit, logs flushed).
    With no thread busy the exit handlers run first; either way the interpreter's own
    teardown of torch and gRPC (about 2 s after "stopped") is skipped: nothing is left for it.
    """
    stop = time.monotonic() + LINGER_SECONDS
    for thread in _joined_at_exit():
        thread.join(max(stop - time.monotonic(), 0.0))
    busy = [t.name for t in _joined_at_exit() if t.is_alive()]
    if busy:
        log.warning(
            "exiting without waiting for the threads still computing (%d: %s); runs cut "
            "mid-iteration (stored INTERRUPTED, resumable): %d",
            len(busy),
            ", ".join(busy),
            handle.runs.active_count() - handle.runs.queue_depth(),
        )
    else:
        atexit._run_exitfuncs()  # what a normal exit runs first (they would join the busy)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _joined_at_exit() -> list[threading.Thread]:
    """The threads the interpreter's exit waits for, but this one: the non-daemon ones and
    every ThreadPoolExecutor worker (daemon or not: concurrent.futures joins its own)."""
    me = threading.current_thread()
    workers = list(executor_threads._threads_queues)  # what concurrent.futures joins at exit
    others = [t for t in threading.enumerate() if not t.daemon and t not in workers]
    return [t for t in workers + others if t is not me]
