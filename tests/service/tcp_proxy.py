"""A loopback TCP relay whose connections a test can sever, to drop a gRPC stream for real,
or freeze (bytes swallowed, connections left open: a network that holds packets)."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Accepts on a free port and relays each connection to `target` until `sever()`."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._refusing = False
        self.frozen = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                if self._refusing:  # accepted while close() ran: cut it, accept no more
                    for s in (client, upstream):
                        s.close()
                    return
                self._conns += [client, upstream]
                self.accepted += 1
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def sever(self) -> None:
        """Cut every open connection (new ones are still accepted)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        """Refuse new connections and cut every open one, whatever the accept thread is doing.

        Closing a listening socket does not wake a thread blocked in accept() on it, and a
        connection it accepts meanwhile could be registered after a plain sever(): the flag,
        set under the lock sever() takes, makes such a late connection cut on arrival, and
        one connection of our own wakes the thread so that it sees the flag and stops.
        """
        with self._lock:
            if self._refusing:
                return
            self._refusing = True
        self.listener.close()
        with contextlib.suppress(OSError), socket.create_connection(self.address.split(":")):
            pass
        self.sever()
