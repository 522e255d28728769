"""offload's Redis layer behind Sentinel (one master, one replica, three sentinels): a failover under a live publisher.

Redis replication is asynchronous: the master acknowledges a publish before
its replica has it, so killing the master can lose the last acknowledged
messages. This test measures how many (and the publisher's outage), prints
the figures, and checks what must hold whatever the figure: publishing works
again on the new master, every message acknowledged after the failover is
kept, and a resume from a lost message says ``recovered: false``.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

import offload
from offload.backend import redis_client
from offload.backend.history import read_after
from offload.backend.redis_client import history_key
from offload.core.protocol import parse_stream_id
from offload.testing import LocalRedisSentinel, use_redis, wait_for
from tests.integration.demo import DemoServer

CHANNEL = "durable:failover"

DURABLE = {"subscribe": "public", "publish": False, "history_size": 1_000_000, "history_ttl": 3600}


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalRedisSentinel]:
    sentinel = LocalRedisSentinel().start()
    try:
        # a history long enough that nothing a test publishes is trimmed
        with use_redis(sentinel.url, {"durable": DURABLE}):
            yield sentinel
    finally:
        sentinel.stop()


class Publisher(threading.Thread):
    """Publishes in a loop with offload.publish(), recording each acknowledged id and when."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.acked: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            try:
                self.acked.append((time.monotonic(), offload.publish(CHANNEL, n)))
            except offload.OffloadError as exc:
                self.errors.append((time.monotonic(), exc.code or type(exc).__name__))
                time.sleep(0.01)
            n += 1

    def acked_since(self, moment: float) -> int:
        return sum(1 for t, _ in self.acked if t > moment)


def test_the_library_follows_the_sentinels_master(sentinel):
    assert redis_client.topology() == "sentinel"
    offload.publish(CHANNEL, "hello")
    assert sentinel.node(sentinel.master_port()).xlen(history_key(CHANNEL)) >= 1


def test_wait_replicas_makes_a_publish_return_once_the_replica_has_it(sentinel, settings):
    """And measures what it costs per publish (printed)."""
    replica = sentinel.node(sentinel.replica_port())
    costs = {}
    for replicas in (0, 1):
        settings.OFFLOAD_REDIS_WAIT_REPLICAS = replicas
        started = time.perf_counter()
        ids = [offload.publish(CHANNEL, n) for n in range(300)]
        costs[replicas] = (time.perf_counter() - started) / len(ids)
        if replicas:
            missing = [mid for mid in ids if not replica.xrange(history_key(CHANNEL), min=mid, max=mid)]
            assert not missing, f"{len(missing)} returned before the replica had them"
    print(f"\npublish: {costs[0] * 1e6:.0f} µs without WAIT, {costs[1] * 1e6:.0f} µs with WAIT 1")


@pytest.mark.parametrize("replicas", [0, 1], ids=["async", "wait-1"])
def test_a_failover_under_a_live_publisher(sentinel, settings, caplog, replicas):
    settings.OFFLOAD_REDIS_WAIT_REPLICAS = replicas
    publisher = Publisher()
    publisher.start()
    try:
        wait_for(lambda: len(publisher.acked) >= 200, 10, "the publisher running")
        old_master = sentinel.master_port()
        killed_at = time.monotonic()
        new_master = sentinel.failover(kill=True)
        promoted_at = time.monotonic()
        # with WAIT, the new master has no replica until the old one is back: each publish waits the WAIT timeout
        again = 10 if replicas else 200
        wait_for(lambda: publisher.acked_since(promoted_at) >= again, 30, "publishing again on the new master")
    finally:
        publisher.stopping.set()
        publisher.join(10)
    sentinel.restart(old_master)

    acked = [mid for _, mid in publisher.acked]
    stored = {mid.decode() for mid, _ in sentinel.node(new_master).xrange(history_key(CHANNEL))}
    lost = [mid for mid in acked if mid not in stored]
    before = [mid for t, mid in publisher.acked if t <= killed_at]
    after = [mid for t, mid in publisher.acked if t > promoted_at]
    times = [t for t, _ in publisher.acked]
    outage = max(b - a for a, b in itertools.pairwise(times))
    short = sum("replicas in time" in r.getMessage() for r in caplog.records)
    print(
        f"\nsentinel failover (WAIT {replicas}): {len(acked)} acknowledged ({len(before)} before the kill), "
        f"{len(lost)} lost, "
        f"publisher outage {outage:.2f} s (kill to promotion {promoted_at - killed_at:.2f} s), "
        f"{len(publisher.errors)} failed calls: {sorted({code for _, code in publisher.errors})}"
    )
    assert after and not set(after) - stored, "everything acknowledged by the new master is kept"
    assert set(lost) <= set(before), "only what the killed master acknowledged can be lost"
    if replicas:
        assert not lost, f"{len(lost)} lost though WAIT confirmed all but {short} publishes"
    for mid in lost[-1:]:  # the newest lost id: a client resuming from it is told history has a gap
        assert read_after(CHANNEL, parse_stream_id(mid), 10)[1] is False
    if acked[-1] not in lost:
        assert read_after(CHANNEL, parse_stream_id(acked[-1]), 10) == ([], True)


def test_a_client_whose_resume_point_a_failover_lost_gets_recovered_false(sentinel, settings, tmp_path_factory):
    """The loss forced, end to end: the replica is frozen while the master acknowledges more than the
    loopback socket buffers hold for it, then the master dies. A websocket resuming from the last
    acknowledged id (gone with the master) is told ``recovered: false``, never handed a silent gap."""
    settings.OFFLOAD_REDIS_WAIT_REPLICAS = 0
    server = DemoServer(tmp_path_factory.mktemp("sentinel-var"), redis_url=sentinel.url).prepare().start()
    try:
        channel = f"public:lost-{uuid.uuid4().hex[:8]}"
        kept = offload.publish(channel, "kept")
        replica = sentinel.replica_port()
        wait_for(lambda: sentinel.node(replica).xrange(history_key(channel), min=kept, max=kept), 10, "the replica")
        sentinel.pause(replica)
        acked = [offload.publish(channel, "x" * 60_000) for _ in range(600)]  # 36 MB: beyond any socket buffer
        new_master = sentinel.failover(kill=True)
        assert new_master == replica
        stored = {mid.decode() for mid, _ in sentinel.node(new_master).xrange(history_key(channel))}
        lost = [mid for mid in acked if mid not in stored]
        print(f"\nforced loss: {len(lost)} of {len(acked)} acknowledged messages lost with the master")
        assert lost and lost[-1] == acked[-1], "the replica was frozen: the newest acknowledged messages are lost"
        again = offload.publish(channel, "after the failover")
        ws = server.websocket(f"/ws/?channel={channel}&since={acked[-1]}")
        try:
            subscribed = json.loads(ws.recv())
            assert (subscribed["type"], subscribed["recovered"]) == ("subscribed", False)
            # what the new master holds after the lost point is still delivered
            delivered = json.loads(ws.recv())
            assert (delivered["id"], delivered["data"]) == (again, "after the failover")
        finally:
            ws.close()
    finally:
        server.stop()
    sentinel.restart(sentinel.data_ports[0] if new_master == sentinel.data_ports[1] else sentinel.data_ports[1])
