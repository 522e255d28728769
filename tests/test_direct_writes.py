"""The fan-out hot path: the hub writes frames straight to sockets.

``WebSocket.offer`` over real socket pairs (gevent loop, no uWSGI), and when
an endpoint hands its socket to the hub (a fake hub: the narrow interface).
The hub's side, against a real redis-server, is in tests/test_hub.py.
"""

from __future__ import annotations

import socket

import gevent
import gevent.socket

import offload
from offload.core.protocol import parse_stream_id
from offload.policies import ANONYMOUS
from offload.transports.connection import State, WebSocket


def socket_pair(buffer: int | None = None) -> tuple[WebSocket, socket.socket]:
    ours, peer = gevent.socket.socketpair()  # the peer reads cooperatively
    if buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    ours.setblocking(False)
    ws = WebSocket(ours.detach(), ANONYMOUS, {})
    return ws, peer


def read_exactly(peer: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    peer.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = peer.recv(size - len(data))
        assert chunk, "peer closed"
        data += chunk
    return data


def test_offer_writes_to_open_sockets_and_refuses_the_others():
    plain, plain_peer = socket_pair()
    queued, _ = socket_pair()
    queued.send_frame(b"x" * 10_000_000)  # far more than the kernel takes: the rest stays queued
    assert queued.queued_bytes > 0
    closing, _ = socket_pair()
    closing.close(1000)  # closing: its close frame went out, nothing else may

    # The hub delivers the ordinary way to every socket that refuses (closing, or bytes queued).
    assert [ws.offer(b"frame") for ws in (plain, queued, closing)] == [True, False, False]
    assert read_exactly(plain_peer, 5) == b"frame"
    assert b"frame" not in b"".join(bytes(part) for part in queued._out), "nothing may jump a socket's queue"


def test_what_the_kernel_does_not_take_is_queued_and_flushed_in_order():
    ws, peer = socket_pair(buffer=4096)
    big = bytes(range(256)) * 2048  # 512 KiB: far more than the socket buffers
    assert ws.offer(big)
    assert ws.queued == 1, "the unsent rest waits in the socket's queue"
    ws.send_frame(b"after")  # queued behind the rest, not written past it
    received = []
    total = len(big) + 5

    def reader():
        peer.settimeout(5)
        got = 0
        while got < total:
            chunk = peer.recv(65536)
            received.append(chunk)
            got += len(chunk)

    gevent.joinall([gevent.spawn(reader)], timeout=10, raise_error=True)
    assert b"".join(received) == big + b"after"
    assert ws.queued == 0


def test_a_broken_socket_is_marked_closed():
    ws, peer = socket_pair()
    peer.close()
    assert ws.offer(b"x" * 100_000)
    for _ in range(3):  # the first write may still be accepted into the buffer
        ws.offer(b"x" * 100_000)
    assert ws.state is State.CLOSED


class HubStub:
    """The hub as the endpoint sees it (the narrow interface), with a settable fan-out position."""

    def __init__(self):
        self.fanned = None
        self.direct = []

    def subscribe(self, subscriber, channel):
        pass

    def unsubscribe(self, subscriber, channel):
        pass

    def write_directly_to(self, subscriber, channel, ws):
        self.direct.append(channel)

    def last_fanned_out(self, channel):
        return self.fanned

    def newest_id(self, channel):
        from offload.backend.history import read_tip

        return read_tip(channel)


def live_entry(channel: str, message_id: str):
    from offload.core.cursor import make_entry

    return make_entry(f'"{channel}"'.encode(), message_id.encode(), b"0")


def test_endpoint_hands_its_socket_over_only_once_the_hub_is_past_its_position(redis_client):
    """A resume that read history up to id N must not go direct while the hub
    may still fan out ids <= N (they were in Redis' pipe during the read): the
    cursor filters those; the first newer one switches it to direct writes.
    Its position then follows the hub (resync, repeated subscribe)."""
    import json

    from offload.transports import endpoints

    hub = HubStub()  # passed in: not the process's real hub
    channel = f"public:handover-{id(redis_client)}"
    ids = [offload.publish(channel, n) for n in range(3)]
    ws, peer = socket_pair()
    endpoint = endpoints.ChannelsEndpoint(ws, hub)
    session = endpoint.session  # what the hub calls
    endpoint.on_text(json.dumps({"type": "subscribe", "channel": channel, "since": ids[0]}))
    session.channel_ready(channel)
    endpoint.on_wake()  # history: ids[1], ids[2]
    assert hub.direct == [], "the hub has not fanned out anything yet: it may still carry old ids"

    session.deliver(channel, [live_entry(channel, ids[2])], live_entry(channel, ids[2])[2])
    assert session.cursors[channel].duplicates == 1 and hub.direct == []
    newer = offload.publish(channel, 3)
    session.deliver(channel, [live_entry(channel, newer)], live_entry(channel, newer)[2])
    assert hub.direct == [channel]

    hub.fanned = parse_stream_id(newer)[0], parse_stream_id(newer)[1] + 5  # written directly meanwhile
    session.channel_lost(channel)
    assert session.cursors[channel].last == hub.fanned, "a re-sync must start after what the hub wrote"
    assert session.position(channel) == hub.fanned, "no longer direct: the position stays the cursor's own"

    peer.settimeout(5)
    received = b""
    while received.count(b'"type":"message"') < 3:
        received += peer.recv(65536)
    assert [json.loads(m[m.index(b"{") :])["id"] for m in received.split(b"\x81")[1:] if b'"message"' in m] == [
        ids[1],
        ids[2],
        newer,
    ]
