"""An idle websocket holds no greenlet (issue 16): it waits on libev watchers
and borrows a greenlet for a turn when it has work. What a socket did on its
own greenlet it still does: frames that arrive while it is parked are
handled, it pings and drops a dead peer, closes a slow consumer with 1008 and
a failing endpoint with 1011, wakes for the endpoint's deadlines and when
woken from another greenlet, and ends exactly once.

Real socket pairs on the gevent loop (no uWSGI); the peer speaks raw frames.
Each wait is on observable state (a frame read, an endpoint hook's event).
"""

from __future__ import annotations

import os
import struct
import time

import gevent
import gevent.event
import gevent.socket
import pytest

from offload.policies import ANONYMOUS
from offload.testing import frame
from offload.transports.connection import Endpoint, State, WebSocket, open_connections
from offload.transports.sockets import cork

WAIT = 5.0  # seconds any awaited event may take (a busy CI box)


class Recorder(Endpoint):
    """Echoes text, counts hooks, remembers the greenlets its hooks ran on."""

    def __init__(self, ws: WebSocket) -> None:
        super().__init__(ws)
        self.greenlets: list = []
        self.wakes = 0
        self.closed = gevent.event.Event()
        self.closes = 0
        self.woken = gevent.event.Event()
        self.deadline: float | None = None

    def on_open(self) -> None:
        self.greenlets.append(gevent.getcurrent())

    def on_text(self, text: str) -> None:
        self.greenlets.append(gevent.getcurrent())
        if text == "fail":
            raise RuntimeError("the endpoint broke")
        self.ws.send_text(text)

    def on_wake(self) -> None:
        self.wakes += 1
        self.deadline = None  # met
        self.woken.set()

    def next_deadline(self) -> float | None:
        return self.deadline

    def on_close(self) -> None:
        self.closes += 1
        self.closed.set()


def socket_pair(buffer: int | None = None) -> tuple[WebSocket, gevent.socket.socket]:
    ours, peer = gevent.socket.socketpair()
    if buffer is not None:
        ours.setsockopt(gevent.socket.SOL_SOCKET, gevent.socket.SO_SNDBUF, buffer)
        peer.setsockopt(gevent.socket.SOL_SOCKET, gevent.socket.SO_RCVBUF, buffer)
    ours.setblocking(False)
    ws = WebSocket(ours.detach(), ANONYMOUS, {})
    ws._owns_fd = True  # as after detach(): the fd is closed when the connection ends
    peer.settimeout(WAIT)
    return ws, peer


def read_frame(peer) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame (unmasked)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = peer.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(length)


def start(ws: WebSocket, endpoint: Endpoint) -> None:
    """Run the socket as the server does (a greenlet that opens it), which must end while it stays open."""
    opener = gevent.spawn(ws.run, endpoint)
    opener.join(WAIT)
    assert opener.dead, "run() keeps its greenlet while the socket is idle"
    assert ws.state is State.OPEN


@pytest.fixture
def pings(settings):
    settings.OFFLOAD_PING_INTERVAL = 0.05
    settings.OFFLOAD_PING_TIMEOUT = 0.3


def test_an_idle_socket_has_no_greenlet_and_handles_what_arrives(settings):
    settings.OFFLOAD_PING_INTERVAL = 60.0
    ws, peer = socket_pair()
    endpoint = Recorder(ws)
    before = open_connections()
    start(ws, endpoint)
    assert open_connections() == before + 1

    peer.sendall(frame(1, b"hello"))
    assert read_frame(peer) == (1, b"hello")
    peer.sendall(frame(1, b"again"))
    assert read_frame(peer) == (1, b"again")
    opener, first, second = endpoint.greenlets
    assert first is not opener and second is not first, "each turn borrows a greenlet"
    assert first.dead, "a turn's greenlet ends when the socket parks again"

    peer.sendall(frame(8, struct.pack("!H", 1000)))  # the client closes
    assert read_frame(peer) == (8, struct.pack("!H", 1000))  # echoed
    assert endpoint.closed.wait(WAIT)
    assert peer.recv(1) == b"", "the fd is closed once the connection ended"
    assert ws.state is State.CLOSED and ws.close_code == 1000 and endpoint.closes == 1
    assert open_connections() == before


def test_an_idle_socket_is_pinged_and_a_live_peer_stays(pings):
    ws, peer = socket_pair()
    endpoint = Recorder(ws)
    start(ws, endpoint)
    for _ in range(3):
        opcode, payload = read_frame(peer)
        assert opcode == 9 and payload.isdigit()  # a ping
        peer.sendall(frame(10, payload))  # the pong
    assert ws.state is State.OPEN and not endpoint.closed.is_set()
    ws.close(1000)
    assert read_frame(peer) == (8, struct.pack("!H", 1000))
    peer.sendall(frame(8, struct.pack("!H", 1000)))
    assert endpoint.closed.wait(WAIT) and endpoint.closes == 1


def test_an_idle_socket_drops_a_dead_peer(pings):
    ws, peer = socket_pair()
    endpoint = Recorder(ws)
    start(ws, endpoint)
    assert read_frame(peer)[0] == 9  # pinged; never answered
    assert endpoint.closed.wait(WAIT), "a peer that does not answer a ping is dropped"
    assert ws.state is State.CLOSED and ws.close_code is None  # no close frame for a dead peer
    assert peer.recv(1) == b""


def test_a_parked_slow_consumer_is_closed_with_1008(settings):
    settings.OFFLOAD_PING_INTERVAL = 60.0
    settings.OFFLOAD_MAX_QUEUED_BYTES = 64 * 1024
    ws, peer = socket_pair(buffer=4096)
    endpoint = Recorder(ws)
    start(ws, endpoint)
    chunk = b"\x82\x7e\x10\x00" + b"x" * 4096  # a 4 KiB binary frame
    for _ in range(200):  # the hub's fan-out: the peer reads nothing
        if not ws.offer(chunk):
            ws.send_frame(chunk)
        if ws.close_code is not None:
            break
    assert ws.close_code == 1008, "a socket over OFFLOAD_MAX_QUEUED_BYTES is a slow consumer"
    received = b""
    while b"\x88" + bytes([2 + len(b"slow consumer")]) not in received:  # the close frame, behind what was queued
        data = peer.recv(65536)
        assert data, "the close frame never came"
        received += data
    peer.sendall(frame(8, struct.pack("!H", 1008)))
    assert endpoint.closed.wait(WAIT) and endpoint.closes == 1
    assert ws.queued_bytes == 0


def test_a_failing_turn_closes_with_1011_and_ends_once(settings):
    settings.OFFLOAD_PING_INTERVAL = 60.0
    ws, peer = socket_pair()
    endpoint = Recorder(ws)
    start(ws, endpoint)
    peer.sendall(frame(1, b"fail"))
    opcode, payload = read_frame(peer)
    assert opcode == 8 and struct.unpack("!H", payload[:2])[0] == 1011
    assert endpoint.closed.wait(WAIT) and endpoint.closes == 1
    assert peer.recv(1) == b""


def test_a_parked_socket_wakes_at_the_endpoints_deadline_and_when_told(settings):
    settings.OFFLOAD_PING_INTERVAL = 60.0
    ws, peer = socket_pair()
    endpoint = Recorder(ws)
    endpoint.deadline = time.monotonic() + 0.05  # the session's next step (a subscribe timeout)
    start(ws, endpoint)
    assert endpoint.woken.wait(WAIT), "the parked socket's timer runs a turn at the endpoint's deadline"
    assert endpoint.wakes == 1
    endpoint.woken.clear()

    gevent.spawn(ws.wake).join(WAIT)  # from another greenlet (the hub: a channel is ready)
    assert endpoint.woken.wait(WAIT) and endpoint.wakes == 2
    ws.close(1000)
    peer.sendall(frame(8, struct.pack("!H", 1000)))
    assert endpoint.closed.wait(WAIT) and endpoint.closes == 1


class Greeter(Recorder):
    """Writes a first frame when it opens (as ``subscribed`` follows the 101 of a websocket with a channel)."""

    def on_open(self) -> None:
        super().on_open()
        self.ws.send_text("first")


def tcp_pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    """A loopback TCP connection (TCP_CORK needs TCP): (the server's end, the client's)."""
    with gevent.socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = gevent.socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(WAIT)
    return server, client


def corked(fd: int) -> bool:
    probe = gevent.socket.socket(fileno=fd)
    try:
        return bool(probe.getsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_CORK))
    finally:
        probe.detach()


@pytest.mark.parametrize("writes_on_open", [True, False])
def test_the_corked_101_leaves_with_the_first_frame_or_when_the_first_turn_parks(settings, writes_on_open):
    """The view corks the socket before uWSGI's 101 (offload.views); the socket uncorks at its first write,
    or when its first turn parks with nothing written: never a 101 held for the kernel's 200 ms limit."""
    settings.OFFLOAD_PING_INTERVAL = 60.0
    server, client = tcp_pair()
    server.setblocking(False)
    fd = server.detach()
    cork(fd, True)
    head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    os.write(fd, head)  # what uWSGI's handshake writes
    ws = WebSocket(fd, ANONYMOUS, {}, corked=True)
    ws._owns_fd = True
    endpoint = (Greeter if writes_on_open else Recorder)(ws)  # Recorder writes nothing when it opens
    start(ws, endpoint)
    assert not corked(fd)
    expected = head + (b"\x81\x05first" if writes_on_open else b"")
    received = b""
    while len(received) < len(expected):
        received += client.recv(len(expected) - len(received))
    assert received == expected
    client.close()  # the peer goes: the socket ends
    assert endpoint.closed.wait(WAIT)
