"""Every limit, against the real uWSGI: per-IP connections, message rate, handshake time."""

from __future__ import annotations

import socket
import time

import pytest
import websocket

from offload.testing import frame, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = DemoServer(
        tmp_path_factory.mktemp("limits-var"),
        env={
            "OFFLOAD_MAX_CONNECTIONS_PER_IP": "5",
            "OFFLOAD_MAX_MESSAGES_PER_SECOND": "20",
            "OFFLOAD_MESSAGE_BURST": "40",
        },
    )
    live.prepare().start()
    yield live
    live.stop()


def test_connections_per_ip_are_capped_across_the_instance(server):
    sockets = [server.websocket("/ws/echo") for _ in range(5)]
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        server.websocket("/ws/echo")
    assert info.value.status_code == 429
    sockets.pop().close()
    # The slot is freed when the server notices the close (429 until then).
    sockets.append(wait_for(lambda: server.websocket("/ws/echo"), 5, "the closed socket's slot to be freed"))
    for ws in sockets:
        ws.close()


def test_event_streams_count_against_the_same_per_ip_cap(server):
    import http.client

    sockets = [server.websocket("/ws/echo") for _ in range(4)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/sse/?channel=public:cap")
    stream = conn.getresponse()
    assert stream.status == 200  # the fifth connection of this IP
    refused = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    refused.request("GET", "/sse/?channel=public:cap")
    response = refused.getresponse()
    assert response.status == 429
    with pytest.raises(websocket.WebSocketBadStatusException):
        server.websocket("/ws/echo")
    conn.close()
    refused.close()
    for ws in sockets:
        ws.close()


def test_message_rate_is_limited_with_a_policy_close(server):
    ws = server.ws_client("/ws/echo", auto_reply=False)
    for n in range(200):  # far above 20/s with a burst of 40
        ws.send_raw(frame(1, b"%d" % n))
    code = ws.recv_close().code
    assert code == 1008
    ws.abort()


def test_a_client_within_the_rate_keeps_its_connection(server):
    ws = server.websocket("/ws/echo")
    for n in range(30):  # within the burst
        ws.send(str(n))
        assert ws.recv() == str(n)
    ws.close()


def test_a_handshake_that_never_completes_is_dropped(server):
    # OFFLOAD_HEADER_TIMEOUT (10 s; offload.watchdog) bounds the whole header read,
    # well before uWSGI's per-read socket-timeout (30 s) would.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=45)
    sock.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    started = time.monotonic()
    assert sock.recv(1024) == b""  # the server closes it
    assert 9.5 < time.monotonic() - started < 14
    sock.close()
    ws = server.websocket("/ws/echo")  # and keeps serving others
    ws.send("ok")
    assert ws.recv() == "ok"
    ws.close()


def test_message_size_limit_closes_with_1009(server):
    ws = server.ws_client("/ws/echo", auto_reply=False)
    ws.send_raw(frame(1, b"x" * (64 * 1024 + 1)))
    assert ws.recv_close().code == 1009
    ws.abort()
