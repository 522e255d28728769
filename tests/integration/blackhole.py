"""A TCP proxy for tests that can turn a live connection into a black hole.

A real network drop is not a clean close: no FIN, no RST, nothing. The
peer's writes vanish and its pings go unanswered until it gives up. Loopback
cannot lose packets, so a proxy between the test's clients and uWSGI plays
the network: :meth:`BlackHoleProxy.black_hole` stops forwarding the
connections open at that moment in both directions. It keeps both sockets
open, so neither end learns anything. uWSGI then sees silence: its pings are
not answered and it drops the socket as a dead peer. Connections opened
afterwards go through normally, so a client can reconnect through the same
proxy.

What uWSGI sends into the hole is read and thrown away. That changes nothing
for uWSGI (the kernel acknowledges its bytes either way), and it lets the
proxy see when uWSGI closes its end (:attr:`Pair.server_closed_at`).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["BlackHoleProxy", "Pair"]


@dataclass(eq=False)
class Pair:
    """One proxied connection: the client's socket and the proxy's socket to the server."""

    client: socket.socket
    server: socket.socket
    #: the proxy's local port towards the server (the server sees it as the peer port)
    server_side_port: int
    holed: bool = False
    #: monotonic time at which the server closed its end (None: still open)
    server_closed_at: float | None = None
    closed: bool = False


class BlackHoleProxy(threading.Thread):
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` on one selector thread.

    Args:
        target_port: the server's port.
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.pairs: list[Pair] = []
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    # -- control (the test's thread) ------------------------------------------------

    def black_hole(self) -> list[Pair]:
        """Stop forwarding every open connection, both ways; keep their sockets open.

        Returns:
            The connections that fell into the hole.
        """
        with self._lock:
            holed = [pair for pair in self.pairs if not pair.closed and not pair.holed]
            for pair in holed:
                pair.holed = True
        return holed

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        with self._lock:
            for pair in self.pairs:
                self._close(pair)
        self._sel.close()
        self.listener.close()
        if self.error is not None:
            raise AssertionError(f"the proxy thread failed: {self.error!r}") from self.error

    # -- the thread -----------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._sel.select(timeout=0.05):
                    if key.data is None:
                        self._accept()
                    else:
                        pair, from_client = key.data
                        with self._lock:
                            self._readable(pair, from_client)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(5)  # sends: the test's clients always read
        pair = Pair(client, server, server.getsockname()[1])
        with self._lock:
            self.pairs.append(pair)
        self._sel.register(client, selectors.EVENT_READ, (pair, True))
        self._sel.register(server, selectors.EVENT_READ, (pair, False))

    def _readable(self, pair: Pair, from_client: bool) -> None:
        source, sink = (pair.client, pair.server) if from_client else (pair.server, pair.client)
        try:
            data = source.recv(65536)
        except OSError:
            data = b""
        if pair.holed:
            if not data:
                self._sel.unregister(source)  # silence from here on; the socket stays open
                if not from_client:
                    pair.server_closed_at = time.monotonic()
            return  # into the hole
        if not data:
            self._close(pair)
            return
        try:
            sink.sendall(data)
        except OSError:
            self._close(pair)

    def _close(self, pair: Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.client, pair.server):
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
