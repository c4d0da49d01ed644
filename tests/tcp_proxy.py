"""A TCP proxy the test controls: forward to a server, then cut it (refuse or black-hole), then restore."""

from __future__ import annotations

import contextlib
import socket
import threading


class TCPProxy:
    """Listens on 127.0.0.1:<port> and forwards to ``target`` while it is up."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"  # or "refuse" (close at once) or "blackhole" (accept, never answer)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self._conns.append(client)
            if mode == "refuse":
                client.close()
                continue
            if mode in ("blackhole", "stall"):
                continue  # hold it open, say nothing
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.mode == "stall":
                    continue  # swallow it: the peer waits forever on an open connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stall(self) -> None:
        """Keep every connection open but forward nothing more: a server that stopped answering."""
        with self._lock:
            self.mode = "stall"

    def cut(self, mode: str = "refuse") -> None:
        """Drop every open connection; new ones are refused or black-holed until :meth:`restore`."""
        with self._lock:
            self.mode = mode
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        with self._lock:
            self.mode = "forward"
            conns, self._conns = self._conns, []
        for conn in conns:  # black-holed clients: let them fail and retry
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()
