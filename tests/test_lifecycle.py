"""Lifecycle events: what the session emits, and how a worker's dispatcher delivers them to the signals.

The session is tested alone (tests/test_session.py's fakes); the dispatcher
with gevent's real thread pool and real Django signals. The real server's
signals (websockets and event streams) are in tests/integration/test_handlers.py.
"""

from __future__ import annotations

import logging
import threading

import pytest
from django.dispatch import Signal

from offload import signals
from offload.policies import Identity
from offload.transports import lifecycle
from offload.transports.lifecycle import ConnectionEvents, Dispatcher, new_connection_id
from tests.test_handlers import until
from tests.test_session import CHANNEL, FakeHistory, session

OTHER = "public:b"


class Recorder:
    """A notify() that keeps the events."""

    def __init__(self):
        self.events: list[tuple] = []

    def __call__(self, event, channel=None):
        self.events.append((event, channel))


def notified_session():
    recorder = Recorder()
    s, _, _ = session(FakeHistory([]))
    s._notify = recorder
    return s, recorder


def confirm(s, channel, now=0.0):
    s.subscribe(channel, None, None, now=now, limit=10)
    s.channel_ready(channel)
    s.step(now=now)


def test_a_session_emits_its_connection_and_confirmed_subscriptions_in_order():
    s, recorder = notified_session()
    s.open()
    confirm(s, CHANNEL)
    confirm(s, OTHER)
    s.subscribe(CHANNEL, None, "again", now=1.0, limit=10)  # already subscribed: nothing new
    s.unsubscribe(CHANNEL)
    s.close()
    s.close()  # the event stream closes twice: one disconnected
    assert recorder.events == [
        ("connected", None),
        ("subscribed", CHANNEL),
        ("subscribed", OTHER),
        ("unsubscribed", CHANNEL),
        ("unsubscribed", OTHER),
        ("disconnected", None),
    ]


def test_a_subscription_that_never_went_through_sends_nothing():
    s, recorder = notified_session()
    s.open()
    s.subscribe(CHANNEL, None, "r", now=0.0, limit=10)
    s.step(now=100.0)  # the hub never got the channel: it gives up
    s.subscribe(OTHER, None, "r", now=100.0, limit=10)
    s.unsubscribe(OTHER)  # still pending
    s.subscribe(CHANNEL, None, "r", now=100.0, limit=10)
    s.close()  # pending when the connection ended
    assert recorder.events == [("connected", None), ("disconnected", None)]


# -- the dispatcher ---------------------------------------------------------------------


@pytest.fixture
def signal():
    return Signal()


@pytest.fixture
def received(signal):
    got: list[dict] = []

    def receiver(sender, **kwargs):
        got.append(kwargs)

    signal.connect(receiver, weak=False)
    return got


def test_events_reach_the_receivers_in_a_thread_in_order(signal, received):
    threads = []
    signal.connect(lambda sender, **kw: threads.append(threading.get_ident()), weak=False)
    dispatcher = Dispatcher(1000)
    for n in range(250):  # more than one batch
        dispatcher.put(signal, {"n": n})
    assert received == [], "put never waits for the receivers"
    until(lambda: len(received) == 250)
    assert [kwargs["n"] for kwargs in received] == list(range(250))
    assert threading.get_ident() not in threads, "never on the event loop's thread"


def test_a_full_queue_drops_counts_and_logs_once_never_waits(signal, received, caplog):
    release = threading.Event()
    signal.connect(lambda sender, **kw: release.wait(5), weak=False)
    dispatcher = Dispatcher(3)
    dispatcher.put(signal, {"n": 0})
    until(lambda: dispatcher.queued == 0)  # taken by the dispatcher, its receiver blocks
    with caplog.at_level(logging.WARNING, logger="offload.transports.lifecycle"):
        for n in range(1, 9):
            dispatcher.put(signal, {"n": n})
    assert dispatcher.queued == 3 and dispatcher.dropped == 5
    assert len(caplog.records) == 1 and "dropping" in caplog.records[0].message
    release.set()
    until(lambda: len(received) == 4)
    assert [kwargs["n"] for kwargs in received] == [0, 1, 2, 3]


def test_a_failing_receiver_is_logged_and_the_others_still_run(signal, received, caplog):
    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    signal.connect(broken, weak=False)
    dispatcher = Dispatcher(10)
    dispatcher.put(signal, {"n": 1})
    dispatcher.put(signal, {"n": 2})
    until(lambda: len(received) == 2)
    assert "receiver bug" in caplog.text


def test_connection_events_carry_who_and_which_connection(monkeypatch):
    queued = []
    queue = type("Queue", (), {"put": lambda self, signal, kwargs: queued.append((signal, kwargs))})()
    monkeypatch.setattr(lifecycle, "dispatcher", lambda: queue)
    alice = Identity(1, "alice")
    events = ConnectionEvents(alice, "0123456789abcdef", "sse")
    events("connected")  # no receiver connected: nothing queued
    assert queued == []

    def receiver(sender, **kwargs): ...

    signals.subscribed.connect(receiver)
    try:
        events("subscribed", CHANNEL)
        events("connected")
    finally:
        signals.subscribed.disconnect(receiver)
    assert queued == [
        (
            signals.subscribed,
            {"identity": alice, "connection_id": "0123456789abcdef", "transport": "sse", "channel": CHANNEL},
        )
    ]


def test_connection_ids_are_random_hex():
    ids = {new_connection_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_the_worker_has_one_dispatcher():
    assert lifecycle.dispatcher() is lifecycle.dispatcher()
