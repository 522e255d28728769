"""The channel session, alone: no socket, no Redis, no clock (all passed in)."""

from __future__ import annotations

import json

import pytest

from offload.core.cursor import make_entry
from offload.core.session import RETRY_HISTORY, CatchUp, ChannelSession
from offload.exceptions import BackendUnavailable, LimitExceeded

CHANNEL = "public:a"
TIMEOUT = 5.0


def entry(n: int):
    return make_entry(json.dumps(CHANNEL).encode(), b"%d-0" % n, b"%d" % n)


class FakeTransport:
    def __init__(self):
        self.replies: list[dict] = []
        self.sent: list[int] = []  # message ids (ms part), in order
        self.joined: list[bytes] = []
        self.failed: list[tuple] = []
        self.wakes = 0
        self.ready_for_history = True
        self.direct_socket = object()

    def send_reply(self, kind, channel, text, position):
        self.replies.append({**json.loads(text), "position": position})

    def send_messages(self, channel, entries, frames):
        self.sent += [e[0][0] for e in entries]
        if frames is not None:
            self.joined.append(frames)

    def can_take_history(self):
        return self.ready_for_history

    def wake(self):
        self.wakes += 1

    def subscribe_failed(self, channel, ref, code, reason):
        self.failed.append((channel, ref, code))


class FakeHub:
    def __init__(self):
        self.subscribed: list[str] = []
        self.direct: list[str] = []
        self.fanned = None
        self.newest = None

    def subscribe(self, subscriber, channel):
        self.subscribed.append(channel)

    def unsubscribe(self, subscriber, channel):
        self.subscribed.remove(channel)

    def write_directly_to(self, subscriber, channel, socket):
        self.direct.append(channel)

    def last_fanned_out(self, channel):
        return self.fanned

    def newest_id(self, channel):
        return self.newest


class FakeHistory:
    """A channel's stream as a list of ids; pages as catch_up gives them."""

    def __init__(self, ids, retained_from=0):
        self.ids = list(ids)
        self.retained_from = retained_from
        self.calls = []
        self.down = False

    def __call__(self, channel, last, first, newest_id, count, page_bytes):
        self.calls.append((last, first, count))
        if self.down:
            raise BackendUnavailable("Redis is unavailable")
        if last is None and first:
            return CatchUp([], newest_id(channel), True, False, count)
        start = last[0] if last else 0
        recovered = last is None or start >= self.retained_from
        after = [n for n in self.ids if n > start and n >= self.retained_from][:count]
        return CatchUp([entry(n) for n in after], None, recovered, len(after) >= count, count)


def session(history=None, transport=None, hub=None):
    transport, hub = transport or FakeTransport(), hub or FakeHub()
    s = ChannelSession(
        transport,
        hub,
        subscribe_timeout=TIMEOUT,
        max_buffer_bytes=1 << 20,
        page_bytes=1 << 18,
        history=history or FakeHistory([]),
    )
    return s, transport, hub


def test_a_resume_sends_history_then_the_live_messages_that_arrived_meanwhile():
    s, transport, hub = session(FakeHistory([1, 2, 3]))
    s.subscribe(CHANNEL, (1, 0), "r1", now=0.0, limit=10)
    assert hub.subscribed == [CHANNEL] and transport.replies == []
    s.deliver(CHANNEL, [entry(3), entry(4)], b"")  # live, before history was read: buffered
    s.channel_ready(CHANNEL)
    assert transport.wakes == 1
    s.step(now=0.1)
    assert transport.replies == [
        {"type": "subscribed", "ref": "r1", "channel": CHANNEL, "last_id": "1-0", "recovered": True, "position": (1, 0)}
    ]
    assert transport.sent == [2, 3, 4]  # no gap, 3 only once
    s.deliver(CHANNEL, [entry(5)], b"frame5")  # live now: the hub's joined frames go out as they are
    assert transport.sent[-1] == 5 and transport.joined == [b"frame5"]
    assert hub.direct == [CHANNEL], "in sync: the hub may write to the socket itself"


def test_a_subscription_from_now_starts_at_the_newest_id_and_goes_direct_with_the_first_newer_one():
    s, transport, hub = session()
    hub.newest = (7, 0)
    s.subscribe(CHANNEL, None, None, now=0.0, limit=10)
    s.channel_ready(CHANNEL)
    s.step(now=0.0)
    assert transport.replies[0]["last_id"] == "7-0" and transport.sent == []
    assert hub.direct == [], "the hub may still carry ids up to 7"
    s.deliver(CHANNEL, [entry(7)], b"")  # published before the tip was read: dropped
    assert transport.sent == [] and hub.direct == []
    s.deliver(CHANNEL, [entry(8)], b"")
    assert transport.sent == [8] and hub.direct == [CHANNEL]


def test_a_subscription_that_waits_too_long_for_the_hub_gives_up():
    s, transport, hub = session()
    s.subscribe(CHANNEL, None, "r", now=10.0, limit=10)
    assert s.next_deadline() == 10.0 + TIMEOUT
    s.step(now=10.0 + TIMEOUT - 0.01)
    assert transport.failed == []
    s.step(now=10.0 + TIMEOUT)
    assert transport.failed == [(CHANNEL, "r", "unavailable")]
    assert hub.subscribed == [] and CHANNEL not in s.cursors and s.next_deadline() is None


def test_history_is_read_again_after_a_redis_error():
    history = FakeHistory([1, 2])
    s, transport, _ = session(history)
    s.subscribe(CHANNEL, (0, 0), None, now=0.0, limit=10)
    s.channel_ready(CHANNEL)
    history.down = True
    s.step(now=1.0)
    assert transport.replies == [] and s.next_deadline() == 1.0 + RETRY_HISTORY
    history.down = False
    s.step(now=1.5)
    assert len(history.calls) == 1, "no retry before its time"
    s.step(now=1.0 + RETRY_HISTORY)
    assert transport.sent == [1, 2]


def test_history_goes_out_page_by_page_as_the_transport_takes_it():
    history = FakeHistory(range(1, 21))
    s, transport, hub = session(history)
    s.subscribe(CHANNEL, (0, 0), None, now=0.0, limit=10)
    s.channel_ready(CHANNEL)
    s.step(now=0.0)
    assert transport.sent == list(range(1, 9)), "the first page"
    assert hub.direct == [] and transport.wakes == 2, "more to come: the transport is asked to wake"
    transport.ready_for_history = False  # the client has not taken the page yet
    s.step(now=0.1)
    assert len(transport.sent) == 8
    transport.ready_for_history = True
    s.step(now=0.2)
    s.step(now=0.3)
    assert transport.sent == list(range(1, 21)), "three pages (8, 8, 4): the last one, not full, ends the replay"
    s.deliver(CHANNEL, [entry(21)], b"")  # live from here on
    assert transport.sent[-1] == 21 and hub.direct == [CHANNEL]


def test_a_lost_channel_is_read_again_from_its_position_and_a_gap_is_reported():
    history = FakeHistory([1, 2])
    s, transport, hub = session(history)
    s.subscribe(CHANNEL, None, None, now=0.0, limit=10)
    hub.newest = (2, 0)
    s.channel_ready(CHANNEL)
    s.step(now=0.0)
    s.channel_lost(CHANNEL)  # Redis went away: messages 3..5 were published meanwhile
    history.ids += [3, 4, 5]
    history.retained_from = 4  # ... and 3 was trimmed already
    s.deliver(CHANNEL, [entry(6)], b"")  # buffered until history is read again
    s.channel_ready(CHANNEL)
    s.step(now=1.0)
    assert history.calls[-1][0] == (2, 0), "read from the position"
    assert transport.replies[-1]["recovered"] is False and transport.replies[-1]["last_id"] is None
    assert transport.sent == [4, 5, 6]


def test_subscribing_twice_answers_again_and_the_limit_holds():
    s, transport, _ = session()
    s.subscribe(CHANNEL, None, None, now=0.0, limit=1)
    s.channel_ready(CHANNEL)
    s.step(now=0.0)
    assert s.subscribe(CHANNEL, None, "again", now=0.0, limit=1) is False
    assert transport.replies[-1]["ref"] == "again"
    with pytest.raises(LimitExceeded) as info:
        s.subscribe("public:b", None, None, now=0.0, limit=1)
    assert info.value.code == "too_many_subscriptions"


def test_closing_leaves_the_hub():
    s, _, hub = session()
    s.subscribe(CHANNEL, None, None, now=0.0, limit=10)
    s.subscribe("public:b", None, None, now=0.0, limit=10)
    s.close()
    assert hub.subscribed == [] and s.cursors == {}


def test_an_idle_session_keeps_only_its_cursors_and_shares_the_channel_names():
    """Thousands of sessions per worker (issue 16): the name is one string in the process, and what a
    subscription needs only until it is live (pending reply, history to read, live buffer) is gone once it is."""
    sessions = [session()[0] for _ in range(2)]
    names = ["".join(["public:", "shared"]) for _ in sessions]  # equal, distinct objects (as parsed per socket)
    assert names[0] is not names[1]
    for s, name in zip(sessions, names, strict=True):
        s.subscribe(name, None, None, now=0.0, limit=10)
        assert s._pending is not None
        s.channel_ready(name)
        s.step(now=0.0)
    first, second = (next(iter(s.cursors)) for s in sessions)
    assert first is second, "one string per channel name, not one per session"
    for s in sessions:
        cursor = s.cursors["public:shared"]
        assert s._pending is None and s._needs_history is None and cursor.buffered == 0 and cursor.direct
    sessions[0].channel_lost("public:shared")
    assert not sessions[0].cursors["public:shared"].direct and sessions[1].cursors["public:shared"].direct
