"""The hub on a real Redis Cluster (three masters, three replicas) and a real Sentinel setup.

First the hub alone in the test process (gevent, no uWSGI), messages published
with SPUBLISH on the owning shard as the publish script does: one connection per
master, slot migrations, -MOVED, failovers. Then websocket clients on a real
uWSGI (two workers) with the exact delivery check of test_resilience.py through
a slot migration and a failover, over the Cluster and over Sentinel.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from offload.backend.health import RedisHealth, redis_health
from offload.backend.hub import Hub, on_control
from offload.backend.redis_client import history_key, pubsub_channel
from offload.testing import wait_for
from offload.testing.topologies import LocalRedisCluster, LocalRedisSentinel, use_redis
from tests.integration.demo import DemoServer, serve_demo
from tests.integration.test_resilience import (
    DeliveryReport,
    Publisher,
    Subscriber,
    Swarm,
    check_log,
    delivery_report,
    parse_id,
    wait_caught_up,
)
from tests.test_hub import wait_until


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalRedisCluster().start()
    yield cluster
    cluster.stop()


def spublisher(cluster: LocalRedisCluster) -> redis.RedisCluster:
    return redis.RedisCluster(host="127.0.0.1", port=cluster.live_ports()[0], socket_timeout=5)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.ids: dict[str, list[str]] = {}

    def channel_ready(self, channel: str) -> None:
        self.events.append(("ready", channel))

    def channel_lost(self, channel: str) -> None:
        self.events.append(("lost", channel))

    def deliver(self, channel, entries, frames) -> None:
        self.ids.setdefault(channel, []).extend(entry.id for entry in entries)

    def notice(self, channel: str, text: str) -> None:
        pass

    def count(self, event: str, channel: str) -> int:
        return self.events.count((event, channel))


def started_hub(url: str, connected) -> Iterator[Hub]:
    """A hub on ``url``, once ``connected(hub)``; closed, and offload back on the test Redis, after."""
    with use_redis(url):
        hub = Hub(worker_id=1)
        try:
            wait_until(lambda: connected(hub), 15)
            yield hub
        finally:
            hub.close()


@pytest.fixture
def hub(cluster):
    yield from started_hub(cluster.url, lambda h: len(h.links) == len(cluster.master_ports()) and h.connected)


class ShardPublisher:
    """SPUBLISH ``<id> <data>`` on the channel's shard, ids counting up per channel."""

    def __init__(self, cluster: LocalRedisCluster) -> None:
        self.client = spublisher(cluster)
        self.sent: dict[str, list[tuple[int, int]]] = {}

    def __call__(self, channel: str) -> tuple[int, int]:
        ids = self.sent.setdefault(channel, [])
        ids.append((len(ids) + 1, 0))
        self.client.spublish(pubsub_channel(channel), f"{ids[-1][0]}-0 {{}}")
        return ids[-1]


def pubsub_clients(cluster: LocalRedisCluster, port: int) -> int:
    """The hub's connections to that node (named by the hub, subscribed or not)."""
    return sum(c["name"] == f"offload-hub-{os.getpid()}" for c in cluster.node(port).client_list())


def test_channels_on_every_shard_use_one_connection_per_master(cluster, hub):
    channels = [f"public:spread{i}" for i in range(30)]
    shards = {cluster.master_of_slot(hub._slot_of(c)) for c in channels}
    assert shards == set(cluster.master_ports()), "the channels span every shard"
    recorders = [Recorder() for _ in range(5)]
    for recorder in recorders:
        for channel in channels:
            hub.subscribe(recorder, channel)
    wait_until(lambda: all(hub.is_ready(c) for c in channels))
    publish = ShardPublisher(cluster)
    for channel in channels:
        publish(channel)
        publish(channel)
    wait_until(lambda: all(len(r.ids.get(c, ())) == 2 for r in recorders for c in channels))
    assert all(r.ids[c] == publish.sent[c] for r in recorders for c in channels)
    # One sharded pub/sub connection per master for 30 channels x 5 subscribers; none on replicas.
    for port in cluster.live_ports():
        assert pubsub_clients(cluster, port) == (1 if port in cluster.master_ports() else 0)
    numsub = cluster.node(cluster.master_of_slot(hub._slot_of(channels[0]))).execute_command(
        "PUBSUB", "SHARDNUMSUB", pubsub_channel(channels[0])
    )
    assert numsub[1] == 1


def test_control_commands_reach_the_hub_on_a_sharded_channel(cluster, hub):
    got: list[dict] = []
    on_control(got.append)
    wait_until(lambda: any(pubsub_channel("ctl").encode() in row for row in _shard_channels(cluster)))
    spublisher(cluster).spublish(pubsub_channel("ctl"), '{"probe":"cluster"}')
    wait_until(lambda: {"probe": "cluster"} in got)


def _shard_channels(cluster: LocalRedisCluster) -> list[list[bytes]]:
    return [cluster.node(p).execute_command("PUBSUB", "SHARDCHANNELS") for p in cluster.master_ports()]


def test_a_migrated_slot_is_lost_then_ready_on_its_new_master(cluster, hub):
    moving, staying = "public:moving", "public:staying"
    recorder = Recorder()
    hub.subscribe(recorder, moving)
    hub.subscribe(recorder, staying)
    wait_until(lambda: hub.is_ready(moving) and hub.is_ready(staying))
    publish = ShardPublisher(cluster)
    publish(moving)
    wait_until(lambda: recorder.ids.get(moving) == [(1, 0)])
    slot = hub._slot_of(moving)
    source = cluster.master_of_slot(slot)
    target = next(p for p in cluster.master_ports() if p != source)

    cluster.migrate_slot(slot, target)

    # Redis drops the sharded subscription (sunsubscribe): lost, then ready on the new owner.
    wait_until(lambda: recorder.count("lost", moving) == 1 and recorder.count("ready", moving) == 2, 15)
    assert cluster.node(target).execute_command("PUBSUB", "SHARDNUMSUB", pubsub_channel(moving))[1] == 1
    assert cluster.node(source).execute_command("PUBSUB", "SHARDNUMSUB", pubsub_channel(moving))[1] == 0
    publish(moving)
    wait_until(lambda: recorder.ids[moving] == [(1, 0), (2, 0)])
    if cluster.master_of_slot(hub._slot_of(staying)) != source:
        assert recorder.count("lost", staying) == 0  # other shards' channels are untouched
    for port in cluster.master_ports():
        assert pubsub_clients(cluster, port) == 1


def test_a_stale_slot_map_is_corrected_by_moved(cluster, hub):
    """A slot moved while the hub held no channel of it (no sunsubscribe told it): its
    SSUBSCRIBE goes to the old owner, which answers -MOVED; the hub reads the map again."""
    channel = "public:latecomer"
    slot = hub._slot_of(channel)
    source = cluster.master_of_slot(slot)
    target = next(p for p in cluster.master_ports() if p != source)
    refreshes = hub._routes.refreshes
    cluster.migrate_slot(slot, target)
    recorder = Recorder()

    hub.subscribe(recorder, channel)

    wait_until(lambda: hub.is_ready(channel), 15)
    assert hub._routes.refreshes > refreshes
    assert recorder.events == [("ready", channel)]  # never ready on the old owner, so never lost
    assert cluster.node(target).execute_command("PUBSUB", "SHARDNUMSUB", pubsub_channel(channel))[1] == 1
    publish = ShardPublisher(cluster)
    publish(channel)
    wait_until(lambda: recorder.ids.get(channel) == [(1, 0)])


def test_a_killed_master_fails_over_and_its_channels_come_back(cluster, hub):
    recorder = Recorder()
    channels = [f"public:failover{i}" for i in range(12)]
    for channel in channels:
        hub.subscribe(recorder, channel)
    wait_until(lambda: all(hub.is_ready(c) for c in channels))
    victim = cluster.master_of_slot(hub._slot_of(channels[0]))
    on_victim = [c for c in channels if cluster.master_of_slot(hub._slot_of(c)) == victim]
    elsewhere = [c for c in channels if c not in on_victim]
    assert elsewhere, "some channels live on other shards"

    promoted = cluster.kill_master(victim)

    wait_until(lambda: all(recorder.count("lost", c) == 1 for c in on_victim), 20)
    wait_until(lambda: all(hub.is_ready(c) for c in channels), 30)  # a replica took over
    assert victim not in cluster.master_ports() and promoted in cluster.master_ports()
    assert all(recorder.count("lost", c) == 0 for c in elsewhere)
    assert {link.name for link in hub.links} == {f"127.0.0.1:{p}" for p in cluster.master_ports()}
    publish = ShardPublisher(cluster)
    for channel in channels:
        publish(channel)
    wait_until(lambda: all(recorder.ids.get(c) == [(1, 0)] for c in channels))
    for port in cluster.master_ports():
        assert pubsub_clients(cluster, port) == 1
    cluster.restart(victim)  # back as a replica: the next tests fail over again


def test_a_cluster_worker_stays_ready_while_one_shard_fails_over(cluster, hub):
    """Every worker sees a shard's outage at once: a 503 would take every instance out of the balancer."""
    assert redis_health(hub) == RedisHealth(None)
    victim = cluster.master_ports()[0]
    seen: list[RedisHealth] = []

    def outage() -> None:  # right after the kill: the replica takes over only after cluster-node-timeout
        seen.append(redis_health(hub))

    cluster.kill_master(victim, during=outage)
    (health,) = seen
    assert health.unready is None and f":{victim}" in health.degraded, health
    wait_until(lambda: redis_health(hub) == RedisHealth(None), 30)
    cluster.restart(victim)


# -- websocket clients on uWSGI over the Cluster ----------------------------------------


def live_server(tmp_path_factory, redis_url: str) -> Iterator[DemoServer]:
    """The demo on a real uWSGI with two workers (two hubs) on ``redis_url``."""
    env = {"WORKERS": "2", "OFFLOAD_PING_INTERVAL": "2", "OFFLOAD_PING_TIMEOUT": "4"}
    yield from serve_demo(tmp_path_factory, "var", env, redis_url=redis_url)


@pytest.fixture(scope="module")
def cluster_server(cluster, tmp_path_factory):
    yield from live_server(tmp_path_factory, cluster.url)


def channels_on_every_shard(cluster: LocalRedisCluster, prefix: str) -> list[str]:
    """One channel per master, named ``<prefix>-<n>``."""
    found: dict[int, str] = {}
    for n in itertools.count():
        name = f"{prefix}-{n}"
        found.setdefault(cluster.master_of_slot(key_slot(pubsub_channel(name).encode())), name)
        if len(found) == len(cluster.master_ports()):
            return sorted(found.values())
    raise AssertionError("unreachable")


class Load:
    """Websocket subscribers (resuming like offload.js) and one HTTP publisher per channel."""

    def __init__(self, server, channels: list[str], per_channel: int = 8) -> None:
        self.channels = channels
        self.subs = [Subscriber(i, channels[i % len(channels)]) for i in range(per_channel * len(channels))]
        self.publishers = {c: Publisher(server, c, interval=(0.01, 0.02)) for c in channels}
        for publisher in self.publishers.values():
            publisher.publish_until_acked()  # history exists: every "subscribed" has a last_id
        self.swarm = Swarm(server.port, self.subs)
        self.swarm.start()
        wait_for(self.swarm.all_live, 60, "every subscription")
        for publisher in self.publishers.values():
            publisher.start()

    def finish(self) -> dict[str, DeliveryReport]:
        for publisher in self.publishers.values():
            publisher.stop()
        reports = {}
        for channel, publisher in self.publishers.items():
            subs = [s for s in self.subs if s.channel == channel]
            wait_caught_up(subs, publisher, 30)
            reports[channel] = delivery_report(subs, publisher)
        return reports

    def stop(self) -> None:
        for publisher in self.publishers.values():
            publisher.stop()
        if self.swarm.ident is not None:
            self.swarm.stop()


def hub_connections(cluster: LocalRedisCluster) -> dict[int, int]:
    """master port -> connections named by a hub (any process)."""
    return {
        port: sum(c["name"].startswith("offload-hub-") for c in cluster.node(port).client_list())
        for port in cluster.master_ports()
    }


def check_failover(report: DeliveryReport, publisher: Publisher, new_master: redis.Redis) -> str:
    """Replication is asynchronous: a message the dead master acknowledged may be gone. What
    the new master's history holds must arrive once, in order; nothing else may arrive.
    Returns the figures."""
    assert not (report.duplicates or report.unexpected or report.disorder), report.summary()
    retained = {parse_id(mid.decode()) for mid, _ in new_master.xrange(history_key(publisher.channel), "-", "+")}
    lost = {i for ids in report.missing.values() for i in ids}
    assert not lost & retained, f"lost ids that history holds: {sorted(lost & retained)[:5]}; {report.summary()}"
    assert report.acked > 20
    return (
        f"{len(lost)} acknowledged ids lost with the old master; "
        f"'recovered: false' in {len(report.unrecovered)} of {report.subscribers} subscribers; "
        f"publishes refused {len(publisher.refused)}, uncertain {len(publisher.uncertain)}; {report.summary()}"
    )


def test_websockets_receive_every_shard_through_one_connection_per_master_per_worker(cluster, cluster_server):
    load = Load(cluster_server, channels_on_every_shard(cluster, "public:spread"))
    try:
        time.sleep(1.5)
        reports = load.finish()
    finally:
        load.stop()
    for channel, report in reports.items():
        assert report.ok and report.acked > 20, f"{channel}: {report.summary()}"
    assert hub_connections(cluster) == {port: 2 for port in cluster.master_ports()}  # WORKERS=2
    check_log(cluster_server)


def test_a_slot_migrated_under_live_clients_loses_nothing(cluster, cluster_server):
    channels = channels_on_every_shard(cluster, "public:migrating")
    moving = channels[0]
    slot = key_slot(pubsub_channel(moving).encode())
    load = Load(cluster_server, channels)
    try:
        time.sleep(0.5)
        source = cluster.master_of_slot(slot)
        keys = cluster.migrate_slot(slot, next(p for p in cluster.master_ports() if p != source))
        time.sleep(1.5)
        reports = load.finish()
    finally:
        load.stop()
    assert keys >= 1, "the history stream moved with its slot"
    for channel, report in reports.items():
        assert report.ok and not report.unrecovered, f"{channel}: {report.summary()}"
    # the clients kept their sockets: the hub re-synced them from history
    assert all(s.connects == 1 for s in load.subs)
    assert hub_connections(cluster) == {port: 2 for port in cluster.master_ports()}
    check_log(cluster_server)


def test_a_master_killed_under_live_clients_fails_over_and_resyncs_from_history(cluster, cluster_server):
    channels = channels_on_every_shard(cluster, "public:failover")
    victim_channel = channels[0]
    load = Load(cluster_server, channels)
    try:
        time.sleep(0.5)
        victim = cluster.master_of_slot(key_slot(pubsub_channel(victim_channel).encode()))
        killed_at = time.monotonic()
        promoted = cluster.kill_master(victim)
        failover_seconds = time.monotonic() - killed_at
        time.sleep(1.5)
        reports = load.finish()
    finally:
        load.stop()
    for channel in channels[1:]:
        assert reports[channel].ok, f"{channel}: {reports[channel].summary()}"  # other shards: untouched
    figures = check_failover(reports[victim_channel], load.publishers[victim_channel], cluster.node(promoted))
    print(f"\ncluster failover: replica promoted {failover_seconds:.1f} s after the SIGKILL; {figures}")
    cluster.restart(victim)
    check_log(cluster_server)


# -- Sentinel --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel():
    sentinel = LocalRedisSentinel().start()
    yield sentinel
    sentinel.stop()


@pytest.fixture
def sentinel_hub(sentinel):
    yield from started_hub(sentinel.url, lambda h: h.connected)


@pytest.mark.parametrize("kill", [False, True], ids=["sentinel-failover", "master-killed"])
def test_sentinel_failover_moves_the_hub_to_the_new_master(sentinel, sentinel_hub, kill):
    """The hub's one connection follows the master the sentinels name: its channels are
    lost at the failover, then ready again on the new master, where messages reach it."""
    channels = ["public:s1", "public:s2"]
    recorder = Recorder()
    for channel in channels:
        sentinel_hub.subscribe(recorder, channel)
    wait_until(lambda: all(sentinel_hub.is_ready(c) for c in channels))
    old = sentinel.master_port()
    sentinel.node(old).publish(pubsub_channel(channels[0]), "1-0 {}")
    wait_until(lambda: recorder.ids.get(channels[0]) == [(1, 0)])

    new = sentinel.failover(kill=kill)

    wait_until(lambda: all(recorder.count("lost", c) == 1 for c in channels), 20)
    wait_until(lambda: all(sentinel_hub.is_ready(c) for c in channels), 20)
    pubsub = sentinel.node(new).client_list(_type="pubsub")
    assert len([c for c in pubsub if not c["name"].startswith("sentinel-")]) == 1  # the hub; the rest: sentinels
    sentinel.node(new).publish(pubsub_channel(channels[0]), "2-0 {}")
    sentinel.node(new).publish(pubsub_channel(channels[1]), "1-0 {}")
    wait_until(lambda: recorder.ids.get(channels[0]) == [(1, 0), (2, 0)] and recorder.ids.get(channels[1]) == [(1, 0)])
    if kill:
        sentinel.restart(old)  # back as a replica, for whatever runs next


@pytest.fixture(scope="module")
def sentinel_server(sentinel, tmp_path_factory):
    yield from live_server(tmp_path_factory, sentinel.url)


def test_a_sentinel_failover_under_live_clients_resyncs_them_from_history(sentinel, sentinel_server):
    channel = "public:sentinel-live"
    load = Load(sentinel_server, [channel], per_channel=16)
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        old = sentinel.master_port()
        new = sentinel.failover(kill=True)
        failover_seconds = time.monotonic() - killed_at
        time.sleep(1.5)
        reports = load.finish()
    finally:
        load.stop()
    figures = check_failover(reports[channel], load.publishers[channel], sentinel.node(new))
    print(f"\nsentinel failover: replica promoted {failover_seconds:.1f} s after the SIGKILL; {figures}")
    assert all(s.connects == 1 for s in load.subs)  # the hub re-synced them: no reconnect
    sentinel.restart(old)
    check_log(sentinel_server)
