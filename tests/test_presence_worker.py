"""offload.transports.presence: one worker's presence against a real redis-server, time driven by hand."""

from __future__ import annotations

import json

import pytest

from offload.backend.hub import NOTICE
from offload.backend.presence_store import count as presence_count  # no lazy sweep: it goes by Redis time
from offload.backend.redis_client import pubsub_channel
from offload.policies import Identity, reset_cache
from offload.transports.presence import Presence

CH = "room:p"
ALICE = Identity(1, "alice")
BOB = Identity(2, "bob")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def events(redis_client, settings):
    settings.OFFLOAD_NAMESPACES = {"room": {"subscribe": "authenticated", "presence": True}}
    settings.OFFLOAD_PRESENCE_GRACE = 2.0
    settings.OFFLOAD_PRESENCE_COALESCE = 0.5
    settings.OFFLOAD_PRESENCE_HEARTBEAT = 1.0
    settings.OFFLOAD_PRESENCE_LEASE_TTL = 3.0
    reset_cache()
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(pubsub_channel(CH))
    pubsub.get_message(timeout=1)

    def received() -> list[dict]:
        found = []
        while (message := pubsub.get_message(timeout=0.2)) is not None:
            prefix, _, text = message["data"].partition(b" ")
            assert prefix == NOTICE
            found.append(json.loads(text))
        return found

    yield received
    pubsub.close()
    reset_cache()


def test_tabs_are_one_member_and_the_window_sends_one_event(events):
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.enter(CH, ALICE, "c2")  # a second tab
    worker.enter(CH, BOB, "c3")
    worker.work(clock.now)
    assert presence_count(CH) == 2
    assert events() == [], "nothing before the window ends"
    clock.now += 0.5
    worker.work(clock.now)
    (event,) = events()
    assert event["count"] == 2 and event["leaves"] == []
    assert event["joins"] == [{"id": "1", "user": 1, "name": "alice"}, {"id": "2", "user": 2, "name": "bob"}]
    worker.exit(CH, ALICE, "c1")
    worker.work(clock.now)
    assert presence_count(CH) == 2, "alice's other tab keeps her in"


def test_a_return_within_the_grace_period_is_silent_and_a_real_leave_is_one_event(events):
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.work(clock.now)
    clock.now += 0.5
    worker.work(clock.now)
    assert [e["joins"][0]["id"] for e in events()] == ["1"]
    worker.exit(CH, ALICE, "c1")
    worker.work(clock.now)  # the leave is sent: alice's grace period starts
    clock.now += 1.0
    worker.enter(CH, ALICE, "c2")  # back within 2 s
    worker.work(clock.now)
    clock.now += 3.0
    worker.work(clock.now)
    assert events() == [] and presence_count(CH) == 1
    worker.exit(CH, ALICE, "c2")
    worker.work(clock.now)
    clock.now += 2.0  # the grace period ends: the sweep reports the leave
    worker.work(clock.now)
    clock.now += 0.5
    worker.work(clock.now)
    assert events() == [{"type": "presence", "channel": CH, "count": 0, "joins": [], "leaves": ["1"]}]


def test_a_close_before_anything_was_sent_sends_nothing(events):
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.exit(CH, ALICE, "c1")
    worker.work(clock.now)
    clock.now += 1
    worker.work(clock.now)
    assert events() == [] and presence_count(CH) == 0


def test_a_dead_workers_members_are_released_by_a_live_one(events):
    clock = Clock()
    dead, live = (
        Presence("dead", clock, run=False, redis_clock=clock),
        Presence("live", clock, run=False, redis_clock=clock),
    )
    dead.enter(CH, ALICE, "c1")
    live.enter(CH, BOB, "c2")
    dead.work(clock.now)
    live.work(clock.now)
    clock.now += 0.5
    live.work(clock.now)
    dead.work(clock.now)
    events()
    # "dead" never works again; "live" heartbeats every second.
    for _ in range(8):
        clock.now += 1.0
        live.work(clock.now)
    assert events() == [{"type": "presence", "channel": CH, "count": 1, "joins": [], "leaves": ["1"]}]
    assert presence_count(CH) == 1


def test_closing_lets_go_of_every_member_at_once(events):
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.work(clock.now)
    worker.close()
    other = Presence("w2", clock, run=False, redis_clock=clock)
    other.enter(CH, BOB, "c2")
    other.work(clock.now)
    clock.now += 2.0  # alice's grace period, started by the close
    other.work(clock.now)
    clock.now += 0.5
    other.work(clock.now)
    assert presence_count(CH) == 1


def test_closing_without_grace_announces_each_leave_since_no_sweep_will(events, settings):
    settings.OFFLOAD_PRESENCE_GRACE = 0.0
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.enter(CH, BOB, "c2")
    worker.work(clock.now)
    clock.now += 0.5
    worker.work(clock.now)
    assert [e["count"] for e in events()] == [2]
    worker.exit(CH, BOB, "c2")  # closed just before the worker stops: not sent yet
    worker.close()
    assert presence_count(CH) == 0
    assert events() == [{"type": "presence", "channel": CH, "count": 0, "joins": [], "leaves": ["1", "2"]}]


def test_closing_announces_the_joins_of_a_window_that_had_not_ended(events):
    clock = Clock()
    worker = Presence("w1", clock, run=False, redis_clock=clock)
    worker.enter(CH, ALICE, "c1")
    worker.work(clock.now)  # alice joined in Redis; her event waits for the window's end
    worker.close()  # she is in her grace period now: whoever sees her come back was told she came
    assert events() == [
        {
            "type": "presence",
            "channel": CH,
            "count": 1,
            "joins": [{"id": "1", "user": 1, "name": "alice"}],
            "leaves": [],
        }
    ]
