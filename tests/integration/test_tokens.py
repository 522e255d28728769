"""Tokens for clients without the session cookie, against the real uWSGI from uwsgi.ini.

The server runs the demo with tests/settings_tokens.py (a ``private`` namespace
whose channels need a subscription token, and views that mint tokens) and the
test process's ``SECRET_KEY``, so tokens minted here verify there too. No
client sends a session cookie.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from django.conf import settings

from offload.testing import HandshakeError, LiveServer, WebSocketClient, wait_for
from offload.tokens import mint_connection_token, mint_subscription_token
from tests.integration.demo import DemoServer
from tests.integration.test_session_end import django_shell
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(120)

SETTINGS = "tests.settings_tokens"


def start_token_server(var_dir) -> DemoServer:
    """The demo under tests/settings_tokens.py, sharing this process's ``SECRET_KEY``."""
    env = {"DJANGO_SETTINGS_MODULE": SETTINGS, "DJANGO_SECRET_KEY": settings.SECRET_KEY}
    live = DemoServer(var_dir, env=env).prepare()
    # uwsgi.ini sets DJANGO_SETTINGS_MODULE itself: a later --env wins.
    return live.start(extra_args=("--env", f"DJANGO_SETTINGS_MODULE={SETTINGS}"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_token_server(tmp_path_factory.mktemp("tokens-var"))
    yield live
    live.stop()


def minted(server: LiveServer, kind: str, **params) -> dict:
    """A token from the server's minting view (``offload.connection_token`` / ``subscription_token``)."""
    query = "&".join(f"{name}={value}" for name, value in params.items())
    status, _, body = server.http().request("GET", f"/test-tokens/{kind}?{query}")
    assert status == 200, body
    return json.loads(body)


def token_for(server: LiveServer, username: str, ttl: float | None = None) -> tuple[str, int]:
    """A connection token for ``username`` and the user's id."""
    reply = minted(server, "connection", username=username, **({"ttl": ttl} if ttl else {}))
    return reply["token"], reply["user_id"]


def expiry(token: str) -> int:
    """The ``exp`` a client reads from the token's payload."""
    encoded = token.partition(".")[0]
    return json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))["exp"]


def ws_client(server: LiveServer, query: str = "", **options) -> WebSocketClient:
    return WebSocketClient(f"{server.ws_url}/ws/{query}", **options)


def recv_json(ws: WebSocketClient, timeout: float = 10) -> dict:
    return json.loads(ws.recv(timeout))


def command(ws: WebSocketClient, **fields) -> dict:
    ws.send_text(json.dumps(fields))
    return recv_json(ws)


# -- connecting with a token ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "sse"])
@pytest.mark.parametrize("carrier", ["query", "bearer"])
def test_a_connection_token_is_the_user_without_a_cookie(server, transport, carrier):
    token, alice_id = token_for(server, "alice")
    channel = f"user:{alice_id}"  # readable by alice only
    query = f"?token={token}" if carrier == "query" else ""
    headers = {"Authorization": f"Bearer {token}"} if carrier == "bearer" else {}
    if transport == "websocket":
        with ws_client(server, query, headers=headers) as ws:
            assert command(ws, type="subscribe", channel=channel)["type"] == "subscribed"
            message_id = server.publish(channel, {"for": "alice"})
            assert recv_json(ws) == {"type": "message", "channel": channel, "id": message_id, "data": {"for": "alice"}}
            _, bob_id = token_for(server, "bob")
            assert command(ws, type="subscribe", channel=f"user:{bob_id}")["code"] == "forbidden"
    else:
        separator = "&" if query else "?"
        stream = SseClient(server, f"/sse/{query}{separator}channel={channel}", headers)
        try:
            assert stream.subscribed()[channel]["type"] == "subscribed"
            message_id = server.publish(channel, {"for": "alice"})
            assert stream.message()["id"] == message_id
        finally:
            stream.close()
        bob = SseClient(server, f"/sse/?channel={channel}&token={token_for(server, 'bob')[0]}")
        assert (bob.status, bob.json()["error"]) == (403, "forbidden")


def refusal(server: LiveServer, transport: str, token: str, extra: str = "") -> tuple[int, dict, dict]:
    """Status, JSON body and headers of a handshake or stream refused for its token."""
    if transport == "websocket":
        with pytest.raises(HandshakeError) as info:
            ws_client(server, f"?token={token}{extra}")
        return info.value.status, json.loads(info.value.body), dict(info.value.headers)
    stream = SseClient(server, f"/sse/?channel=public:a&token={token}{extra}")
    return stream.status, stream.json(), dict(stream.headers)


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_a_bad_or_expired_token_is_refused_with_401_before_the_handshake(server, transport):
    token, alice_id = token_for(server, "alice")
    encoded, _, signature = token.partition(".")
    now = time.time()
    cases = {
        # minted here with the shared key: the signature holds, the expiry does not
        "expired": (mint_connection_token(alice_id, "0" * 16, now=now - 120, ttl=60), "", "token_expired"),
        "tampered": (f"{encoded}.{signature[::-1]}", "", "token_invalid"),
        "not a token": ("hello", "", "token_invalid"),
        "a subscription token": (mint_subscription_token("public:a", now=now, ttl=60), "", "token_invalid"),
        "two tokens": (token, f"&token={token}", "token_invalid"),
        # signed and unexpired, but the user behind it: no such user, another password
        "unknown user": (mint_connection_token(999_999, "0" * 16, now=now, ttl=60), "", "token_invalid"),
        "another password": (mint_connection_token(alice_id, "0" * 16, now=now, ttl=60), "", "token_invalid"),
    }
    for name, (bad, extra, code) in cases.items():
        status, body, headers = refusal(server, transport, bad, extra)
        assert (status, body["error"]) == (401, code), (name, body)
        assert headers.get("WWW-Authenticate", headers.get("www-authenticate")) == 'Bearer error="invalid_token"'
    with ws_client(server, f"?token={token}") as ws:  # the good one still connects
        assert command(ws, type="ping", ref=1) == {"type": "pong", "ref": 1}


@pytest.mark.parametrize("change", ["password", "deactivation"])
def test_a_password_change_or_deactivation_revokes_tokens_and_closes_their_sockets(server, change):
    token, _ = token_for(server, "carol")
    ws = ws_client(server, f"?token={token}")
    assert command(ws, type="ping") == {"type": "pong"}
    try:
        if change == "password":
            django_shell(server, "u = User.objects.get(username='carol'); u.set_password('demo'); u.save()")
        else:
            django_shell(server, "u = User.objects.get(username='carol'); u.is_active = False; u.save()")
        assert ws.recv_close().code == 4001
        status, body, _ = refusal(server, "websocket", token)
        assert (status, body["error"]) == (401, "token_invalid")
        if change == "password":
            fresh, _ = token_for(server, "carol")  # minted after the change: fine
            ws_client(server, f"?token={fresh}").close()
    finally:
        django_shell(server, "User.objects.filter(username='carol').update(is_active=True)")


# -- expiry on a live connection -------------------------------------------------------


def test_the_websocket_is_closed_with_4003_when_its_token_expires(server):
    token, alice_id = token_for(server, "alice", ttl=1)
    with ws_client(server, f"?token={token}&channel=user:{alice_id}") as ws:
        assert recv_json(ws)["type"] == "subscribed"
        close = ws.recv_close(timeout=10)
        assert (close.code, close.reason) == (4003, "token expired")
        assert time.time() >= expiry(token) - 0.05, "closed before the token expired"


def test_a_refresh_keeps_the_websocket_open_past_the_first_expiry(server):
    token, alice_id = token_for(server, "alice", ttl=2)
    channel = f"user:{alice_id}"
    with ws_client(server, f"?token={token}&channel={channel}") as ws:
        assert recv_json(ws)["type"] == "subscribed"
        bob_token, _ = token_for(server, "bob")
        refused = command(ws, type="refresh", token=bob_token, ref="b")
        assert (refused["type"], refused["code"], refused["ref"]) == ("error", "forbidden", "b")
        assert command(ws, type="refresh", token="garbage", ref="g")["code"] == "token_invalid"
        fresh, _ = token_for(server, "alice", ttl=4)
        assert command(ws, type="refresh", token=fresh, ref="r") == {
            "type": "refreshed",
            "ref": "r",
            "expires": expiry(fresh),
        }
        wait_for(lambda: time.time() > expiry(token) + 0.5, 5, "the first token to expire")
        message_id = server.publish(channel, "still here")
        assert recv_json(ws)["id"] == message_id, "the refreshed socket stays open"
        assert ws.recv_close(timeout=10).code == 4003, "until the refreshed token expires"
        assert time.time() >= expiry(fresh) - 0.05


def test_a_cookie_connection_cannot_take_a_token_by_refresh(server, alice):
    token, _ = token_for(server, "alice")
    with ws_client(server, cookie=alice.cookie_header()) as ws:
        assert command(ws, type="refresh", token=token)["code"] == "forbidden"
    with ws_client(server) as anonymous:
        assert command(anonymous, type="refresh", token=token)["code"] == "forbidden"


def test_the_event_stream_ends_at_expiry_and_resumes_with_a_fresh_token(server):
    token, alice_id = token_for(server, "alice", ttl=1)
    channel = f"user:{alice_id}"
    stream = SseClient(server, f"/sse/?channel={channel}&token={token}")
    try:
        stream.subscribed()
        first = server.publish(channel, 1)
        assert stream.message()["id"] == first
        event = stream.event()
        assert event["event"] == "error" and event["data"]["code"] == "token_expired"
        assert stream.at_eof(5)
    finally:
        stream.close()
    missed = server.publish(channel, 2)  # while the client fetches a new token (offload.js)
    fresh, _ = token_for(server, "alice")
    resumed = SseClient(server, f"/sse/?channel={channel}&token={fresh}&last_event_id={stream.last_id}")
    try:
        assert resumed.subscribed()[channel]["recovered"] is True
        assert resumed.message()["id"] == missed
    finally:
        resumed.close()


# -- subscription tokens ---------------------------------------------------------------


def test_a_private_channel_needs_a_subscription_token_for_it(server):
    channel = "private:doc-1"
    valid = minted(server, "subscription", channel=channel)["token"]
    _, alice_id = token_for(server, "alice")
    now = time.time()
    with ws_client(server) as ws:  # anonymous: the token alone decides
        assert command(ws, type="subscribe", channel=channel, ref=1)["code"] == "forbidden"
        for bad, code in (
            (mint_subscription_token(channel, now=now - 120, ttl=60), "token_expired"),
            (mint_subscription_token("private:doc-2", now=now, ttl=60), "forbidden"),
            (mint_subscription_token(channel, alice_id, now=now, ttl=60), "forbidden"),  # alice's, not ours
            (valid[:-2] + "xx", "token_invalid"),
            (token_for(server, "alice")[0], "token_invalid"),  # a connection token
        ):
            reply = command(ws, type="subscribe", channel=channel, token=bad, ref=2)
            assert (reply["type"], reply["code"], reply["channel"]) == ("error", code, channel), bad
        reply = command(ws, type="subscribe", channel=channel, token=valid, ref=3)
        assert (reply["type"], reply["ref"]) == ("subscribed", 3)
        message_id = server.publish(channel, {"page": 1})
        assert recv_json(ws)["id"] == message_id


def test_a_subscription_token_for_a_user_works_on_that_users_token_connection(server):
    channel = "private:alice-notes"
    token, _ = token_for(server, "alice")
    for_alice = minted(server, "subscription", channel=channel, username="alice")["token"]
    with ws_client(server, f"?token={token}") as ws:
        assert command(ws, type="subscribe", channel=channel, token=for_alice)["type"] == "subscribed"
    bob_token, _ = token_for(server, "bob")
    with ws_client(server, f"?token={bob_token}") as ws:
        assert command(ws, type="subscribe", channel=channel, token=for_alice)["code"] == "forbidden"


def test_a_live_subscription_outlasts_its_subscription_token(server):
    channel = "private:short"
    token = minted(server, "subscription", channel=channel, ttl=1)["token"]
    with ws_client(server) as ws:
        assert command(ws, type="subscribe", channel=channel, token=token)["type"] == "subscribed"
        wait_for(lambda: time.time() > expiry(token) + 0.2, 5, "the subscription token to expire")
        message_id = server.publish(channel, "after the expiry")
        assert recv_json(ws)["id"] == message_id
        assert command(ws, type="subscribe", channel=channel, token=token)["code"] == "token_expired"


def test_url_subscriptions_carry_their_token_as_sub_token(server):
    a = minted(server, "subscription", channel="private:url-a")["token"]
    b = minted(server, "subscription", channel="private:url-b")["token"]
    with ws_client(server, f"?sub_token={a}&channel=private:url-b&sub_token={b}&sub_token=nonsense") as ws:
        replies = [recv_json(ws) for _ in range(3)]
        assert {
            "type": "error",
            "code": "token_invalid",
            "reason": "a sub_token= is not a subscription token",
        } in replies
        assert {reply.get("channel") for reply in replies if reply["type"] == "subscribed"} == {
            "private:url-a",
            "private:url-b",
        }
    stream = SseClient(server, f"/sse/?sub_token={a}&channel=public:x")
    try:
        assert set(stream.subscribed(2)) == {"private:url-a", "public:x"}
    finally:
        stream.close()
    expired = mint_subscription_token("private:url-a", now=time.time() - 120, ttl=60)
    for query, status, code in (
        ("channel=private:url-a", 403, "forbidden"),
        (f"sub_token={expired}", 403, "token_expired"),
        ("sub_token=nonsense", 403, "token_invalid"),
    ):
        refused = SseClient(server, f"/sse/?{query}")
        assert (refused.status, refused.json()["error"]) == (status, code), query


# -- the request log ---------------------------------------------------------------------


def test_tokens_never_reach_the_request_log(server):
    token, alice_id = token_for(server, "alice")
    sub = minted(server, "subscription", channel="private:logged")["token"]
    start = len(server.log_text())
    with ws_client(server, f"?channel=user:{alice_id}&token={token}&sub_token={sub}") as ws:
        assert recv_json(ws)["type"] == "subscribed"
    with ws_client(server, f"?%74oken={token}") as ws:  # the key percent-encoded: Django decodes it
        assert command(ws, type="ping") == {"type": "pong"}
    stream = SseClient(server, f"/sse/?sub_token={sub}&token={token}")
    stream.subscribed()
    stream.close()
    expired = mint_connection_token(alice_id, "0" * 16, now=time.time() - 120, ttl=60)
    assert refusal(server, "sse", expired)[0] == 401

    def logged() -> str | None:
        log = server.log_text()[start:]
        return log if log.count("GET /ws/?[hidden]") == 2 and log.count("GET /sse/?[hidden]") == 2 else None

    log = wait_for(logged, 10, "the request log lines of two websockets, a stream and a refusal")
    for secret in (token, sub, expired, token.partition(".")[2], sub.partition(".")[2]):
        assert secret not in log
    assert re.search(r"GET /sse/\?\[hidden\] => .* \(HTTP/1\.1 401\)", log), "the refusal is logged, without its token"
    server.http().request("GET", "/healthz?probe=1")  # a query without a token is logged as it is
    wait_for(
        lambda: "GET /healthz?probe=1 =>" in server.log_text()[start:], 10, "the query of a request without a token"
    )
