"""Server-side handlers end to end: RPC methods, publish hooks and lifecycle signals on the real uWSGI.

The server runs the demo with a test-only app (tests/settings.py,
tests/testapp/): its RPC methods, publish hooks and signal receivers write
what they see to Redis or to the database, and the tests read it back.
Limits there: 4 handler threads, a 2 s timeout, 3 calls in flight, a burst of
12 calls refilled at 2 per second.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from offload.testing import LiveServer, WebSocketClient, timeout_factor, wait_for
from tests.integration.demo import DemoServer
from tests.integration.test_sse import SseClient
from tests.testapp.receivers import BLOCK, EVENTS

pytestmark = pytest.mark.timeout(120)

SETTINGS = "tests.settings"
TIMEOUT = 2.0  # OFFLOAD_RPC_TIMEOUT there
IN_FLIGHT = 3
THREADS = 4
BURST = 12


def start_handlers_server(var_dir: Path) -> DemoServer:
    """The demo with the test app (tests/settings.py), started."""
    env = {"DJANGO_SETTINGS_MODULE": SETTINGS, "OFFLOAD_PING_INTERVAL": "1", "OFFLOAD_PING_TIMEOUT": "2"}
    server = DemoServer(var_dir, env=env).prepare()
    # uwsgi.ini names the demo's settings itself (`env =`): a later --env wins.
    return server.start(extra_args=("--env", f"DJANGO_SETTINGS_MODULE={SETTINGS}"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_handlers_server(tmp_path_factory.mktemp("handlers"))
    try:
        yield server
    finally:
        server.stop()


class Client:
    """A websocket speaking the channels protocol, matching answers to commands by ``ref``."""

    def __init__(self, server: LiveServer, *, user: str | None = None) -> None:
        cookie = None
        if user is not None:
            session = server.http()
            session.login(user)
            cookie = session.cookie_header()
        self.ws = server.ws_client("/ws/", cookie=cookie)
        self._refs = 0
        #: messages read while waiting for another answer
        self.unmatched: list[dict] = []

    def send(self, **command) -> str:
        self._refs += 1
        ref = command.setdefault("ref", f"r{self._refs}")
        self.ws.send_text(json.dumps(command))
        return ref

    def recv(self, timeout: float | None = None) -> dict:
        if self.unmatched:
            return self.unmatched.pop(0)
        return json.loads(self.ws.recv(timeout))

    def answer(self, ref: str, timeout: float = 10) -> dict:
        """The message carrying ``ref`` (others are kept in :attr:`unmatched`)."""
        for i, message in enumerate(self.unmatched):
            if message.get("ref") == ref:
                return self.unmatched.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(max(0.0, deadline - time.monotonic())))
            if message.get("ref") == ref:
                return message
            self.unmatched.append(message)

    def call(self, method: str, data=None, timeout: float = 10) -> dict:
        return self.answer(self.send(type="rpc", method=method, data=data), timeout)

    def subscribe(self, channel: str) -> None:
        reply = self.answer(self.send(type="subscribe", channel=channel))
        assert reply["type"] == "subscribed", reply

    def close(self) -> None:
        self.ws.close()


def error(code: str, ref: str, **fields) -> dict:
    return {"type": "error", "code": code, "ref": ref, **fields}


# -- RPC -------------------------------------------------------------------------------


def test_a_method_gets_the_identity_and_the_data_and_its_value_comes_back(server):
    anonymous, alice = Client(server), Client(server, user="alice")
    ref = anonymous.send(type="rpc", method="test.echo", data={"a": [1, "é"]})
    assert anonymous.answer(ref) == {
        "type": "reply",
        "ref": ref,
        "data": {"user": None, "user_id": None, "data": {"a": [1, "é"]}},
    }
    reply = alice.call("test.echo")
    assert reply["data"]["user"] == "alice" and isinstance(reply["data"]["user_id"], int)
    # An ORM query in the handler's thread; the method was registered under its function's name,
    # in tests/testapp/rpc.py, which nothing imports but offload's autodiscovery of rpc modules.
    assert alice.call("usernames")["data"] == ["alice", "bob", "carol"]
    anonymous.close()
    alice.close()


def test_unknown_and_malformed_methods_are_refused_and_the_socket_stays_open(server):
    client = Client(server)
    ref = client.send(type="rpc", method="no.such.method")
    assert client.answer(ref) == error("method_not_found", ref, reason="no RPC method 'no.such.method'")
    for bad in ("", "1abc", "a b", "x" * 65, 7, None):
        ref = client.send(type="rpc", method=bad)
        assert client.answer(ref)["code"] == "bad_message"
    # 40 KB as sent, 90 KB as the data re-encoded (1e5 is 100000.0): over OFFLOAD_MAX_MESSAGE_BYTES.
    client.ws.send_text('{"type":"rpc","method":"test.echo","ref":"big","data":[' + ",".join(["1e5"] * 10_000) + "]}")
    assert client.answer("big") == error("message_too_large", "big", reason="data is larger than 65536 bytes")
    assert client.call("test.echo", "still here")["data"]["data"] == "still here"
    client.close()


def test_a_failing_method_is_internal_error_and_its_traceback_is_only_in_the_log(server):
    client = Client(server)
    secret = uuid.uuid4().hex
    ref = client.send(type="rpc", method="test.fail", data=secret)
    answer = client.answer(ref)
    assert answer == error("internal_error", ref, reason="internal error (the server log has the details)")
    ref = client.send(type="rpc", method="test.unserializable")
    assert client.answer(ref)["code"] == "internal_error"

    def logged():
        text = server.log_text()
        return text if f"handler kaboom {secret}" in text else None

    log = wait_for(logged, 5, "the traceback in the log")
    assert "RPC method 'test.fail' failed\nTraceback (most recent call last):" in log
    assert "RPC method 'test.unserializable' failed" in log
    assert secret not in json.dumps(answer)
    client.close()


def test_rejected_sends_its_code_and_reason(server):
    client = Client(server)
    ref = client.send(type="rpc", method="test.reject")
    assert client.answer(ref) == error("not_today", ref, reason="not today")
    client.close()


def test_a_slow_call_times_out_the_socket_keeps_answering_and_the_late_result_is_dropped(server):
    client, redis = Client(server), server.redis()
    token = uuid.uuid4().hex
    call = client.send(type="rpc", method="test.sleep", data={"seconds": TIMEOUT + 1.5, "token": token})
    started = time.monotonic()
    pongs = 0
    while time.monotonic() - started < TIMEOUT - 0.5:  # the call runs: pings are answered at once
        ref = client.send(type="ping")
        assert client.answer(ref, timeout=0.5 * timeout_factor()) == {"type": "pong", "ref": ref}
        pongs += 1
        time.sleep(0.1)
    assert pongs >= 5
    answer = client.answer(call, timeout=TIMEOUT + 1)
    assert answer == error("rpc_timeout", call, reason=f"no answer within {TIMEOUT:g} s")
    assert not redis.exists(f"testapp:slept:{token}"), "answered before the method returned"
    wait_for(lambda: redis.exists(f"testapp:slept:{token}"), 5, "the method to finish in its thread")
    ref = client.send(type="ping")
    assert client.recv() == {"type": "pong", "ref": ref}, "the late result is dropped"
    assert "RPC method 'test.sleep' did not return within 2.0 s" in server.log_text()
    client.close()


def test_calls_beyond_the_in_flight_limit_are_refused_until_one_ends(server):
    client, redis = Client(server), server.redis()
    token = uuid.uuid4().hex
    try:
        held = [client.send(type="rpc", method="test.block", data={"token": token}) for _ in range(IN_FLIGHT)]
        wait_for(lambda: int(redis.get(f"testapp:blocked:{token}") or 0) == IN_FLIGHT, 5, "the calls to run")
        ref = client.send(type="rpc", method="test.echo")
        assert client.answer(ref) == error(
            "too_many_calls", ref, reason=f"at most {IN_FLIGHT} calls at once per connection"
        )
    finally:
        redis.set(f"testapp:release:{token}", 1)
    assert [client.answer(ref)["data"] for ref in held] == ["released"] * IN_FLIGHT
    assert client.call("test.echo", 1)["data"]["data"] == 1
    client.close()


def test_calls_beyond_the_rate_are_refused_and_the_socket_stays_open(server):
    client = Client(server)
    refs = [client.send(type="rpc", method="test.echo") for _ in range(BURST + 6)]
    codes = [client.answer(ref).get("code") for ref in refs]
    assert "rate_limited" in codes and codes.index("rate_limited") >= BURST, codes
    ref = client.send(type="ping")
    assert client.answer(ref)["type"] == "pong"
    # A rate, not a ban: calls go through again as the bucket refills.
    wait_for(lambda: client.call("test.echo")["type"] == "reply", 5, "a call to be accepted again", 0.3)
    client.close()


def test_a_method_may_publish_from_its_thread(server):
    listener, caller = Client(server), Client(server)
    listener.subscribe("public:from-rpc")
    reply = caller.call("test.publish", {"channel": "public:from-rpc", "data": {"n": 1}})
    assert listener.recv() == {"type": "message", "channel": "public:from-rpc", "id": reply["data"], "data": {"n": 1}}
    listener.close()
    caller.close()


def test_slow_handlers_do_not_starve_the_user_lookup_of_handshakes(server):
    """Handlers have their own threads: with all of them held, a logged-in user still connects at once."""
    redis, token = server.redis(), uuid.uuid4().hex
    holders = [Client(server), Client(server)]
    alice = server.http()
    alice.login("alice")
    log_before = len(server.log_text())
    try:
        for i in range(THREADS):
            holders[i // IN_FLIGHT].send(type="rpc", method="test.block", data={"token": token})
        wait_for(lambda: int(redis.get(f"testapp:blocked:{token}") or 0) == THREADS, 5, "every handler thread held")
        started = time.monotonic()
        late = WebSocketClient(server.ws_url + "/ws/", cookie=alice.cookie_header())
        handshake = time.monotonic() - started
        waiting = json.dumps({"type": "rpc", "method": "test.echo", "ref": "queued"})
        late.send_text(waiting)  # no thread free: it waits for one (not refused)
        with pytest.raises(TimeoutError):
            late.recv(timeout=0.3)
    finally:
        redis.set(f"testapp:release:{token}", 1)
    assert json.loads(late.recv())["data"]["user"] == "alice"
    assert handshake < 1.0 * timeout_factor(), f"the handshake took {handshake:.2f} s"
    assert "the thread pool did not run" not in server.log_text()[log_before:]
    late.close()
    for holder in holders:
        holder.close()


def test_calls_still_waiting_for_a_thread_never_run_once_their_socket_closed(server):
    redis, held, dropped = server.redis(), uuid.uuid4().hex, uuid.uuid4().hex
    holders = [Client(server), Client(server)]
    try:
        for i in range(THREADS):
            holders[i // IN_FLIGHT].send(type="rpc", method="test.block", data={"token": held})
        wait_for(lambda: int(redis.get(f"testapp:blocked:{held}") or 0) == THREADS, 5, "every handler thread held")
        leaving = Client(server)
        for _ in range(2):
            leaving.send(type="rpc", method="test.block", data={"token": dropped})
        port = leaving.ws.sock.getsockname()[1]
        inodes = server.sockets_of([port])
        leaving.close()
        wait_for(lambda: not server.holds_sockets(inodes), 5, "the server to close the socket")
    finally:
        redis.set(f"testapp:release:{held}", 1)
        redis.set(f"testapp:release:{dropped}", 1)
    assert [holders[i // IN_FLIGHT].recv()["data"] for i in range(THREADS)] == ["released"] * THREADS
    after = Client(server)
    assert after.call("test.echo")["type"] == "reply"  # the freed threads went to the queue first
    assert redis.get(f"testapp:blocked:{dropped}") is None, "a call of a closed socket ran"
    after.close()


# -- publish hooks ------------------------------------------------------------------------


def test_a_publish_hook_transforms_what_is_published(server):
    alice, listener = Client(server, user="alice"), Client(server)
    listener.subscribe("shout:room")
    ref = alice.send(type="publish", channel="shout:room", data={"text": "hello"})
    published = alice.answer(ref)
    assert published == {"type": "published", "channel": "shout:room", "id": published["id"], "ref": ref}
    assert listener.recv() == {
        "type": "message",
        "channel": "shout:room",
        "id": published["id"],
        "data": {"text": "HELLO", "by": "alice"},
    }
    alice.close()
    listener.close()


@pytest.mark.parametrize(
    "data, code",
    [
        ({"text": "buy spam"}, "spam"),  # Rejected by the hook
        ("not an object", "bad_text"),
        ({"text": "crash"}, "internal_error"),  # the hook raised
        ({"text": "inflate"}, "message_too_large"),  # what it returned is checked again
        ({"text": f"sleep {TIMEOUT + 1}"}, "rpc_timeout"),
    ],
)
def test_a_publish_hook_refusal_publishes_nothing(server, data, code):
    client, listener = Client(server), Client(server)
    channel = f"shout:refused-{uuid.uuid4().hex[:8]}"
    listener.subscribe(channel)
    ref = client.send(type="publish", channel=channel, data=data)
    answer = client.answer(ref)
    assert answer["type"] == "error" and answer["code"] == code and answer["channel"] == channel, answer
    ref = client.send(type="publish", channel=channel, data={"text": "after"})
    assert client.answer(ref)["type"] == "published"
    assert listener.recv()["data"]["text"] == "AFTER", "nothing was published before it"
    client.close()
    listener.close()


def test_a_publish_hook_may_store_the_message(server):
    alice, bob = Client(server, user="alice"), Client(server, user="bob")
    channel = f"stored:{uuid.uuid4().hex[:8]}"
    bob.subscribe(channel)
    ref = alice.send(type="publish", channel=channel, data={"text": "kept"})
    assert alice.answer(ref)["type"] == "published"
    message = bob.recv()["data"]
    assert message == {"id": message["id"], "text": "kept", "by": "alice"}
    assert bob.call("test.stored", channel)["data"] == [{"username": "alice", "text": "kept"}]
    anonymous = Client(server)  # the namespace's policy runs before the hook
    ref = anonymous.send(type="publish", channel=channel, data={"text": "no"})
    assert anonymous.answer(ref)["code"] == "publish_forbidden"
    for client in (alice, bob, anonymous):
        client.close()


def test_hooked_publishes_go_out_in_the_order_they_were_sent(server):
    client, listener = Client(server), Client(server)
    channel = f"shout:order-{uuid.uuid4().hex[:8]}"
    listener.subscribe(channel)
    refs = [client.send(type="publish", channel=channel, data={"text": t}) for t in ("sleep 0.6", "b", "c")]
    ids = [client.answer(ref)["id"] for ref in refs]
    received = [listener.recv() for _ in refs]
    assert [m["data"]["text"] for m in received] == ["SLEEP 0.6", "B", "C"]
    assert [m["id"] for m in received] == ids
    client.close()
    listener.close()


# -- lifecycle signals ------------------------------------------------------------------


def lifecycle(server: LiveServer) -> list[dict]:
    return [json.loads(event) for event in server.redis().lrange(EVENTS, 0, -1)]


def events_of(server: LiveServer, channel: str, count: int) -> list[dict]:
    """The ``count`` events of the connection that subscribed to ``channel``, once they were all received."""

    def found():
        events = lifecycle(server)
        ids = {e["connection_id"] for e in events if e["signal"] == "subscribed" and e["channel"] == channel}
        if len(ids) != 1:
            return None
        mine = [e for e in events if e["connection_id"] in ids]
        return mine if len(mine) >= count else None

    return wait_for(found, 10, f"{count} lifecycle events of the connection on {channel}")


def test_lifecycle_signals_of_a_websocket(server):
    alice = Client(server, user="alice")
    first, second = f"public:lc-{uuid.uuid4().hex[:8]}", f"public:lc-{uuid.uuid4().hex[:8]}"
    alice.subscribe(first)
    alice.subscribe(second)
    ref = alice.send(type="unsubscribe", channel=first)
    alice.answer(ref)
    ref = alice.send(type="subscribe", channel="user:0")  # refused: no signal
    assert alice.answer(ref)["type"] == "error"
    alice.close()
    events = events_of(server, first, 6)
    connection_id = events[0]["connection_id"]
    assert len(connection_id) == 16 and int(connection_id, 16) >= 0
    assert [(e["signal"], e["channel"]) for e in events] == [
        ("connected", None),
        ("subscribed", first),
        ("subscribed", second),
        ("unsubscribed", first),
        ("unsubscribed", second),
        ("disconnected", None),
    ]
    assert {(e["transport"], e["user"]) for e in events} == {("websocket", "alice")}


def test_lifecycle_signals_of_an_event_stream(server):
    session = server.http()
    session.login("bob")
    channel = f"public:lc-{uuid.uuid4().hex[:8]}"
    stream = SseClient(server, f"/sse/?channel={channel}", headers={"Cookie": session.cookie_header()})
    stream.subscribed()
    stream.close()
    events = events_of(server, channel, 4)
    assert [(e["signal"], e["channel"]) for e in events] == [
        ("connected", None),
        ("subscribed", channel),
        ("unsubscribed", channel),
        ("disconnected", None),
    ]
    assert {(e["transport"], e["user"]) for e in events} == {("sse", "bob")}


def connect_and_ping(server: LiveServer) -> tuple[Client, str]:
    """A new connection, subscribed to a channel of its own and pinged, in well under a second."""
    started = time.monotonic()
    client = Client(server)
    channel = f"public:lc-{uuid.uuid4().hex[:8]}"
    client.subscribe(channel)
    ref = client.send(type="ping")
    assert client.answer(ref)["type"] == "pong"
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 * timeout_factor(), f"a connection took {elapsed:.2f} s"
    return client, channel


def test_a_receiver_that_blocks_delays_no_connection(server):
    redis, seconds = server.redis(), 3
    redis.set(BLOCK, seconds)
    blocked_at = time.monotonic()
    blocked, blocked_channel = connect_and_ping(server)  # its own connected blocks a receiver...
    wait_for(lambda: not redis.exists(BLOCK), 5, "the receiver to block")
    others = []
    for _ in range(5):  # ...and neither it nor other connections wait for it
        client, channel = connect_and_ping(server)
        client.close()
        others.append(channel)
    assert time.monotonic() - blocked_at < seconds, "the receiver still blocks"
    assert not [e for e in lifecycle(server) if e["channel"] in others], "sent while a receiver blocks"
    blocked.close()
    order = [events_of(server, channel, 4)[0]["connection_id"] for channel in [blocked_channel, *others]]
    connects = [e["connection_id"] for e in lifecycle(server) if e["signal"] == "connected"]
    positions = [connects.index(connection_id) for connection_id in order]
    assert positions == sorted(positions), "events are sent in the order they happened"
