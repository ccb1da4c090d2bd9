"""A loopback TCP relay in front of a real server, whose connections a test can cut.

Cutting the wire mid-stream is what a client sees when an engine host dies or a load
balancer drops a connection; the relay does it without touching the server.
"""

from __future__ import annotations

import socket
import threading


class Relay:
    """Accepts on 127.0.0.1:<port> and pipes each connection to `upstream` (host, port).
    `num_connections` counts the connections accepted; `sever()` cuts the open ones
    (new connections are still relayed)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.num_connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self.num_connections += 1
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()

    def sever(self) -> None:
        with self._lock:
            doomed, self._open = self._open, []
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.sever()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
