"""Server pings of sockets that connected together are spread out (gevent, socket pairs)."""

from __future__ import annotations

import time

import gevent
import gevent.socket

from offload.connection import Endpoint, WebSocket
from offload.policies import ANONYMOUS


def test_first_pings_of_sockets_opened_together_are_spread_over_half_an_interval(settings):
    settings.OFFLOAD_PING_INTERVAL = 1.0
    settings.OFFLOAD_PING_TIMEOUT = 5.0
    started = time.monotonic()
    pinged: list[float] = []
    sockets = []
    for _ in range(40):
        ours, peer = gevent.socket.socketpair()
        ours.setblocking(False)
        ws = WebSocket(ours.detach(), ANONYMOUS, {})
        sockets.append((ws, gevent.spawn(ws.run, Endpoint(ws)), peer))

    def first_ping(peer):
        header = peer.recv(2)
        assert header[0] == 0x89, f"expected a ping frame, got {header!r}"
        pinged.append(time.monotonic() - started)

    with gevent.Timeout(5):
        gevent.joinall([gevent.spawn(first_ping, peer) for _, _, peer in sockets], raise_error=True)
    for ws, greenlet, peer in sockets:
        ws.close(1001)
        peer.close()
        greenlet.kill()
    assert min(pinged) >= 0.45 and max(pinged) <= 1.2, pinged
    assert max(pinged) - min(pinged) >= 0.2, f"40 sockets pinged within {max(pinged) - min(pinged):.3f} s"
