"""The demo chat on the real server: messages published over the websocket go through
the room's publish hook into the database and come back with the page; the
"typing…" RPC; the HTTP view saves and publishes both or neither.

Real uWSGI from uwsgi.ini, a real redis-server (external, so that one test can
stop it), the demo's SQLite database read with sqlite3.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3

import pytest

from offload.testing import RedisServer, wait_for
from tests.integration.demo import serve_demo
from tests.integration.test_channels import recv, send

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("chat-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis):
    yield from serve_demo(tmp_path_factory, "chat-var", redis_url=redis.url)


@pytest.fixture(scope="module")
def bob(server):
    session = server.http()
    session.login("bob")
    return session


def connect(server, session, *channels: str):
    """A websocket of ``session``'s user (or anonymous), subscribed to ``channels``."""
    ws = server.websocket("/ws/", cookie=session.cookie_header() if session else None)
    for channel in channels:
        send(ws, type="subscribe", channel=channel)
        assert recv(ws)["type"] == "subscribed"
    return ws


def saved_rows(server) -> list[tuple[str, str, str]]:
    """Every saved chat message as ``(room, username, text)``, oldest first."""
    db = sqlite3.connect(f"file:{server.var_dir / 'db.sqlite3'}?mode=ro", uri=True)
    try:
        query = "SELECT room, username, text FROM app_chatmessage JOIN auth_user ON auth_user.id = user_id"
        return db.execute(query + " ORDER BY app_chatmessage.id").fetchall()
    finally:
        db.close()


def page_config(session, room: str = "general") -> tuple[str, dict]:
    status, _, body = session.request("GET", f"/rooms/{room}/")
    assert status == 200
    page = body.decode()
    config = re.search(r'<script id="offload-config" type="application/json">(.*?)</script>', page, re.S).group(1)
    return page, json.loads(config)


def history_ids(server, channel: str) -> list[str]:
    return [mid.decode() for mid, _ in server.redis().xrange(f"offload:h:{{{channel}}}")]


def test_a_message_published_over_the_websocket_is_saved_by_the_hook_and_rendered_with_the_page(server, alice, bob):
    listener = connect(server, bob, "room:general")
    sender = connect(server, alice)
    # The author comes from the connection, never from the data.
    send(
        sender,
        type="publish",
        channel="room:general",
        data={"text": "  saved <b>by</b> the hook  ", "user": "bob"},
        ref="p1",
    )
    published = recv(sender)
    assert published == {"type": "published", "ref": "p1", "channel": "room:general", "id": published["id"]}
    message = recv(listener)
    assert message["id"] == published["id"]
    data = message["data"]
    assert data == {"pk": data["pk"], "user": "alice", "text": "saved <b>by</b> the hook", "sent_at": data["sent_at"]}
    assert saved_rows(server)[-1] == ("general", "alice", "saved <b>by</b> the hook")

    # bob reloads: the message is in the HTML, escaped, once, and the live channel resumes after it.
    page, config = page_config(bob)
    assert page.count(f'data-pk="{data["pk"]}"') == 1
    assert html.escape("saved <b>by</b> the hook") in page and "saved <b>by" not in page
    assert config["room_since"] == published["id"]
    for ws in (listener, sender):
        ws.close()


def test_the_page_resumes_the_channel_from_its_newest_id_and_renders_the_newest_saved_messages_in_order(
    server, alice, bob
):
    texts = [f"order {n}" for n in range(55)]
    for text in texts:  # over HTTP: a socket's hooked publishes are rate-limited (OFFLOAD_RPC_CALLS_PER_SECOND)
        assert alice.post_csrf("/rooms/random/messages", {"text": text})[0] == 200
    system = server.publish("room:random", {"user": "system", "text": "not saved"})  # from the server: no hook
    page, config = page_config(bob, "random")
    assert config["room_since"] == system and "not saved" not in page
    rendered = re.findall(r'<span class="text">(order \d+)</span>', page)
    assert rendered == texts[-50:]  # the newest RECENT_MESSAGES, oldest first


@pytest.mark.parametrize(
    "channel, data, code",
    [
        ("room:general", {"text": ""}, "empty"),
        ("room:general", {"text": " \n\t "}, "empty"),
        ("room:general", {"text": "x" * 2001}, "too_long"),
        ("room:general", {"text": "a\x00b"}, "invalid_text"),
        ("room:general", {"text": "bell\x07"}, "invalid_text"),
        ("room:general", {"text": 5}, "bad_message"),
        ("room:general", "just a string", "bad_message"),
        ("room:general", {"words": "hi"}, "bad_message"),
        ("room:nosuchroom", {"text": "hi"}, "unknown_room"),
    ],
)
def test_the_hook_refuses_what_it_cannot_save_and_nothing_is_published_or_saved(server, alice, channel, data, code):
    ws = connect(server, alice)
    rows, ids = saved_rows(server), history_ids(server, channel)
    send(ws, type="publish", channel=channel, data=data, ref="bad")
    reply = recv(ws)
    assert reply["type"] == "error" and reply["ref"] == "bad" and reply["code"] == code, reply
    assert reply["reason"] and "Traceback" not in reply["reason"]
    send(ws, type="ping", ref="after")  # the connection goes on
    assert recv(ws) == {"type": "pong", "ref": "after"}
    assert saved_rows(server) == rows
    assert history_ids(server, channel) == ids
    ws.close()


def test_an_anonymous_socket_may_not_publish_in_a_room(server):
    ws = connect(server, None)
    rows = saved_rows(server)
    send(ws, type="publish", channel="room:general", data={"text": "hi"}, ref="a")
    assert recv(ws)["code"] == "publish_forbidden"
    assert saved_rows(server) == rows
    ws.close()


def test_typing_is_an_rpc_that_stamps_the_username_on_a_short_lived_channel(server, alice, bob):
    listener = connect(server, bob, "typing:general")
    caller = connect(server, alice)
    for ref in ("t1", "t2"):
        send(caller, type="rpc", method="typing", data={"room": "general", "user": "bob"}, ref=ref)
        assert recv(caller) == {"type": "reply", "ref": ref, "data": None}
        message = recv(listener)
        assert message["channel"] == "typing:general" and message["data"] == {"user": "alice"}
    assert len(history_ids(server, "typing:general")) == 1  # history_size 1
    assert 0 < server.redis().ttl("offload:h:{typing:general}") <= 10
    # Clients cannot publish there themselves: only the RPC can.
    send(caller, type="publish", channel="typing:general", data={"user": "carol"}, ref="forged")
    assert recv(caller)["code"] == "publish_forbidden"
    for bad, code in (
        (None, "unknown_room"),
        ({"room": "nosuchroom"}, "unknown_room"),
        ({"room": ["general"]}, "unknown_room"),
    ):
        send(caller, type="rpc", method="typing", data=bad, ref="x")
        reply = recv(caller)
        assert (reply["type"], reply["code"]) == ("error", code), reply
    for ws in (listener, caller):
        ws.close()


def test_typing_needs_a_login(server):
    ws = connect(server, None)
    send(ws, type="rpc", method="typing", data={"room": "general"}, ref="anon")
    reply = recv(ws)
    assert (reply["type"], reply["ref"], reply["code"]) == ("error", "anon", "forbidden")
    send(ws, type="subscribe", channel="typing:general", ref="s")
    assert recv(ws)["code"] == "forbidden"
    ws.close()


def test_the_http_view_saves_and_publishes_the_same_message(server, alice, bob):
    listener = connect(server, bob, "room:offtopic")
    status, _, body = alice.post_csrf("/rooms/offtopic/messages", {"text": "over HTTP"})
    assert status == 200, body
    message = recv(listener)
    assert message["id"] == json.loads(body)["id"]
    assert message["data"]["user"] == "alice" and message["data"]["text"] == "over HTTP"
    assert saved_rows(server)[-1] == ("offtopic", "alice", "over HTTP")
    page, _ = page_config(bob, "offtopic")
    assert f'data-pk="{message["data"]["pk"]}"' in page
    listener.close()


def test_with_redis_down_the_http_view_saves_nothing_and_answers_503(server, redis, alice):
    """The view publishes inside its transaction (on_commit=False): not published, not saved."""
    rows = saved_rows(server)
    redis.stop()
    try:
        status, _, body = alice.post_csrf("/rooms/general/messages", {"text": "lost with redis"})
        assert status == 503 and json.loads(body)["error"] == "unavailable"
        assert saved_rows(server) == rows
        # The page still renders (from the database), subscribing from the start of history.
        _, config = page_config(alice)
        assert config["room_since"] == "0-0"
    finally:
        redis.start()
    wait_for(
        lambda: alice.post_csrf("/rooms/general/messages", {"text": "back"})[0] == 200,
        20,
        "a post after Redis came back",
    )
    assert saved_rows(server)[-1] == ("general", "alice", "back")
