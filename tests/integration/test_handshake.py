"""The direct paths of offload.wsgi: websocket upgrades and the publish API.

By default offload.wsgi answers a websocket upgrade without running
MIDDLEWARE (like Django Channels), and still checks the Host header, the
Origin and the session user; ``OFFLOAD_WEBSOCKET_MIDDLEWARE=1`` runs the whole
stack. The publish API (bearer key, no session) is called directly too unless
``OFFLOAD_API_MIDDLEWARE=1``. Which path ran is visible in the response
headers that middleware adds (XFrameOptionsMiddleware's ``X-Frame-Options``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time

import pytest

from offload.testing import frame
from offload.testing.waiting import wait_for
from tests.epoll_sets import stale_registrations
from tests.integration.demo import DemoServer
from tests.integration.rawws import handshake, read_head

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def middleware_server(tmp_path_factory):
    env = {"OFFLOAD_WEBSOCKET_MIDDLEWARE": "1", "OFFLOAD_API_MIDDLEWARE": "1"}
    server = DemoServer(tmp_path_factory.mktemp("mw"), env=env).prepare().start()
    yield server
    server.stop()


def test_the_upgrade_skips_the_middleware_stack_by_default(offload_server):
    status, headers = handshake(offload_server.port, origin="http://evil.example")
    assert status == 403
    assert "x-frame-options" not in headers  # no middleware ran
    status, headers = handshake(offload_server.port, origin=f"http://127.0.0.1:{offload_server.port}")
    assert status == 101 and "x-frame-options" not in headers
    # An ordinary page still goes through the stack.
    status, headers, _ = offload_server.http().request("GET", "/accounts/login/")
    assert status == 200 and headers["X-Frame-Options"] == "DENY"


def test_the_middleware_stack_runs_when_asked(middleware_server):
    status, headers = handshake(middleware_server.port, origin="http://evil.example")
    assert status == 403 and headers["x-frame-options"] == "DENY"
    status, _ = handshake(middleware_server.port)
    assert status == 101


@pytest.mark.parametrize("server_fixture", ["offload_server", "middleware_server"])
def test_both_paths_know_the_session_user_and_refuse_anonymous_ones(request, server_fixture):
    server = request.getfixturevalue(server_fixture)
    alice = server.http()
    alice.login("alice")
    ws = server.websocket("/ws/?channel=room:general", cookie=alice.cookie_header())
    assert json.loads(ws.recv())["type"] == "subscribed"
    ws.close()
    anonymous = server.websocket("/ws/?channel=room:general")
    reply = json.loads(anonymous.recv())
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply
    anonymous.close()


def test_a_host_outside_allowed_hosts_is_refused_on_the_direct_path(offload_server):
    status, headers = handshake(offload_server.port, host="evil.example")
    assert status == 400
    assert "x-frame-options" not in headers
    assert "Invalid HTTP_HOST header" in offload_server.log_text()


def test_an_upgrade_to_a_url_that_is_not_a_websocket_view_is_an_ordinary_request(offload_server):
    status, _ = handshake(offload_server.port, path="/no/such/page")
    assert status == 404
    status, headers = handshake(offload_server.port, path="/accounts/login/")
    assert status == 200 and headers["x-frame-options"] == "DENY"


def api_post(server, channel: str, body: str, key: str | None = None, host: str | None = None):
    import http.client

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key or server.api_key}"}
    if host:
        headers["Host"] = host
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", f"/api/publish/{channel}", body, headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_publish_api_skips_the_middleware_stack_by_default(offload_server):
    channel = f"public:direct-api-{os.getpid()}"
    ws = offload_server.websocket(f"/ws/?channel={channel}")
    assert json.loads(ws.recv())["type"] == "subscribed"
    status, headers, body = api_post(offload_server, channel, '{"n": 1}')
    assert status == 200 and "x-frame-options" not in headers  # no middleware ran
    assert headers["x-content-type-options"] == "nosniff"
    assert json.loads(ws.recv())["id"] == json.loads(body)["id"]
    ws.close()
    # Its refusals are the view's own, with the same header.
    status, headers, body = api_post(offload_server, channel, '{"n": 1}', key="wrong")
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert headers["x-content-type-options"] == "nosniff" and headers["www-authenticate"] == "Bearer"
    status, _, body = api_post(offload_server, channel, "{not json")
    assert status == 400 and json.loads(body)["error"] == "bad_json"
    # Other methods still go through Django (require_POST).
    status, headers, _ = offload_server.http().request("GET", f"/api/publish/{channel}")
    assert status == 405 and headers["X-Frame-Options"] == "DENY"


def test_the_direct_publish_api_checks_the_host(offload_server):
    status, headers, body = api_post(offload_server, "public:x", '{"n": 1}', host="evil.example")
    assert status == 400 and json.loads(body)["error"] == "bad_request"
    assert headers["x-content-type-options"] == "nosniff"
    assert "Invalid HTTP_HOST header" in offload_server.log_text()


def test_the_publish_api_runs_the_middleware_stack_when_asked(middleware_server):
    channel = f"public:mw-api-{os.getpid()}"
    status, headers, body = api_post(middleware_server, channel, '{"n": 1}')
    assert status == 200 and json.loads(body)["id"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"


def test_a_refused_body_is_drained_so_the_client_reads_the_refusal(offload_server):
    """413 is answered before the body is read; the direct path then reads the
    rest (up to 1 MiB) instead of closing on unread bytes, whose reset could
    destroy the answer before a client still sending reads it."""
    for _ in range(3):
        status, _, body = api_post(offload_server, "public:x", json.dumps("x" * 1_000_000))
        assert status == 413 and json.loads(body)["error"] == "message_too_large"


# -- RFC 6455 opening handshake: what uWSGI's websocket_handshake() never checked ------------


@pytest.mark.parametrize("version", ["8", "12", "14", "garbage", "13, 8", "", None])
def test_a_version_other_than_13_gets_426_naming_13(offload_server, version):
    status, headers = handshake(offload_server.port, version=version)
    assert status == 426  # was 101, whatever the version (or none)
    assert headers["sec-websocket-version"] == "13"


@pytest.mark.parametrize(
    "key",
    [
        None,  # missing
        "",
        "abc",  # was accepted
        base64.b64encode(os.urandom(15)).decode(),
        base64.b64encode(os.urandom(17)).decode(),
        "!" * 22 + "==",
        "AAAAAAAAAAAAAAAAAAAAAB==",  # stray bits after the 16th byte: not what a client's encoder writes
    ],
)
def test_a_missing_or_malformed_key_gets_400(offload_server, key):
    status, _ = handshake(offload_server.port, key=key)
    assert status == 400


def test_a_handshake_that_is_not_a_get_or_lacks_connection_upgrade_is_refused(offload_server):
    assert handshake(offload_server.port, method="POST")[0] == 405
    assert handshake(offload_server.port, connection="keep-alive")[0] == 400
    assert handshake(offload_server.port, connection="keep-alive, Upgrade")[0] == 101  # Firefox sends this


def test_the_accept_header_answers_the_key(offload_server):
    key = base64.b64encode(os.urandom(16)).decode()
    status, headers = handshake(offload_server.port, key=key)
    expected = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert status == 101 and headers["sec-websocket-accept"] == expected.decode()
    assert "sec-websocket-protocol" not in headers


def echo_works(sock, rest: bytes) -> bool:
    """Send one text frame on an upgraded raw socket and read it back from /ws/echo."""
    sock.sendall(frame(0x1, b"still a websocket"))
    data = rest
    while len(data) < 2 + len(b"still a websocket"):
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    return data[0] == 0x81 and data[2:] == b"still a websocket"


@pytest.mark.parametrize("server_fixture", ["offload_server", "middleware_server"])
def test_offered_subprotocols_are_not_echoed_when_the_server_speaks_none(request, server_fixture):
    """OFFLOAD_SUBPROTOCOLS is empty by default. Given no protocol, uWSGI's
    websocket_handshake() echoed the client's whole list (core/websockets.c);
    RFC 6455 wants no Sec-WebSocket-Protocol header at all when the server
    picks none. The view then sends the 101 through uWSGI's start_response,
    and the socket works."""
    server = request.getfixturevalue(server_fixture)
    status, headers, sock, rest = handshake(
        server.port, path="/ws/echo", protocol="chat, superchat", keep_open=True, origin=server.base_url
    )
    try:
        assert status == 101
        assert "sec-websocket-protocol" not in headers  # was "chat, superchat"
        assert headers["upgrade"].lower() == "websocket"
        assert echo_works(sock, rest)
    finally:
        sock.close()
    assert "Traceback" not in server.log_text()


def test_subprotocols_are_chosen_from_the_servers_list_in_its_order(settings):
    """The choice itself (the live servers speak none: OFFLOAD_SUBPROTOCOLS can
    only be set in the Django settings)."""
    from offload.views import _choose_subprotocol

    assert _choose_subprotocol("chat, v2.offload", ("v2.offload", "v1.offload")) == "v2.offload"
    assert _choose_subprotocol("v1.offload,v2.offload", ("v2.offload", "v1.offload")) == "v2.offload"
    assert _choose_subprotocol(" v1.offload ", ("v2.offload", "v1.offload")) == "v1.offload"
    assert _choose_subprotocol("chat, superchat", ("v2.offload",)) is None
    assert _choose_subprotocol("V2.OFFLOAD", ("v2.offload",)) is None  # tokens compare exactly
    assert _choose_subprotocol("v2.offload", ()) is None  # the default: never a header
    assert _choose_subprotocol(None, ("v2.offload",)) is None
    assert _choose_subprotocol("", ("v2.offload",)) is None


# -- the publish API: bounds on what a client sends ---------------------------------------------


def api_raw(server, head: bytes, body: bytes = b"", timeout: float = 5) -> tuple[int, bytes, float]:
    """Send a raw request; return the status, the response body and the seconds until the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(head + b"\r\n\r\n" + body)
        head_bytes, rest = read_head(sock)
        elapsed = time.monotonic() - started
    return int(head_bytes.split()[1]), rest, elapsed


def api_head(server, content_length: bytes, key: str | None = None) -> bytes:
    return (
        b"POST /api/publish/public:bounds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + (key or server.api_key).encode() + b"\r\nContent-Length: " + content_length
    )


@pytest.mark.parametrize("server_fixture", ["offload_server", "middleware_server"])
def test_a_wrong_key_is_answered_before_the_body_is_sent(request, server_fixture):
    """10 MB announced, none sent: the 401 comes at once. Had anything read the
    body first, the answer would wait for socket-timeout (30 s) and this
    5-second read would time out."""
    server = request.getfixturevalue(server_fixture)
    status, body, elapsed = api_raw(server, api_head(server, b"10485760", key="wrong"))
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert elapsed < 5


@pytest.mark.parametrize("server_fixture", ["offload_server", "middleware_server"])
@pytest.mark.parametrize("length", [b"\xb2", b"\xb3", b"\xb9", b"0x10", b"1e3", b"-1"])
def test_a_content_length_that_is_not_ascii_digits_is_400_without_a_traceback(request, server_fixture, length):
    """'²' (byte B2: Latin-1 in the WSGI environ) passed str.isdigit() and
    int('²') raised: a 500 with a traceback in the log."""
    server = request.getfixturevalue(server_fixture)
    before = len(server.log_text())
    status, body, _ = api_raw(server, api_head(server, length), b"{}")
    assert status == 400, body
    assert json.loads(body)["error"] == "bad_content_length"
    assert "Traceback" not in server.log_text()[before:]


@pytest.mark.parametrize("server_fixture", ["offload_server", "middleware_server"])
def test_a_body_shorter_than_announced_is_400_without_a_traceback(request, server_fixture):
    """The client announces 50 bytes, sends 2 and closes its side: reading the
    body failed with UnreadablePostError, a 500 with a traceback."""
    server = request.getfixturevalue(server_fixture)
    before = len(server.log_text())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(api_head(server, b"50") + b"\r\n\r\n{}")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == 400 and json.loads(body)["error"] == "incomplete_body"
    assert "Traceback" not in server.log_text()[before:]


def _data_segments_received(sock: socket.socket) -> int:
    """``tcpi_data_segs_in`` of Linux's ``struct tcp_info`` (offset 152, Linux 4.6 and later)."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


def test_the_101_and_the_subscribed_reply_arrive_in_one_segment(offload_server):
    """The view corks the socket before the handshake and the socket's first write uncorks it: on a channel
    the worker already follows (a connect storm's case), the client gets the 101 and ``subscribed`` in one
    TCP segment (one transmit, one wake-up), not two."""
    channel = "public:one-segment"
    first = offload_server.websocket(f"/ws/?channel={channel}")  # the hub follows the channel from now on
    try:
        assert json.loads(first.recv())["type"] == "subscribed"
        status, _, sock, data = handshake(
            offload_server.port, path=f"/ws/?channel={channel}", keep_open=True, origin=offload_server.base_url
        )
        try:
            assert status == 101
            while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):  # the first frame, whole (under 126 bytes)
                data += sock.recv(4096)
            assert data[0] == 0x81 and json.loads(data[2 : 2 + data[1]])["type"] == "subscribed"
            assert _data_segments_received(sock) == 1
        finally:
            sock.close()
    finally:
        first.close()


def test_sockets_that_left_their_request_leave_no_stale_registration_in_the_workers_epoll_sets(offload_server):
    """A websocket or an event stream lives on in a duplicate of the fd that uWSGI closes when the request
    ends. A registration of the closed fd left in the event loop's epoll set woke with the client's first
    frame, and libev then rebuilt its set (every open socket): 16.5 ms of worker CPU per connect with 5,000
    sockets open."""
    sockets = [offload_server.websocket("/ws/?channel=public:epoll") for _ in range(10)]
    stream = socket.create_connection(("127.0.0.1", offload_server.port), timeout=10)
    try:
        for ws in sockets:
            assert json.loads(ws.recv())["type"] == "subscribed"
        stream.sendall(
            f"GET /sse/?channel=public:epoll HTTP/1.1\r\nHost: 127.0.0.1:{offload_server.port}\r\n\r\n".encode()
        )
        head, _ = read_head(stream)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        wait_for(
            lambda: not any(c["in_request"] for w in offload_server.stats()["workers"] for c in w["cores"]),
            10,
            "uWSGI to end the requests (and close their fds)",
        )
        for pid in offload_server.worker_pids():
            assert stale_registrations(pid) == set()
        for ws in sockets:  # and the sockets still talk
            ws.send(json.dumps({"type": "ping", "ref": 1}))
            assert json.loads(ws.recv())["type"] == "pong"
    finally:
        stream.close()
        for ws in sockets:
            ws.close()
