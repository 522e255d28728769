"""Server-Sent Events end to end: real uWSGI from uwsgi.ini, real Redis, streams read off real sockets."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time

import pytest

from offload.testing import LiveServer, RedisServer, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(120)


class SseClient:
    """Reads an event stream the way EventSource parses it, with a timeout per read."""

    def __init__(self, server: LiveServer, path: str, headers: dict | None = None, timeout: float = 10) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.last_id: str | None = None
        self.comments: list[str] = []

    def json(self) -> dict:
        return json.loads(self.response.read())

    def event(self, presence: bool = False) -> dict:
        """The next block of fields (comments are collected apart); ``data`` is parsed JSON.

        ``presence`` events (room channels keep presence) are skipped unless asked for.
        """
        while (fields := self._event()).get("event") == "presence" and not presence:
            pass
        return fields

    def _event(self) -> dict:
        fields: dict = {}
        data: list[str] = []
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the server ended the stream")
            line = line.decode().rstrip("\r\n")
            if not line:
                if fields or data:
                    break
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value
        if data:
            fields["data"] = json.loads("\n".join(data))
        if "id" in fields:
            self.last_id = fields["id"]
        return fields

    def comment(self) -> str:
        """Read up to the next comment line (a keepalive ping); an event before it is an error."""
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the server ended the stream")
            line = line.decode().rstrip("\r\n")
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                return self.comments[-1]
            assert not line, f"an event field before the comment: {line!r}"

    def message(self) -> dict:
        event = self.event()
        assert event["event"] == "message", event
        return event["data"]

    def subscribed(self, count: int = 1) -> dict[str, dict]:
        """Read ``retry`` and one ``subscribed`` event per channel (in any order)."""
        assert self.status == 200, self.response.read()
        assert self.event() == {"retry": "2000"}
        replies = {}
        for _ in range(count):
            event = self.event()
            assert event["event"] == "subscribed", event
            replies[event["data"]["channel"]] = event["data"]
        return replies

    def at_eof(self, timeout: float) -> bool:
        """Does the server end the stream within ``timeout`` (pings are skipped)?"""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.response.readline():
                    return True
        except (TimeoutError, ConnectionResetError):
            pass
        return False

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def numsub(server: LiveServer, channel: str) -> int:
    name = f"offload:c:{{{channel}}}".encode()
    return dict(server.redis().pubsub_numsub(name))[name]


def wait_numsub(server: LiveServer, channel: str, expected: int, timeout: float = 5) -> float:
    """Wait until Redis counts ``expected`` subscribers of ``channel`` (the workers' hubs); the seconds it took."""
    started = time.monotonic()
    wait_for(lambda: numsub(server, channel) == expected, timeout, f"PUBSUB NUMSUB {channel} == {expected}", 0.02)
    return time.monotonic() - started


def test_live_messages_arrive_as_events_with_the_websocket_envelope(offload_server):
    channel = "public:sse-live"
    stream = SseClient(offload_server, f"/sse/?channel={channel}")
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-cache"
    assert stream.headers["X-Accel-Buffering"] == "no"
    reply = stream.subscribed()[channel]
    assert reply == {"type": "subscribed", "channel": channel, "last_id": None, "recovered": True}
    assert stream.last_id == f"{channel}=0-0"  # no history yet: resume would replay all of it
    ids = [offload_server.publish(channel, {"n": n, "text": "héllo\nwörld\u2028"}) for n in range(3)]
    for n, message_id in enumerate(ids):
        event = stream.event()
        assert event == {
            "id": f"{channel}={message_id}",
            "event": "message",
            "data": {
                "type": "message",
                "channel": channel,
                "id": message_id,
                "data": {"n": n, "text": "héllo\nwörld\u2028"},
            },
        }
    stream.close()


def test_without_a_position_the_stream_starts_after_the_newest_message(offload_server):
    channel = "public:sse-fromnow"
    old = offload_server.publish(channel, "old")
    stream = SseClient(offload_server, f"/sse/?channel={channel}")
    assert stream.subscribed()[channel]["last_id"] == old
    assert stream.last_id == f"{channel}={old}"
    new = offload_server.publish(channel, "new")
    assert stream.message()["id"] == new
    stream.close()


def test_keepalive_comments_flow_while_idle(offload_server):
    stream = SseClient(offload_server, "/sse/?channel=public:sse-idle")
    stream.subscribed()
    assert (stream.comment(), stream.comment()) == ("ping", "ping")  # OFFLOAD_PING_INTERVAL is 1 s in the test server
    message_id = offload_server.publish("public:sse-idle", "after the pings")
    assert stream.message()["id"] == message_id
    assert len(stream.comments) >= 2 and set(stream.comments) == {"ping"}
    stream.close()


def test_resume_with_last_event_id_has_no_gap_and_no_duplicate_while_publishing(offload_server):
    channel = "public:sse-resume"
    stream = SseClient(offload_server, f"/sse/?channel={channel}")
    stream.subscribed()
    seen = [offload_server.publish(channel, n) for n in range(3)]
    assert [stream.message()["id"] for _ in seen] == seen
    last_event_id = stream.last_id
    assert last_event_id == f"{channel}={seen[-1]}"
    stream.close()

    missed = [offload_server.publish(channel, n) for n in range(3, 8)]
    published: list[str] = []
    stop = threading.Event()

    def publisher():
        for n in range(60):  # keeps publishing while the stream reconnects
            if stop.is_set():
                break
            published.append(offload_server.publish(channel, n))
            time.sleep(0.005)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        time.sleep(0.05)
        # Last-Event-ID beats the (older) since of the URL, as after a browser reconnect.
        stream = SseClient(offload_server, f"/sse/?channel={channel}&since={seen[0]}", {"Last-Event-ID": last_event_id})
        reply = stream.subscribed()[channel]
        assert reply == {"type": "subscribed", "channel": channel, "last_id": seen[-1], "recovered": True}
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join()
    expected = missed + published
    got = [stream.message()["id"] for _ in expected]
    assert got == expected  # every id once, in order
    assert stream.last_id == f"{channel}={expected[-1]}"
    stream.close()


def test_one_last_event_id_resumes_every_channel_of_the_stream(offload_server):
    a, b = "public:sse-multi-a", "room:sse-multi=b"
    alice = offload_server.http()
    alice.login("alice")
    cookie = {"Cookie": alice.cookie_header()}
    a0, b0 = offload_server.publish(a, "a0"), offload_server.publish(b, "b0")
    stream = SseClient(offload_server, f"/sse/?channel={a}&channel={b}", cookie)
    replies = stream.subscribed(2)
    assert replies[a]["last_id"] == a0 and replies[b]["last_id"] == b0
    assert stream.last_id == f"{a}={a0},{b}={b0}"
    a1, b1, a2 = offload_server.publish(a, "a1"), offload_server.publish(b, "b1"), offload_server.publish(a, "a2")
    ids = []
    for _ in range(3):
        ids.append((stream.message()["id"], stream.last_id))
    assert ids == [(a1, f"{a}={a1},{b}={b0}"), (b1, f"{a}={a1},{b}={b1}"), (a2, f"{a}={a2},{b}={b1}")]
    stream.close()

    b2, a3, b3 = offload_server.publish(b, "b2"), offload_server.publish(a, "a3"), offload_server.publish(b, "b3")
    # A client that cannot set headers passes the cursor in the query string.
    stream = SseClient(offload_server, f"/sse/?channel={a}&channel={b}&last_event_id={ids[-1][1]}", cookie)
    assert stream.event() == {"retry": "2000"}
    # Each channel: its `subscribed`, then its messages (channels may interleave).
    events = [stream.event() for _ in range(5)]
    assert [(e["event"], e["data"].get("id")) for e in events if e["data"]["channel"] == a] == [
        ("subscribed", None),
        ("message", a3),
    ]
    assert [(e["event"], e["data"].get("id")) for e in events if e["data"]["channel"] == b] == [
        ("subscribed", None),
        ("message", b2),
        ("message", b3),
    ]
    replies = {e["data"]["channel"]: e["data"] for e in events if e["event"] == "subscribed"}
    assert replies[a] == {"type": "subscribed", "channel": a, "last_id": a2, "recovered": True}
    assert replies[b] == {"type": "subscribed", "channel": b, "last_id": b1, "recovered": True}
    assert stream.last_id == f"{a}={a3},{b}={b3}"
    stream.close()


def test_a_channel_that_had_no_history_resumes_from_0_0(offload_server):
    channel = "public:sse-empty"
    stream = SseClient(offload_server, f"/sse/?channel={channel}")
    stream.subscribed()
    last_event_id = stream.last_id
    stream.close()
    missed = [offload_server.publish(channel, n) for n in range(2)]
    stream = SseClient(offload_server, f"/sse/?channel={channel}", {"Last-Event-ID": last_event_id})
    # 0-0 asks for all retained history; the server cannot tell whether any was trimmed.
    assert stream.subscribed()[channel] == {
        "type": "subscribed",
        "channel": channel,
        "last_id": "0-0",
        "recovered": False,
    }
    assert [stream.message()["id"] for _ in missed] == missed
    stream.close()


@pytest.mark.parametrize(
    "path, headers, status, code",
    [
        ("/sse/?channel=room:general", {}, 403, "forbidden"),
        ("/sse/?channel=public:sse-refused&channel=room:general", {}, 403, "forbidden"),
        ("/sse/?channel=public:sse-refused&channel=no%20spaces", {}, 400, "invalid_channel"),
        ("/sse/?channel=secret:x", {}, 400, "unknown_namespace"),
        ("/sse/", {}, 400, "bad_message"),
        ("/sse/?channel=public:sse-refused&since=later", {}, 400, "invalid_since"),
        ("/sse/?channel=public:sse-refused", {"Last-Event-ID": "1732-0"}, 400, "invalid_since"),
        ("/sse/?channel=public:sse-refused&last_event_id=public:x=soon", {}, 400, "invalid_since"),
        ("/sse/?" + "&".join(f"channel=public:sse-lim{n}" for n in range(101)), {}, 400, "too_many_subscriptions"),
        ("/sse/?channel=public:sse-refused", {"Origin": "http://evil.example"}, 403, "forbidden"),
        ("/sse/?channel=public:sse-refused", {"Origin": "null"}, 403, "forbidden"),
    ],
)
def test_refusals_are_json_before_any_streaming(offload_server, path, headers, status, code):
    stream = SseClient(offload_server, path, headers)
    assert stream.status == status
    assert stream.headers["Content-Type"] == "application/json"
    body = stream.json()
    assert body["error"] == code and body["reason"]
    stream.close()
    # Nothing was subscribed, not even the allowed channel of a refused stream.
    assert numsub(offload_server, "public:sse-refused") == 0


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "POST"])
def test_only_get_is_allowed(offload_server, method):
    status, _, _ = offload_server.http().request(method, "/sse/?channel=public:sse-refused")
    assert status == (403 if method == "POST" else 405)  # CSRF refuses the POST first


def test_same_site_origins_and_clients_without_origin_are_allowed(offload_server):
    for headers in ({"Origin": "http://localhost:1234"}, {"Origin": offload_server.base_url}, {}):
        stream = SseClient(offload_server, "/sse/?channel=public:sse-origin", headers)
        stream.subscribed()
        stream.close()


def test_user_channel_is_streamed_to_its_user_only(offload_server):
    alice, bob = offload_server.http(), offload_server.http()
    alice.login("alice")
    bob.login("bob")
    _, _, page = alice.request("GET", "/rooms/general/")
    user_channel = re.search(rb'"user_channel": "(user:\d+)"', page).group(1).decode()
    stream = SseClient(offload_server, f"/sse/?channel={user_channel}", {"Cookie": alice.cookie_header()})
    stream.subscribed()
    status, _, _ = alice.post_csrf("/notify")
    assert status == 200
    assert stream.message()["data"]["text"].startswith("Hello alice")
    stream.close()
    for headers in ({"Cookie": bob.cookie_header()}, {}):
        intruder = SseClient(offload_server, f"/sse/?channel={user_channel}", headers)
        assert intruder.status == 403
        assert intruder.json() == {"error": "forbidden", "reason": f"not allowed to subscribe to {user_channel}"}
        intruder.close()


def test_the_stream_ends_and_leaves_the_hub_when_the_client_disconnects(offload_server):
    channel = "public:sse-bye"
    streams = [SseClient(offload_server, f"/sse/?channel={channel}") for _ in range(3)]
    for stream in streams:
        stream.subscribed()
    assert numsub(offload_server, channel) == 1
    closing = offload_server.sockets_of(stream.sock.getsockname()[1] for stream in streams[:2])
    assert len(closing) == 2
    for stream in streams[:2]:
        stream.close()
    # Their streams ended and left the hub (a stream leaves the hub before its socket is closed) ...
    wait_for(lambda: not offload_server.holds_sockets(closing), 5, "the server to close the two streams' sockets")
    assert numsub(offload_server, channel) == 1  # ... and one stream is still open
    message_id = offload_server.publish(channel, "still here")
    assert streams[2].message()["id"] == message_id
    streams[2].close()
    # The socket's EOF wakes the stream at once: no need to wait for a failing ping.
    assert wait_numsub(offload_server, channel, 0) < 1.0


def test_many_idle_streams_are_held_by_one_worker_with_one_redis_subscription(offload_server):
    channel, n = "public:sse-many", 200
    (pid,) = offload_server.worker_pids()
    rss_before = _rss_kib(pid)
    streams = [SseClient(offload_server, f"/sse/?channel={channel}") for _ in range(n)]
    for stream in streams:
        stream.subscribed()
    rss_after = _rss_kib(pid)
    redis = offload_server.redis()
    assert numsub(offload_server, channel) == 1
    assert len(redis.client_list(_type="pubsub")) == 1  # the worker's hub, not one per stream
    assert offload_server.worker_pids() == [pid]
    busy = [core for w in offload_server.stats()["workers"] for core in w["cores"] if core["in_request"]]
    assert len(busy) < 10  # streams leave the uWSGI request after the headers: no core each
    assert all(stream.comment() == "ping" for stream in streams)  # idle: pings only, to every stream
    message_id = offload_server.publish(channel, "to all")
    assert all(stream.message()["id"] == message_id for stream in streams)
    for stream in streams:
        stream.close()
    wait_numsub(offload_server, channel, 0)
    print(f"\n{n} idle SSE streams: worker RSS {rss_before} -> {rss_after} KiB", end=" ")
    log = offload_server.log_text()
    assert "Traceback" not in log and "sse stream failed" not in log


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


# -- faults: a private Redis, so it can be restarted ----------------------------------


@pytest.fixture
def stack(tmp_path, request):
    env = getattr(request, "param", {})
    redis = RedisServer(tmp_path / "redis").start()
    server = DemoServer(tmp_path / "var", env=env, redis_url=redis.url).prepare().start()
    try:
        yield server, redis
    finally:
        server.stop()
        redis.stop()


def test_a_redis_restart_keeps_the_stream_open_and_loses_nothing(stack):
    server, redis = stack
    channel = "public:sse-outage"
    stream = SseClient(server, f"/sse/?channel={channel}")
    stream.subscribed()
    first = server.publish(channel, "before")
    assert stream.message()["id"] == first
    redis.stop()
    time.sleep(0.5)
    redis.start()  # same socket, same append-only file: history survives
    # Published before the hub has resubscribed: only history has it.
    ids = [server.publish(channel, n) for n in range(3)]
    wait_numsub(server, channel, 1, timeout=10)  # the hub is back on the channel
    ids.append(server.publish(channel, "live again"))
    got = []
    while len(got) < len(ids):
        event = stream.event()
        if event["event"] == "message":
            got.append(event["data"]["id"])
    assert got == ids
    assert stream.last_id == f"{channel}={ids[-1]}"
    stream.close()


@pytest.mark.parametrize("stack", [{"OFFLOAD_MAX_QUEUED_BYTES": "1200000"}], indirect=True)
def test_a_client_that_stops_reading_is_dropped_and_leaves_the_hub_at_once(stack):
    server, _ = stack
    channel = "public:sse-slow"
    slow = SseClient(server, f"/sse/?channel={channel}")
    slow.subscribed()
    big = "x" * 60000
    published = []
    started = time.monotonic()
    # Fill the socket buffers until the stream's write blocks and 20 more messages (1.2 MB) queue up.
    while numsub(server, channel) == 1:
        assert time.monotonic() - started < 20, "the slow stream was never dropped"
        published.append(server.publish(channel, big))
    # Well before uWSGI's 30 s socket timeout would have ended the blocked write.
    assert time.monotonic() - started < 10
    # Once the client reads again, it gets what was written, in order, then the end.
    got = []
    with pytest.raises(EOFError):
        while True:
            got.append(slow.message()["id"])
    assert got == published[: len(got)] and len(got) < len(published)
    slow.close()


def test_graceful_reload_ends_streams_quickly(stack):
    server, _ = stack
    streams = [SseClient(server, "/sse/?channel=public:sse-reload") for _ in range(20)]
    for stream in streams:
        stream.subscribed()
    old_pids = server.worker_pids()
    started = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)  # uwsgi --reload
    for stream in streams:
        assert stream.at_eof(10)
    assert time.monotonic() - started < 5, "reload waited for the streams instead of ending them"
    server.wait_for_new_workers(old_pids)
    stream = SseClient(server, "/sse/?channel=public:sse-reload", {"Last-Event-ID": streams[0].last_id})
    stream.subscribed()
    stream.close()
