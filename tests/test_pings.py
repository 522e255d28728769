"""Server pings of sockets that connected together are spread out (clock injected, no waiting)."""

from __future__ import annotations

import socket

from offload.policies import ANONYMOUS
from offload.transports.connection import WebSocket


def test_first_pings_of_sockets_opened_together_are_spread_over_half_an_interval(settings):
    settings.OFFLOAD_PING_INTERVAL = 20.0
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        sockets = [WebSocket(ours.fileno(), ANONYMOUS, {}, clock=lambda: 100.0) for ours, _ in pairs]
        first_pings = [ws.protocol.next_deadline(None) - 100.0 for ws in sockets]
    finally:
        for ours, peer in pairs:
            ours.close()
            peer.close()
    assert min(first_pings) >= 10.0 and max(first_pings) <= 20.0, first_pings
    assert max(first_pings) - min(first_pings) >= 4.0, f"40 sockets would ping within {first_pings}"
