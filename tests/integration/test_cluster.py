"""offload's Redis layer on a real Redis Cluster (three masters, three replicas).

Publish, history and resume, per-IP slots and presence, through the library's
own client made from ``redis+cluster://``; the raw node clients only look at
where things landed. The hub's sharded subscriptions are tested in
test_cluster_hub.py. The failover test kills a master: it runs last and
restarts the node (it rejoins as a replica).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

import offload
from offload.backend import presence_store, redis_client
from offload.backend.history import read_after
from offload.backend.redis_client import history_key, publish_token_key, pubsub_channel, script
from offload.backend.slots import ConnectionSlots
from offload.core.protocol import parse_stream_id
from offload.testing import LocalRedisCluster, use_redis, wait_for

#: channels spread over the three masters (CHANNELS[i] hashes to a different slot for each i)
CHANNELS = [f"public:spread-{n}" for n in range(12)]

DURABLE = {"subscribe": "public", "publish": False, "history_size": 1_000_000, "history_ttl": 3600}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster().start()
    try:
        # a history long enough that nothing a test publishes is trimmed
        with use_redis(cluster.url, {"durable": DURABLE}):
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh(cluster: LocalRedisCluster) -> LocalRedisCluster:
    cluster.flushall()
    return cluster


def test_the_library_client_is_a_cluster_client(fresh):
    import redis

    assert redis_client.topology() == "cluster"
    assert isinstance(redis_client.get_client(), redis.RedisCluster)


def test_publish_and_resume_across_slots_on_every_master(fresh):
    ids = {channel: [offload.publish(channel, {"n": n, "c": channel}) for n in range(5)] for channel in CHANNELS}
    owners = {fresh.master_of_slot(fresh.keyslot(history_key(channel))) for channel in CHANNELS}
    assert owners == set(fresh.master_ports()), "the channels span every shard"
    for channel, sent in ids.items():
        entries, recovered = read_after(channel, parse_stream_id(sent[1]), 100)
        assert recovered
        assert [(mid, json.loads(data)) for mid, data in entries] == [
            (sent[n], {"n": n, "c": channel}) for n in (2, 3, 4)
        ]


def test_a_publish_touches_one_shard_and_goes_out_with_spublish_there_only(fresh):
    channel = CHANNELS[0]
    slot = fresh.keyslot(history_key(channel))
    assert {fresh.keyslot(k) for k in (pubsub_channel(channel), publish_token_key(channel, "x"))} == {slot}
    owner = fresh.master_of_slot(slot)
    sharded = fresh.node(owner).pubsub()
    sharded.ssubscribe(pubsub_channel(channel))
    classic = {port: fresh.node(port).pubsub() for port in fresh.master_ports()}
    for pubsub in classic.values():
        pubsub.subscribe(pubsub_channel(channel))
    wait_for(lambda: sharded.get_message(timeout=0.1), 5, "ssubscribe confirmed")
    for pubsub in classic.values():
        wait_for(lambda pubsub=pubsub: pubsub.get_message(timeout=0.1), 5, "subscribe confirmed")

    message_id = offload.publish(channel, "hello")
    got = wait_for(lambda: sharded.get_message(timeout=0.1), 5, "the sharded message")
    assert got["type"] == "smessage" and got["data"] == f'{message_id} "hello"'.encode()
    assert all(p.get_message(timeout=0.3) is None for p in classic.values()), "no classic PUBLISH anywhere"
    holders = [port for port in fresh.master_ports() if fresh.node(port).dbsize()]
    assert holders == [owner], "the history and the token key live on the channel's shard only"
    assert fresh.node(owner).xlen(history_key(channel)) == 1


def test_a_retried_publish_call_on_a_shard_returns_the_first_id(fresh):
    channel = CHANNELS[1]
    publish = script("publish")
    keys = [history_key(channel), publish_token_key(channel, "same-call")]
    args = [pubsub_channel(channel), '"x"', 100, 3600, 1]
    first = publish(keys=keys, args=args)
    assert publish(keys=keys, args=args) == first
    assert redis_client.get_client().xlen(history_key(channel)) == 1


def test_connection_slots_cap_each_ip_on_its_own_shard(fresh):
    ips = [f"10.9.0.{n}" for n in range(6)]
    for ip in ips:
        slots = [ConnectionSlots(ip, limit=2, stale_after=60) for _ in range(3)]
        assert [s.acquire() for s in slots] == [True, True, False]
        slots[0].release()
        assert [ConnectionSlots(ip, limit=2, stale_after=60).acquire() for _ in range(2)] == [True, False]
    keys = [ConnectionSlots(ip, 1, 60).key for ip in ips]
    assert len({fresh.master_of_slot(fresh.keyslot(k)) for k in keys}) > 1, "the IPs span shards"
    assert all(fresh.node(fresh.master_of_slot(fresh.keyslot(k))).zcard(k) == 2 for k in keys)


def test_presence_joins_counts_and_leaves_on_a_shard(fresh):
    channel = "room:cluster"
    joined = presence_store.join(channel, "lease-1", [("alice", '{"n":1}'), ("bob", '{"n":2}')], lease_ttl=30, grace=0)
    assert sorted(joined) == ["alice", "bob"]
    assert presence_store.count(channel) == 2
    page = presence_store.members(channel)
    assert sorted(m for m, _ in page.members) == ["alice", "bob"]
    assert presence_store.leave(channel, "lease-1", ["bob"], lease_ttl=30, grace=0) == ["bob"]
    assert presence_store.count(channel) == 1
    slots = {fresh.keyslot(k) for k in presence_store.presence_keys(channel)}
    assert slots == {fresh.keyslot(history_key(channel))}


def test_with_wait_replicas_a_publish_returns_once_its_shards_replica_has_it(fresh, settings):
    settings.OFFLOAD_REDIS_WAIT_REPLICAS = 1
    for channel in CHANNELS:
        message_id = offload.publish(channel, "durable")
        owner = fresh.master_of_slot(fresh.keyslot(history_key(channel)))
        (replica,) = fresh.replica_ports(owner)
        node = fresh.node(replica)
        node.execute_command("READONLY")
        assert node.xrange(history_key(channel), min=message_id, max=message_id), f"{channel} not on its replica"


def test_a_slot_migrated_under_a_live_publisher_keeps_every_acknowledged_message(fresh):
    """The client follows ASK/MOVED; a call refused mid-migration (TRYAGAIN) fails cleanly, nothing is half-done."""
    channel = "durable:migrated"
    slot = fresh.keyslot(history_key(channel))
    source = fresh.master_of_slot(slot)
    target = next(port for port in fresh.master_ports() if port != source)
    acked: list[str] = []
    errors: list[str] = []
    stopping = threading.Event()

    def publish_loop() -> None:
        n = 0
        while not stopping.is_set():
            try:
                acked.append(offload.publish(channel, n))
            except offload.OffloadError as exc:
                errors.append(exc.code or type(exc).__name__)
            n += 1

    thread = threading.Thread(target=publish_loop, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(acked) >= 50, 10, "the publisher running")
        moved = fresh.migrate_slot(slot, target)
        count = len(acked)
        wait_for(lambda: len(acked) >= count + 50, 10, "publishing after the migration")
    finally:
        stopping.set()
        thread.join(10)
    print(f"\nslot migration: {len(acked)} acknowledged, {moved} keys moved, {len(errors)} failed calls {set(errors)}")
    assert moved >= 1 and fresh.master_of_slot(slot) == target
    stored = [mid.decode() for mid, _ in fresh.node(target).xrange(history_key(channel))]
    assert stored == acked, f"{len(set(acked) - set(stored))} acknowledged missing, {len(errors)} failed calls"


def test_a_killed_master_fails_over_and_history_is_kept(fresh):
    """Everything the master acknowledged and replicated (WAIT) survives; publish works again after."""
    channel = CHANNELS[2]
    owner = fresh.master_of_slot(fresh.keyslot(history_key(channel)))
    sent = {c: [offload.publish(c, n) for n in range(20)] for c in CHANNELS}
    for port in fresh.master_ports():
        assert fresh.node(port).execute_command("WAIT", 1, 5000) >= 1
    new_owner = fresh.kill_master(owner)
    assert new_owner != owner
    try:
        after = wait_for(lambda: offload.publish(channel, "after"), 20, "a publish after the failover")
        lost = 0
        for c, ids in sent.items():
            stored = [mid.decode() for mid, _ in redis_client.get_client().xrange(history_key(c))]
            lost += len(set(ids) - set(stored))
        assert lost == 0, f"{lost} replicated messages lost in the failover"
        entries, recovered = read_after(channel, parse_stream_id(sent[channel][-1]), 10)
        assert recovered and [mid for mid, _ in entries] == [after]
    finally:
        fresh.restart(owner)
