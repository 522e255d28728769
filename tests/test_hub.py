"""The per-worker hub against a real redis-server (gevent, no uWSGI).

The subscribers here are small recorders (the hub's narrow interface); the
Redis server, the pub/sub connection and publishing are real.
"""

from collections import deque

import gevent
import pytest

import offload
from offload.backend.hub import Hub
from offload.core.protocol import parse_stream_id
from offload.testing import timeout_factor
from tests.test_direct_writes import read_exactly, socket_pair


class Recorder:
    def __init__(self):
        self.ready = []
        self.lost = []
        self.messages = []

    def channel_ready(self, channel):
        self.ready.append(channel)

    def channel_lost(self, channel):
        self.lost.append(channel)

    def deliver(self, channel, entries, frames):
        assert frames == b"".join(entry[2] for entry in entries)
        self.messages.extend((channel, entry) for entry in entries)


def wait_until(predicate, timeout=5.0):
    """Wait on the hub's loop (gevent.sleep: the hub runs meanwhile), the budget scaled for slow machines."""
    deadline = gevent.get_hub().loop.now() + timeout * timeout_factor()
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            raise AssertionError("condition not reached")
        gevent.sleep(0.01)


@pytest.fixture
def hub(redis_client, settings):
    settings.OFFLOAD_STATS_INTERVAL = 0
    hub = Hub(worker_id=1)
    wait_until(lambda: hub.connected)
    yield hub
    hub.close()


def numsub(redis_client, channel):
    return dict(redis_client.pubsub_numsub(f"offload:c:{{{channel}}}"))[f"offload:c:{{{channel}}}".encode()]


def test_many_local_subscribers_share_one_redis_subscription(hub, redis_client):
    subscribers = [Recorder() for _ in range(50)]
    for s in subscribers:
        hub.subscribe(s, "public:a")
    wait_until(lambda: all(s.ready == ["public:a"] for s in subscribers))
    assert numsub(redis_client, "public:a") == 1
    assert len(redis_client.client_list(_type="pubsub")) == 1

    message_id = offload.publish("public:a", {"x": 1})
    wait_until(lambda: all(s.messages for s in subscribers))
    channel, (_, text, frame) = subscribers[0].messages[0]
    assert channel == "public:a"
    assert text == b'{"type":"message","channel":"public:a","id":"' + message_id.encode() + b'","data":{"x":1}}'
    assert frame == bytes([0x81, len(text)]) + text
    assert hub.delivered == 50


def test_late_subscriber_is_ready_at_once_and_unsubscribe_follows_interest(hub, redis_client):
    first, second = Recorder(), Recorder()
    hub.subscribe(first, "public:b")
    wait_until(lambda: first.ready)
    hub.subscribe(second, "public:b")
    assert second.ready == ["public:b"]
    hub.unsubscribe(first, "public:b")
    gevent.sleep(0.1)
    assert numsub(redis_client, "public:b") == 1
    hub.unsubscribe(second, "public:b")
    wait_until(lambda: numsub(redis_client, "public:b") == 0)
    assert hub.channels == 0


def test_burst_is_drained_completely_in_order(hub):
    s = Recorder()
    hub.subscribe(s, "public:burst")
    wait_until(lambda: s.ready)
    ids = [offload.publish("public:burst", n) for n in range(500)]
    wait_until(lambda: len(s.messages) == 500)
    assert [entry[0] for _, entry in s.messages] == [tuple(map(int, i.split("-"))) for i in ids]


def test_resubscribe_while_unsubscribe_is_pending_ends_ready(hub, redis_client):
    s = Recorder()
    hub.subscribe(s, "public:flip")
    wait_until(lambda: s.ready)
    hub.unsubscribe(s, "public:flip")
    hub.subscribe(s, "public:flip")
    wait_until(lambda: len(s.ready) == 2 and hub.is_ready("public:flip"))
    offload.publish("public:flip", 1)
    wait_until(lambda: s.messages)
    assert numsub(redis_client, "public:flip") == 1


def test_redis_connection_killed_reconnects_and_resubscribes(hub, redis_client):
    s = Recorder()
    hub.subscribe(s, "public:r")
    wait_until(lambda: s.ready)
    for client in redis_client.client_list(_type="pubsub"):
        redis_client.client_kill_filter(_id=client["id"])
    wait_until(lambda: s.lost == ["public:r"])
    wait_until(lambda: s.ready == ["public:r", "public:r"])
    assert hub.reconnects == 1
    offload.publish("public:r", "after")
    wait_until(lambda: s.messages)


def test_newest_id_is_read_once_then_kept_current_by_live_messages(hub, redis_client):
    from offload.core.protocol import parse_stream_id

    older = offload.publish("public:tip", {"n": 0})
    subscriber = Recorder()
    hub.subscribe(subscriber, "public:tip")
    wait_until(lambda: subscriber.ready)
    redis_client.config_resetstat()
    assert hub.newest_id("public:tip") == parse_stream_id(older)
    assert hub.newest_id("public:tip") == parse_stream_id(older)
    reads = redis_client.info("commandstats").get("cmdstat_xrevrange", {}).get("calls", 0)
    assert reads == 1  # the second answer came from the hub, not from Redis
    newer = offload.publish("public:tip", {"n": 1})
    wait_until(lambda: len(subscriber.messages) == 1)
    assert hub.newest_id("public:tip") == parse_stream_id(newer)
    # An empty history is known too (None), and forgotten once nobody listens.
    hub.subscribe(subscriber, "public:empty")
    wait_until(lambda: "public:empty" in subscriber.ready)
    assert hub.newest_id("public:empty") is None
    hub.unsubscribe(subscriber, "public:tip")
    wait_until(lambda: numsub(redis_client, "public:tip") == 0)
    assert "public:tip" not in hub._newest


def test_newest_ids_are_forgotten_when_the_redis_link_is_lost(hub, redis_client):
    subscriber = Recorder()
    hub.subscribe(subscriber, "public:gone")
    wait_until(lambda: subscriber.ready)
    offload.publish("public:gone", {"n": 0})
    wait_until(lambda: subscriber.messages)
    assert "public:gone" in hub._newest
    redis_client.client_kill_filter(_type="pubsub")  # the hub's link to Redis fails
    wait_until(lambda: subscriber.lost == ["public:gone"])
    assert hub._newest == {}


def test_hub_writes_directly_until_the_channel_is_lost(hub, redis_client):
    channel = "public:direct"
    direct, other = Recorder(), Recorder()
    ws, peer = socket_pair()
    hub.subscribe(direct, channel)
    hub.subscribe(other, channel)
    wait_until(lambda: direct.ready and other.ready)
    hub.write_directly_to(direct, channel, ws)

    first = offload.publish(channel, {"n": 1})
    wait_until(lambda: other.messages)
    frame = read_exactly(peer, 2)
    text = read_exactly(peer, frame[1])
    assert frame[0] == 0x81 and first.encode() in text
    assert direct.messages == [], "the direct subscriber is not called"
    assert [entry[0] for _, entry in other.messages] == [parse_stream_id(first)]
    assert hub.last_fanned_out(channel) == parse_stream_id(first)
    assert hub.delivered == 2

    ws._out = deque([b"pending"])  # bytes queued: the subscriber is called instead
    second = offload.publish(channel, {"n": 2})
    wait_until(lambda: direct.messages)
    assert [entry[0] for _, entry in direct.messages] == [parse_stream_id(second)]
    ws._out = None

    for client in redis_client.client_list(_type="pubsub"):  # the hub loses Redis
        redis_client.client_kill_filter(_id=client["id"])
    wait_until(lambda: direct.lost == [channel] and len(direct.ready) == 2)
    third = offload.publish(channel, {"n": 3})
    wait_until(lambda: len(direct.messages) == 2)
    assert direct.messages[-1][1][0] == parse_stream_id(third), "after a loss the subscriber must re-sync itself"

    hub.unsubscribe(direct, channel)
    hub.unsubscribe(other, channel)
    assert hub.last_fanned_out(channel) is None


def test_control_commands_reach_every_hub_of_the_process_through_one_link(hub):
    from offload.backend.hub import on_control, send_control

    other = Hub(worker_id=2)
    try:
        wait_until(lambda: other.connected)
        got = []
        on_control(got.append)
        send_control({"probe": "single"})
        wait_until(lambda: got.count({"probe": "single"}) == 2)  # one per hub
        assert len(hub.links) == len(other.links) == 1
    finally:
        other.close()


def test_top_channels_and_message_counts_for_the_operator_page(hub):
    crowd = [Recorder() for _ in range(3)]
    for s in crowd:
        hub.subscribe(s, "public:crowded")
    lone = Recorder()
    hub.subscribe(lone, "public:lone")
    wait_until(lambda: all(s.ready for s in [*crowd, lone]))
    assert hub.top_channels(1) == [("public:crowded", 3)]
    assert hub.top_channels(5) == [("public:crowded", 3), ("public:lone", 1)]

    for n in range(4):
        offload.publish("public:lone", n)
    offload.publish("public:crowded", "x")
    wait_until(lambda: len(lone.messages) == 4 and crowd[0].messages)
    assert hub.take_message_counts() == {"public:lone": 4, "public:crowded": 1}
    assert hub.take_message_counts() == {}  # counting starts again

    offload.publish("public:lone", "y")
    wait_until(lambda: len(lone.messages) == 5)
    hub.unsubscribe(lone, "public:lone")  # its last local subscriber: forgotten with it
    assert hub.take_message_counts() == {}
    assert hub.top_channels(5) == [("public:crowded", 3)]
