"""The operator page on the real server: who may open it, and who may listen to its channel.

Only an active staff user (the demo's carol) gets the page and a subscription
token for the operator channel, and that token opens the channel to carol's
own connections only. In Chromium: tests/browser/test_operator.py.
"""

from __future__ import annotations

import http.client
import json

import pytest

from offload.testing import WebSocketClient

pytestmark = pytest.mark.timeout(120)

CHANNEL = "offload-operator:workers"


def subscribe(server, session, channel: str, token: str | None = None) -> tuple[WebSocketClient, dict]:
    """A websocket with ``session``'s cookie; its reply to one subscribe."""
    ws = server.ws_client("/ws/", cookie=session.cookie_header() if session else None)
    command = {"type": "subscribe", "channel": channel, "ref": 1}
    if token is not None:
        command["token"] = token
    ws.send_text(json.dumps(command))
    return ws, json.loads(ws.recv())


def get_anonymous(server, path: str) -> http.client.HTTPResponse:
    """A GET without cookies, redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_anonymous_users_are_sent_to_log_in(offload_server):
    response = get_anonymous(offload_server, "/operator/")
    assert response.status == 302
    assert response.getheader("Location") == "/accounts/login/?next=/operator/"
    assert get_anonymous(offload_server, "/operator/token").status == 403


def test_users_who_are_not_staff_are_refused_the_page_the_token_and_the_channel(offload_server):
    alice = offload_server.http()
    alice.login("alice")
    assert alice.request("GET", "/operator/")[0] == 403
    assert alice.request("GET", "/operator/token")[0] == 403

    ws, reply = subscribe(offload_server, alice, CHANNEL)
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply
    ws.close()

    carol = offload_server.http()
    carol.login("carol")
    status, _, body = carol.request("GET", "/operator/token")
    assert status == 200
    token = json.loads(body)["token"]
    for session in (alice, None):  # carol's token on alice's socket, or on an anonymous one
        ws, reply = subscribe(offload_server, session, CHANNEL, token)
        assert reply["type"] == "error" and reply["code"] == "forbidden", reply
        assert "minted for another user" in reply["reason"]
        ws.close()


def test_staff_get_the_page_and_the_workers_figures(offload_server):
    carol = offload_server.http()
    carol.login("carol")
    status, headers, body = carol.request("GET", "/operator/")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert b'id="operator-config"' in body
    token = json.loads(carol.request("GET", "/operator/token")[2])["token"]
    ws, reply = subscribe(offload_server, carol, CHANNEL, token)
    assert reply["type"] == "subscribed", reply
    while (message := json.loads(ws.recv()))["type"] != "message":
        pass
    figures = message["data"]
    assert figures["pid"] in offload_server.worker_pids()
    assert figures["sockets"]["websocket"] >= 1 and figures["redis"]["up"] is True
    assert {"rss", "cpu", "top", "drops", "subscriptions", "channels"} <= set(figures)
    ws.close()
