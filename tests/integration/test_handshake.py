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
import json
import os
import socket

import pytest

from offload.testing import LiveServer

pytestmark = pytest.mark.timeout(120)


def handshake(port: int, path: str = "/ws/", host: str | None = None, origin: str | None = None) -> tuple[int, dict]:
    """Send one upgrade request; return the status and the response headers."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


@pytest.fixture(scope="module")
def middleware_server(tmp_path_factory):
    env = {"OFFLOAD_WEBSOCKET_MIDDLEWARE": "1", "OFFLOAD_API_MIDDLEWARE": "1"}
    server = LiveServer(tmp_path_factory.mktemp("mw"), env=env).prepare().start()
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
