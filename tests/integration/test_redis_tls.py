"""``rediss+cluster://`` and ``rediss+sentinel://`` against real servers that speak only TLS.

The nodes (and the Cluster bus, and replication) use a throwaway CA that
only the URL's ``?ssl_ca_certs=`` makes trusted. Each topology serves the
demo on a real uWSGI: a message published from the test process reaches a
websocket through the hub, and a resume reads history, all over TLS. A plain
connection to a node is refused, so nothing took a plain path by accident.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

import offload
from offload.backend import redis_client
from offload.backend.redis_client import history_key
from offload.testing import LocalRedisCluster, LocalRedisSentinel, use_redis
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["cluster", "sentinel"])
def topology(request) -> Iterator[LocalRedisCluster | LocalRedisSentinel]:
    servers = LocalRedisCluster(replicas=0, tls=True) if request.param == "cluster" else LocalRedisSentinel(tls=True)
    servers.start()
    try:
        with use_redis(servers.url):
            yield servers
    finally:
        servers.stop()


def data_ports(servers: LocalRedisCluster | LocalRedisSentinel) -> list[int]:
    return servers.ports if isinstance(servers, LocalRedisCluster) else servers.data_ports


def test_the_url_carries_tls_and_its_ca(topology):
    assert topology.url.startswith("rediss+") and "?ssl_ca_certs=" in topology.url
    assert redis_client.target().ssl


def test_a_node_refuses_a_plain_connection(topology):
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=data_ports(topology)[0], socket_timeout=2, socket_connect_timeout=2).ping()


def test_publish_history_and_live_delivery_over_tls(topology, tmp_path_factory):
    channel = f"public:tls-{uuid.uuid4().hex[:8]}"
    first = offload.publish(channel, "before")
    server = DemoServer(tmp_path_factory.mktemp("tls-var"), redis_url=topology.url).prepare().start()
    try:
        ws = server.websocket(f"/ws/?channel={channel}&since=0-0")
        try:
            subscribed = json.loads(ws.recv())
            assert subscribed["type"] == "subscribed", subscribed
            replayed = json.loads(ws.recv())
            assert (replayed["id"], replayed["data"]) == (first, "before")  # history, read over TLS
            second = offload.publish(channel, "live")
            delivered = json.loads(ws.recv())
            assert (delivered["id"], delivered["data"]) == (second, "live")  # the hub's TLS subscription
        finally:
            ws.close()
    finally:
        server.stop()
    key = history_key(channel)
    if isinstance(topology, LocalRedisCluster):
        owner = topology.master_of_slot(topology.keyslot(key))
    else:
        owner = topology.master_port()
    assert topology.node(owner).xlen(key) == 2  # on the node that owns it, read over TLS
