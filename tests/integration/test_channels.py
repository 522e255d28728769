"""The channels endpoint end to end: real uWSGI from uwsgi.ini, real Redis, real sockets."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import websocket

from offload.testing import wait_for

pytestmark = pytest.mark.timeout(120)


def recv(ws) -> dict:
    """The next message, presence events skipped (room channels keep presence: joins and leaves come any time)."""
    while (message := json.loads(ws.recv()))["type"] == "presence":
        pass
    return message


def send(ws, **command) -> None:
    ws.send(json.dumps(command))


def subscribe(ws, channel: str, **extra) -> dict:
    send(ws, type="subscribe", channel=channel, **extra)
    reply = recv(ws)
    assert reply["type"] == "subscribed", reply
    assert reply["channel"] == channel
    return reply


def test_subscribe_then_receive_messages_published_through_the_http_api(offload_server):
    ws = offload_server.websocket("/ws/?channel=public:api")
    reply = recv(ws)
    assert reply == {"type": "subscribed", "channel": "public:api", "last_id": reply["last_id"], "recovered": True}
    ids = [offload_server.publish("public:api", {"n": n, "text": "héllo"}) for n in range(3)]
    got = [recv(ws) for _ in ids]
    assert got == [
        {"type": "message", "channel": "public:api", "id": i, "data": {"n": n, "text": "héllo"}}
        for n, i in enumerate(ids)
    ]
    ws.close()


def test_chat_message_posted_to_the_django_view_reaches_the_room(offload_server):
    alice, bob = offload_server.http(), offload_server.http()
    alice.login("alice")
    bob.login("bob")
    ws = offload_server.websocket("/ws/", cookie=bob.cookie_header())
    subscribe(ws, "room:general")
    status, _, body = alice.post_csrf("/rooms/general/messages", {"text": "hi bob"})
    assert status == 200, body
    message = recv(ws)
    assert message["id"] == json.loads(body)["id"]
    assert message["data"]["user"] == "alice" and message["data"]["text"] == "hi bob"
    # The view is CSRF-protected.
    status, _, _ = alice.request("POST", "/rooms/general/messages", {"text": "forged"})
    assert status == 403
    ws.close()


def test_personal_channel_is_pushed_to_and_closed_to_others(offload_server):
    alice, bob = offload_server.http(), offload_server.http()
    alice.login("alice")
    bob.login("bob")
    status, _, body = alice.request("GET", "/rooms/general/")
    user_channel = re.search(rb'"user_channel": "(user:\d+)"', body).group(1).decode()
    ws = offload_server.websocket("/ws/", cookie=alice.cookie_header())
    subscribe(ws, user_channel)
    status, _, body = alice.post_csrf("/notify")
    assert status == 200
    assert recv(ws)["data"]["text"].startswith("Hello alice")
    intruder = offload_server.websocket("/ws/", cookie=bob.cookie_header())
    send(intruder, type="subscribe", channel=user_channel, ref="r1")
    assert recv(intruder) == {
        "type": "error",
        "code": "forbidden",
        "reason": f"not allowed to subscribe to {user_channel}",
        "ref": "r1",
        "channel": user_channel,
    }
    anonymous = offload_server.websocket("/ws/")
    send(anonymous, type="subscribe", channel="room:general")
    assert recv(anonymous)["code"] == "forbidden"
    for w in (ws, intruder, anonymous):
        w.close()


def test_resume_with_since_has_no_gap_and_no_duplicate_while_publishing(offload_server):
    channel = "public:resume"
    before = [offload_server.publish(channel, n) for n in range(10)]
    published: list[str] = []
    stop = threading.Event()

    def publisher():
        # Bounded so that before[3] stays within the namespace's 100-message history.
        for n in range(80):
            if stop.is_set():
                break
            published.append(offload_server.publish(channel, n))
            time.sleep(0.005)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        sockets = []
        for _ in range(5):  # subscribe while messages keep arriving
            ws = offload_server.websocket("/ws/")
            reply = subscribe(ws, channel, since=before[3])
            assert reply["recovered"] is True and reply["last_id"] == before[3]
            sockets.append(ws)
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    expected = before[4:] + published
    for ws in sockets:
        got = []
        while len(got) < len(expected):
            message = recv(ws)
            assert message["type"] == "message"
            got.append(message["id"])
        assert got == expected  # every id once, in order
        ws.close()


def test_subscribe_without_since_starts_after_the_reported_last_id(offload_server):
    channel = "public:fromnow"
    old = offload_server.publish(channel, "old")
    ws = offload_server.websocket("/ws/")
    reply = subscribe(ws, channel)
    assert reply["last_id"] == old
    new = offload_server.publish(channel, "new")
    assert recv(ws)["id"] == new
    ws.close()


def test_resume_from_an_id_that_fell_out_of_history_says_so(offload_server):
    channel = "public:trimmed"
    first = offload_server.publish(channel, 0)
    for n in range(1, 102):  # the public namespace keeps 100
        offload_server.publish(channel, n)
    ws = offload_server.websocket("/ws/")
    reply = subscribe(ws, channel, since=first)
    assert reply["recovered"] is False
    got = [recv(ws)["data"] for _ in range(100)]
    assert got == list(range(2, 102))
    ws.close()


@pytest.mark.parametrize(
    "raw, code",
    [
        ("{not json", "bad_json"),
        ('{"type":"fly"}', "unknown_type"),
        ('["subscribe"]', "bad_message"),
        ('{"type":"subscribe","channel":"no spaces"}', "invalid_channel"),
        ('{"type":"subscribe","channel":"secret:x"}', "unknown_namespace"),
        ('{"type":"subscribe","channel":"public:x","since":"later"}', "invalid_since"),
        ('{"type":"publish","channel":"public:x","data":1}', "publish_forbidden"),
    ],
)
def test_bad_commands_get_an_error_and_the_socket_keeps_working(offload_server, raw, code):
    ws = offload_server.websocket("/ws/")
    ws.send(raw)
    reply = recv(ws)
    assert reply["type"] == "error" and reply["code"] == code and reply["reason"]
    send(ws, type="ping", ref=9)
    assert recv(ws) == {"type": "pong", "ref": 9}
    ws.close()


def test_binary_on_the_channels_endpoint_is_refused_with_an_error(offload_server):
    ws = offload_server.websocket("/ws/")
    ws.send_binary(b"\x01\x02")
    assert recv(ws)["code"] == "binary_unsupported"
    ws.close()


def test_staff_may_publish_from_the_socket_and_others_may_not(offload_server):
    carol, alice = offload_server.http(), offload_server.http()
    carol.login("carol")
    alice.login("alice")
    ws = offload_server.websocket("/ws/", cookie=carol.cookie_header())
    subscribe(ws, "staff:ops")
    send(ws, type="publish", channel="staff:ops", data={"deploy": True}, ref=1)
    replies = [recv(ws), recv(ws)]
    published = next(r for r in replies if r["type"] == "published")
    message = next(r for r in replies if r["type"] == "message")
    assert published["ref"] == 1 and message["id"] == published["id"] and message["data"] == {"deploy": True}
    other = offload_server.websocket("/ws/", cookie=alice.cookie_header())
    send(other, type="publish", channel="staff:ops", data=1)
    assert recv(other)["code"] == "publish_forbidden"
    ws.close()
    other.close()


def test_subscription_limit(offload_server):
    # 100 (OFFLOAD_MAX_SUBSCRIPTIONS default) at connect time: query channels are
    # not messages, so the message-rate limit plays no part here.
    query = "&".join(f"channel=public:lim{n}" for n in range(100))
    ws = offload_server.websocket(f"/ws/?{query}")
    replies = [recv(ws) for _ in range(100)]
    assert all(r["type"] == "subscribed" for r in replies)
    send(ws, type="subscribe", channel="public:onetoomany")
    assert recv(ws)["code"] == "too_many_subscriptions"
    ws.close()


def test_cross_site_origin_is_refused_before_the_handshake(offload_server):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        offload_server.websocket("/ws/", origin="http://evil.example")
    assert info.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException):
        offload_server.websocket("/ws/", origin="null")
    # Same site (ALLOWED_HOSTS) and non-browser clients without Origin are fine.
    offload_server.websocket("/ws/", origin="http://localhost:1234").close()
    offload_server.websocket("/ws/", origin="").close()


def test_plain_get_on_the_websocket_endpoint_says_upgrade_required(offload_server):
    status, headers, _ = offload_server.http().request("GET", "/ws/")
    assert status == 426 and headers["Upgrade"] == "websocket"


def test_many_sockets_in_one_worker_share_one_redis_subscription(offload_server):
    n = 300
    sockets = [offload_server.websocket("/ws/?channel=public:many") for _ in range(n)]
    for ws in sockets:
        assert recv(ws)["type"] == "subscribed"
    redis = offload_server.redis()
    assert dict(redis.pubsub_numsub("offload:c:{public:many}"))[b"offload:c:{public:many}"] == 1
    # One pub/sub connection for the whole worker (the hub), not one per socket.
    assert len(redis.client_list(_type="pubsub")) == 1
    assert len(offload_server.worker_pids()) == 1
    # Open sockets left their uWSGI requests after the handshake: they hold no async core.
    busy = [core for w in offload_server.stats()["workers"] for core in w["cores"] if core["in_request"]]
    assert len(busy) < 10
    message_id = offload_server.publish("public:many", "to all")
    assert all(recv(ws)["id"] == message_id for ws in sockets)
    for ws in sockets:
        ws.close()
    # When the last local socket leaves, the hub unsubscribes in Redis.
    wait_for(
        lambda: dict(redis.pubsub_numsub("offload:c:{public:many}"))[b"offload:c:{public:many}"] == 0,
        10,
        "the hub to unsubscribe",
    )


def test_database_connections_are_released_and_django_finishes_upgraded_requests(offload_server):
    alice = offload_server.http()
    alice.login("alice")
    sockets = [offload_server.websocket("/ws/?channel=room:general", cookie=alice.cookie_header()) for _ in range(20)]
    for ws in sockets:
        assert recv(ws)["type"] == "subscribed"
    (pid,) = offload_server.worker_pids()
    import os

    db_fds = [fd for fd in os.listdir(f"/proc/{pid}/fd") if "db.sqlite3" in _readlink(f"/proc/{pid}/fd/{fd}")]
    # 20 authenticated sockets hold no database connection each (at most the pool's few).
    assert len(db_fds) <= 4, db_fds
    closing = offload_server.sockets_of(ws.sock.getsockname()[1] for ws in sockets)
    assert len(closing) == len(sockets)
    for ws in sockets:
        ws.close()
    # The server is done with them: each socket's end ran, up to closing it.
    wait_for(lambda: not offload_server.holds_sockets(closing), 10, "the server to close the 20 sockets")
    log = offload_server.log_text()
    assert "headers already sent" not in log
    assert "Traceback" not in log


def _readlink(path: str) -> str:
    import os

    try:
        return os.readlink(path)
    except OSError:
        return ""


@pytest.mark.parametrize(
    "method, channel, body, headers, status, code",
    [
        ("POST", "public:x", "1", {}, 401, "unauthorized"),
        ("POST", "public:x", "1", {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ("POST", "public:x", "1", {"Authorization": "Basic dGVzdA=="}, 401, "unauthorized"),
        ("POST", "public:x", "{oops", None, 400, "bad_json"),
        ("POST", "public:x", "", None, 400, "bad_json"),
        ("POST", "bad%20name", "1", None, 400, "invalid_channel"),
        ("POST", "secret:x", "1", None, 400, "unknown_namespace"),
        ("POST", "public:x", json.dumps("x" * 70000), None, 413, "message_too_large"),
        ("GET", "public:x", None, None, 405, None),
    ],
)
def test_http_publish_api_refuses_bad_requests_clearly(offload_server, method, channel, body, headers, status, code):
    if headers is None:
        headers = {"Authorization": f"Bearer {offload_server.api_key}"}
    got, _, payload = offload_server.http().request(
        method, f"/api/publish/{channel}", body, headers={**headers, "Content-Type": "application/json"}
    )
    assert got == status, payload
    if code:
        assert json.loads(payload)["error"] == code
    assert offload_server.redis().keys("offload:h:{public:x}") == []


def test_http_publish_api_is_disabled_without_a_key(tmp_path):
    from tests.integration.demo import DemoServer

    server = DemoServer(tmp_path, env={"OFFLOAD_API_KEY": ""}).prepare().start()
    try:
        status, _, body = server.http().request(
            "POST", "/api/publish/public:x", "1", headers={"Authorization": "Bearer "}
        )
        assert status == 403 and json.loads(body)["error"] == "api_disabled"
    finally:
        server.stop()


def test_the_accept_backlog_is_applied(offload_server):
    # A placeholder in `listen` silently gives 0; UWSGI_LISTEN (set by make and LiveServer) works.
    assert "your server socket listen backlog is limited to 1024 connections" in offload_server.log_text()
