"""May a new client be sent to this worker, as far as Redis goes? (``/readyz``)

With one Redis, or the master Sentinel names, the answer is yes only when
Redis answers and the worker's hub is subscribed: a socket accepted
otherwise would get no messages.

In a Cluster, one shard failing over takes seconds and every worker of every
instance sees it at once. Answering 503 then would take every instance out
of the load balancer together and turn one shard's outage into the whole
site's, while the other shards' channels still work. So a Cluster worker is
ready while some master answers and some hub link is subscribed; the shards
that are down are named in the answer as ``degraded``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from .. import conf
from .hub import Hub
from .redis_client import REDIS_ERRORS, get_client, topology

__all__ = ["RedisHealth", "ping_redis", "redis_health"]


@dataclass(frozen=True)
class RedisHealth:
    unready: str | None  # why no new client should come here, or None
    degraded: str | None = None  # what is down while the worker stays ready (Cluster only)


def redis_health(hub: Hub, sleep: Callable[[float], None] = gevent.sleep) -> RedisHealth:
    """Ping Redis, then wait (yielding, up to ``OFFLOAD_REDIS_TIMEOUT``) for the hub to subscribe.

    The wait is for a worker that has just started: its hub connects within
    milliseconds of the first ping, and a 503 then would take a healthy
    worker out of the balancer for nothing.
    """
    unreachable, down = ping_redis()
    if unreachable:
        return RedisHealth(unreachable)
    if topology() != "cluster":
        if not _wait(lambda: hub.connected, sleep):
            return RedisHealth("hub: not subscribed to Redis yet")
        return RedisHealth(None)
    if not _wait(lambda: any(link.connected for link in hub.links), sleep):
        return RedisHealth("hub: not subscribed to any Cluster master yet")
    unsubscribed = [link.name for link in hub.links if not link.connected]
    if not down and not unsubscribed:
        return RedisHealth(None)
    parts = [f"masters not answering: {', '.join(down)}"] if down else []
    if unsubscribed:
        parts.append(f"hub links reconnecting: {', '.join(unsubscribed)}")
    return RedisHealth(None, "; ".join(parts))


def ping_redis() -> tuple[str | None, list[str]]:
    """``(why Redis is unusable or None, the Cluster masters that did not answer)``.

    A Cluster is usable while one master answers (redis-py's plain ``ping``
    asks every node and fails with any one of them).
    """
    client = get_client()
    if topology() != "cluster":
        try:
            client.ping()
        except REDIS_ERRORS as exc:
            return f"redis: {exc}", []
        return None, []
    masters = client.get_primaries()
    down = []
    for node in masters:
        try:
            client.ping(target_nodes=node)
        except REDIS_ERRORS:
            down.append(node.name)
    if len(down) == len(masters):
        return f"redis: no Cluster master answers ({', '.join(down) or 'none known'})", down
    return None, down


def _wait(condition: Callable[[], bool], sleep: Callable[[float], None]) -> bool:
    deadline = time.monotonic() + conf.get("OFFLOAD_REDIS_TIMEOUT")
    while not condition() and time.monotonic() < deadline:
        sleep(0.01)
    return condition()
