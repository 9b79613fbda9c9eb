"""The /metrics HTTP endpoint, bounded: prometheus_client's own server starts a thread per
connection and waits for ever on a request that never completes, so 500 idle connections
(unauthenticated) took every file descriptor and new gRPC connections failed. Here each
connection is closed CONNECTION_SECONDS after it was accepted, whatever it is doing (a read
timeout alone lets a client that sends a byte every few seconds keep its slot), and at most
MAX_CONNECTIONS are served at once; one more is closed at once (a scraper retries at its
next interval)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

CONNECTION_SECONDS = 10.0
MAX_CONNECTIONS = 16


class _Handler(WSGIRequestHandler):
    """A request handler whose connection is cut CONNECTION_SECONDS after it began (its
    reads time out then too), and that logs nothing (a scrape every few seconds is no news)."""

    timeout = CONNECTION_SECONDS

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.timeout, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):  # the client went away or was cut
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away: nothing to report."""


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` at http://host:port/metrics on a daemon thread; returns the server
    (its server_address has the port bound; shutdown() and server_close() stop it)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server = _BoundedServer((host, port), family)
    server.set_app(make_wsgi_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
