"""Server-side handlers without a server: the rpc command, the registry, the thread's side, hooks' settings.

The waiting side (a websocket's calls: limits, timeouts, close) runs with
gevent's real thread pool against a fake socket; everything against the real
uWSGI is in tests/integration/test_handlers.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import gevent
import gevent.event
import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

import offload
from offload import handlers
from offload.backend import redis_client as client_module
from offload.backend.redis_client import history_key
from offload.core.protocol import Publish, Rpc, is_method_name, parse_command, rpc_reply
from offload.exceptions import LimitExceeded, ProtocolError, RefusedError, Rejected
from offload.handlers import INTERNAL_ERROR, Outcome, run_hook, run_method
from offload.policies import Identity, compile_hook, namespace_of, reset_cache
from offload.transports.calls import Calls

ALICE = Identity(7, "alice", frozenset({"staff"}))

# -- the rpc command -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"type":"rpc","method":"chat.typing","data":{"room":"a"},"ref":3}', Rpc("chat.typing", {"room": "a"}, 3)),
        ('{"type":"rpc","method":"ping_v2"}', Rpc("ping_v2")),
        ('{"type":"rpc","method":"a:b-c.D_9","data":[1.5,null]}', Rpc("a:b-c.D_9", [1.5, None])),
        ('{"type":"rpc","method":"_" ,"data":"x"}', Rpc("_", "x")),
    ],
)
def test_rpc_commands_parse(text, expected):
    assert parse_command(text, max_data_bytes=100) == expected


@pytest.mark.parametrize("method", [None, "", "9lives", "a b", "é", "x" * 65, 7, ["a"], "a/b"])
def test_a_method_name_is_a_bounded_ascii_name(method):
    assert not is_method_name(method)
    with pytest.raises(ProtocolError) as refused:
        parse_command(json.dumps({"type": "rpc", "method": method, "ref": "r"}))
    assert refused.value.code == "bad_message" and refused.value.ref == "r"
    assert is_method_name("x" * 64)


def test_rpc_data_is_bounded_as_published_data_is():
    # 1e5 re-encodes as 100000.0: the bound applies to the data as the server would send it on.
    text = '{"type":"rpc","method":"m","data":[1e5,1e5],"ref":1}'
    assert parse_command(text, max_data_bytes=19).data == [1e5, 1e5]
    with pytest.raises(ProtocolError) as refused:
        parse_command(text, max_data_bytes=18)
    assert refused.value.code == "message_too_large" and refused.value.ref == 1


def test_a_reply_splices_the_data_json_in():
    assert json.loads(rpc_reply("r1", '{"a":[1,"é"]}')) == {"type": "reply", "ref": "r1", "data": {"a": [1, "é"]}}
    assert rpc_reply(None, "null") == '{"type":"reply","data":null}'
    assert rpc_reply(5, "1") == '{"type":"reply","ref":5,"data":1}'


# -- Rejected --------------------------------------------------------------------------


def test_rejected_carries_a_client_visible_code():
    exc = offload.Rejected("the room is closed", code="room_closed")
    assert isinstance(exc, RefusedError) and (exc.code, exc.reason) == ("room_closed", "the room is closed")
    assert offload.Rejected("no").code == "rejected"
    for bad in ("", "Room", "a-b", "x" * 65, None):
        with pytest.raises(ValueError):
            offload.Rejected("no", code=bad)


# -- the registry -----------------------------------------------------------------------


@pytest.fixture
def registry():
    """Methods registered by a test are forgotten after it."""
    before = dict(handlers._methods)
    handlers._methods.clear()
    yield
    handlers._methods.clear()
    handlers._methods.update(before)


def test_the_three_ways_to_register(registry):
    @offload.rpc("orders.cancel")
    def cancel(identity, data):
        return "cancelled"

    @offload.rpc()
    def typing(identity, data):
        return None

    @offload.rpc
    def bare(identity, data):
        return None

    assert handlers.method("orders.cancel") is cancel and cancel(ALICE, None) == "cancelled"
    assert handlers.method("typing") is typing and handlers.method("bare") is bare
    assert handlers.method("cancel") is None


def test_registration_refuses_what_could_never_be_called(registry):
    with pytest.raises(ValueError):
        offload.rpc("not a name")(lambda identity, data: None)
    with pytest.raises(TypeError):
        offload.rpc("one.argument")(lambda identity: None)
    offload.rpc("kwargs.too")(lambda identity, data, extra=1: None)  # callable as (identity, data): fine


def test_a_name_belongs_to_one_function(registry):
    def first(identity, data): ...

    def second(identity, data): ...

    offload.rpc("taken")(first)
    offload.rpc("taken")(first)  # the same function imported again (autoreload): fine
    with pytest.raises(ImproperlyConfigured, match="registered twice"):
        offload.rpc("taken")(second)


# -- the thread's side -----------------------------------------------------------------


def test_a_method_result_becomes_json_and_its_failures_become_codes(caplog):
    assert run_method("m", lambda identity, data: {"user": identity.username, "got": data}, ALICE, [1]) == Outcome(
        '{"user":"alice","got":[1]}'
    )

    def refuse(identity, data):
        raise Rejected("not now", code="later")

    assert run_method("m", refuse, ALICE, None) == Outcome(code="later", reason="not now")
    assert not caplog.records, "a refusal is not an error"

    def crash(identity, data):
        raise KeyError("secret-detail")

    with caplog.at_level(logging.ERROR, logger="offload.handlers"):
        outcome = run_method("m.crash", crash, ALICE, None)
    assert outcome == INTERNAL_ERROR and "secret" not in outcome.reason
    assert caplog.records[-1].message == "RPC method 'm.crash' failed"
    assert "secret-detail" in caplog.text and caplog.records[-1].exc_info is not None
    assert run_method("m", lambda identity, data: {1j}, ALICE, None) == INTERNAL_ERROR
    assert run_method("m", lambda identity, data: float("nan"), ALICE, None) == INTERNAL_ERROR


@pytest.fixture(scope="module")
def database():
    """The session's own SQLite file (tests/conftest.py puts it in a fresh temporary var/), migrated."""
    call_command("migrate", verbosity=0, interactive=False)


def stored_on(redis_client, channel: str) -> list:
    return [json.loads(fields[b"d"]) for _, fields in redis_client.xrange(history_key(channel))]


def test_a_hook_gets_the_decoded_data_and_what_it_returns_is_published_and_checked_again(caplog, redis_client):
    seen = []

    def hook(identity, channel, data):
        seen.append((identity.username, channel, data))
        return {"text": data["text"].upper()}

    outcome = run_hook(hook, ALICE, "public:hook", '{"text":"hé"}', 100)
    assert outcome.code is None and outcome.text == redis_client.xrange(history_key("public:hook"))[-1][0].decode()
    assert seen == [("alice", "public:hook", {"text": "hé"})]
    assert stored_on(redis_client, "public:hook") == [{"text": "HÉ"}]
    assert run_hook(hook, ALICE, "public:hook", '{"text":"héé"}', 14) == Outcome(
        code="message_too_large", reason="the data to publish is larger than 14 bytes"
    )

    def refuse(identity, channel, data):
        raise Rejected("spam", code="spam")

    assert run_hook(refuse, ALICE, "public:hook", "1", 100) == Outcome(code="spam", reason="spam")
    with caplog.at_level(logging.ERROR, logger="offload.handlers"):
        assert run_hook(lambda i, c, d: object(), ALICE, "public:hook", "1", 100) == INTERNAL_ERROR
    assert "publish hook of public:hook failed" in caplog.text
    assert stored_on(redis_client, "public:hook") == [{"text": "HÉ"}], "only the first one went out"


def store_group(identity, channel, data):
    """A hook that stores the message (a Django group stands in for a model)."""
    Group.objects.create(name=data)
    return data


@pytest.mark.parametrize(
    "breaks, code",
    [
        ("redis", "unavailable"),  # the publish failed
        ("timeout", "rpc_timeout"),  # the client was told the call timed out before the publish
        ("size", "message_too_large"),  # what the hook returned is too large
    ],
)
def test_what_a_hook_stored_is_rolled_back_when_its_message_cannot_go_out(
    database, redis_client, settings, breaks, code
):
    Group.objects.all().delete()
    url = django_settings.OFFLOAD_REDIS_URL
    if breaks == "redis":
        settings.OFFLOAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
        client_module.reset()
    try:
        outcome = run_hook(
            store_group, ALICE, "public:stored", '"kept?"', 3 if breaks == "size" else 100, lambda: breaks == "timeout"
        )
    finally:
        settings.OFFLOAD_REDIS_URL = url
        client_module.reset()
    assert outcome.code == code
    assert not Group.objects.filter(name="kept?").exists(), "the hook's row was rolled back"
    assert stored_on(redis_client, "public:stored") == []
    assert run_hook(store_group, ALICE, "public:stored", '"kept"', 100).code is None
    assert Group.objects.filter(name="kept").exists() and stored_on(redis_client, "public:stored") == ["kept"]
    Group.objects.all().delete()


# -- hooks in the namespace settings ------------------------------------------------------


def shout(identity, channel, data):
    return data


def test_a_namespace_hook_is_a_dotted_path_or_a_callable(settings):
    settings.OFFLOAD_NAMESPACES = {
        "a": {"publish": True, "publish_hook": "tests.test_handlers.shout"},
        "b": {"publish": True, "publish_hook": shout},
        "c": {"publish": True},
    }
    reset_cache()
    try:
        assert namespace_of("a:x").publish_hook is shout
        assert namespace_of("b:x").publish_hook is shout
        assert namespace_of("c:x").publish_hook is None
    finally:
        reset_cache()


@pytest.mark.parametrize("spec", ["tests.test_handlers.no_such_hook", "no.such.module", 42, "ALICE"])
def test_a_hook_that_cannot_be_used_is_a_configuration_error(spec):
    with pytest.raises(ImproperlyConfigured):
        compile_hook(spec)
    assert compile_hook(None) is None


# -- the waiting side: one socket's calls -------------------------------------------------


class FakeSocket:
    """What Calls needs of a WebSocket: who is calling, and where answers go."""

    def __init__(self):
        self.identity = ALICE
        self.sent: list[dict] = []
        self.got = gevent.event.Event()

    def send_text(self, text):
        self.sent.append(json.loads(text))
        self.got.set()

    def next(self) -> dict:
        while not self.sent:
            self.got.clear()
            assert self.got.wait(5), "no answer"
        return self.sent.pop(0)


def until(predicate, timeout: float = 5.0) -> None:
    """Let gevent run until ``predicate()`` holds (the unit tests' wait_for, cooperative)."""
    with gevent.Timeout(timeout, AssertionError(f"{predicate} did not hold in time")):
        while not predicate():
            gevent.sleep(0.001)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def calls(settings, registry):
    settings.OFFLOAD_RPC_CALLS_PER_SECOND = 1.0
    settings.OFFLOAD_RPC_BURST = 3
    settings.OFFLOAD_RPC_MAX_IN_FLIGHT = 2
    settings.OFFLOAD_RPC_TIMEOUT = 0.2
    release, returned = threading.Event(), threading.Event()

    def wait(identity, data):
        release.wait(5)
        returned.set()
        return "released"

    offload.rpc("echo")(lambda identity, data: data)
    offload.rpc("wait")(wait)
    ws, clock = FakeSocket(), Clock()
    yield Calls(ws, clock), ws, clock, release, returned
    release.set()


def test_a_call_is_answered_from_its_own_greenlet(calls):
    calls, ws, *_ = calls
    calls.rpc(Rpc("echo", {"a": 1}, "r1"))
    assert ws.sent == [] and calls.in_flight == 1, "the connection's greenlet does not wait"
    assert ws.next() == {"type": "reply", "ref": "r1", "data": {"a": 1}}
    assert calls.in_flight == 0


def test_admission_unknown_method_then_rate_then_calls_in_flight(calls):
    calls, ws, clock, release, _ = calls
    with pytest.raises(RefusedError) as refused:
        calls.rpc(Rpc("nope", None, "r0"))
    assert refused.value.code == "method_not_found"
    calls.rpc(Rpc("wait", None, "r1"))
    calls.rpc(Rpc("wait", None, "r2"))
    with pytest.raises(LimitExceeded) as refused:
        calls.rpc(Rpc("echo", None, "r3"))
    assert refused.value.code == "too_many_calls"
    with pytest.raises(LimitExceeded) as refused:  # the burst of 3 is spent (r3 took a token too)
        calls.rpc(Rpc("echo", None, "r4"))
    assert refused.value.code == "rate_limited"
    release.set()
    assert {ws.next()["data"], ws.next()["data"]} == {"released"}
    clock.now = 1.0  # one token back
    calls.rpc(Rpc("echo", "again", "r5"))
    assert ws.next()["data"] == "again"


def test_a_call_past_its_timeout_is_answered_and_its_late_result_dropped(calls):
    calls, ws, _, release, returned = calls
    calls.rpc(Rpc("wait", None, "slow"))
    assert ws.next() == {"type": "error", "code": "rpc_timeout", "reason": "no answer within 0.2 s", "ref": "slow"}
    assert calls.in_flight == 0
    release.set()
    until(returned.is_set)
    calls.rpc(Rpc("echo", "next", "r2"))  # its result comes back after the late one
    assert ws.next()["ref"] == "r2", "nothing came from the late result"


def test_closing_ends_the_calls_and_keeps_nothing(calls):
    calls, ws, _, release, returned = calls
    calls.rpc(Rpc("wait", None, "r1"))
    gevent.sleep(0)  # the call starts: its function runs in a thread
    calls.close()
    until(lambda: calls.in_flight == 0)
    release.set()
    until(returned.is_set)
    calls.rpc(Rpc("echo", "after", "r2"))
    assert ws.next()["ref"] == "r2" and ws.sent == [], "the closed call answered nothing"


def test_hooked_publishes_are_published_in_the_order_sent(calls, redis_client):
    calls, ws, *_ = calls

    def hook(identity, channel, data):
        if data == "slow":
            time.sleep(0.05)  # the second hook returns first
        return {"by": identity.username, "data": data}

    calls.publish(hook, Publish("public:hooked", '"slow"', "p1"))
    calls.publish(hook, Publish("public:hooked", '"fast"', "p2"))
    first, second = ws.next(), ws.next()
    assert (first["ref"], second["ref"]) == ("p1", "p2") and first["type"] == second["type"] == "published"
    stored = redis_client.xrange(history_key("public:hooked"))
    assert [json.loads(fields[b"d"]) for _, fields in stored] == [
        {"by": "alice", "data": "slow"},
        {"by": "alice", "data": "fast"},
    ]


# -- Redis from a handler thread -----------------------------------------------------------


def test_each_thread_has_its_own_redis_client():
    """Under gevent a socket belongs to its thread's hub: a handler thread must not use the worker's connections."""
    mine = client_module.get_client()
    assert client_module.get_client() is mine
    other = []
    thread = threading.Thread(target=lambda: other.append(client_module.get_client()))
    thread.start()
    thread.join()
    assert other[0] is not mine
    client_module.reset()
    assert client_module.get_client() is not mine
