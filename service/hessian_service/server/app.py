"""Assemble and run the server: store, registry, run manager, servicer, health, reflection.

`build_server(config, interceptors=[...])` returns a started `ServerHandle`; the
interceptor list is where authentication, metrics and logging plug in. `main` is the
`hessian-server` console script: SIGTERM/SIGINT drain gracefully (health NOT_SERVING,
runs stopped before their next iteration and marked INTERRUPTED, in-flight calls given
`grace_seconds`).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hessian_client.proto import service_pb2, service_pb2_grpc

from .. import __version__
from ..engine import native_status
from ..store import RunStore, SQLiteRunStore
from .config import ServerConfig
from .problems import ProblemRegistry
from .runs import RunManager
from .service import HessianService

log = logging.getLogger("hessian_service.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["HessianService"].full_name


@dataclass
class ServerHandle:
    """A started server and its parts; `stop()` drains it gracefully (idempotent)."""

    config: ServerConfig
    server: grpc.Server
    port: int
    store: RunStore
    runs: RunManager
    health: health.HealthServicer
    _stopped: threading.Event = field(default_factory=threading.Event)
    _stop_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        """host:port actually bound (the real port when the config asked for 0)."""
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop runs (records kept), let in-flight calls finish, close."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_seconds if grace is None else grace
            self.health.enter_graceful_shutdown()
            self.runs.shutdown(timeout=grace)
            self.server.stop(grace).wait()
            self.store.close()
            self._stopped.set()

    def wait(self) -> None:
        """Block until stop() has finished."""
        self._stopped.wait()


def build_server(
    config: ServerConfig,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    store: RunStore | None = None,
) -> ServerHandle:
    """Create, bind and start the server described by `config`."""
    config = config.validated()
    store = store or SQLiteRunStore(
        config.data_dir,
        commit_every=config.commit_every_records,
        commit_interval_s=config.commit_interval_ms / 1000,
    )
    interrupted = store.mark_interrupted("the server stopped while the run was executing")
    if interrupted:
        log.warning("marked %d runs INTERRUPTED from a previous process", len(interrupted))
    registry = ProblemRegistry(store, config.max_params, config.problem_cache_size)
    runs = RunManager(
        store,
        workers=config.workers,
        max_concurrent_runs=config.max_concurrent_runs,
        checkpoint_every=config.checkpoint_every,
    )
    size = config.max_message_bytes
    server = grpc.server(
        futures.ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="hessian-rpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", 0),
        ],
    )
    service_pb2_grpc.add_HessianServiceServicer_to_server(
        HessianService(config, store, registry, runs), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.address)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServerHandle(config, server, port, store, runs, health_servicer)


def main(argv: Sequence[str] | None = None) -> int:
    """`hessian-server`: serve until SIGTERM or SIGINT, then drain."""
    config = ServerConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        handle = build_server(config)
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the run store under --data-dir %s: %s", config.data_dir, exc)
        return 2
    except RuntimeError as exc:
        log.error("cannot serve on --address %s: %s", config.address, exc)
        return 2
    available, reason = native_status()
    log.info(
        "hessian-server %s listening on %s (data %s, %d workers, native backend: %s)",
        __version__,
        handle.address,
        config.data_dir,
        config.workers,
        reason if available else f"unavailable ({reason})",
    )

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining (grace %.1f s)", signum, config.grace_seconds)
        threading.Thread(target=handle.stop, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    handle.wait()
    log.info("stopped")
    return 0
