"""Redis connections: one pooled client per process and thread, and key naming.

The pool is created lazily and re-created after ``fork()`` (uWSGI loads the
app in the master and forks workers), so no socket is ever shared between
processes. Nor between OS threads: under gevent a socket belongs to the hub
of the thread that made it, and a handler thread
(:func:`offload.blocking.handler_pool`: an RPC method that publishes) that
used the worker's connections failed with "Cannot switch to a different
thread". Each thread gets its own client (the real thread-local, not gevent's
greenlet-local one); the worker's greenlets all share the main thread's.

It is a *blocking* pool: when every connection is busy, callers
wait up to the timeout instead of failing with ``MaxConnectionsError``.
Retries are limited to one immediate retry, so that a Redis outage makes
``publish`` fail fast instead of backing off for seconds.

``OFFLOAD_REDIS_URL`` picks the topology (:mod:`.topology`): one Redis, a
Redis Cluster (``RedisCluster``, one blocking pool per node) or the master of
a Sentinel service (followed on failover). Every key and pub/sub channel of
one logical channel carries the channel as its hash tag (``offload:h:{ch}``,
``offload:c:{ch}``), so the publish script touches one slot on one shard.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from importlib.resources import files

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.retry import Retry

from .. import conf
from .topology import Kind, RedisTarget, parse_redis_url

__all__ = [
    "REDIS_ERRORS",
    "channel_of",
    "get_client",
    "history_key",
    "new_client",
    "publish_token_key",
    "pubsub_channel",
    "target",
    "topology",
]

#: What a Redis outage raises (a Cluster failing over included); callers turn it into BackendUnavailable.
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OSError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)


def _os_thread_local() -> threading.local:
    """A real per-OS-thread local (gevent's monkey-patching makes ``threading.local`` per greenlet)."""
    monkey = sys.modules.get("gevent.monkey")  # imported only where gevent patches (uWSGI workers)
    return (monkey.get_original("threading", "local") if monkey is not None else threading.local)()


#: per OS thread: ``key`` (pid, generation), ``client``, ``scripts``
_local = _os_thread_local()
_generation = 0  # bumped by reset(): every thread makes a new client


def _options(timeout: float, retries: int) -> dict:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), retries),
        "health_check_interval": 30,
    }


def target() -> RedisTarget:
    """What ``OFFLOAD_REDIS_URL`` names (parsed once per URL)."""
    return _parse(conf.get("OFFLOAD_REDIS_URL"))


def topology() -> Kind:
    """``"single"``, ``"cluster"`` or ``"sentinel"``: the hub subscribes per shard node in a Cluster."""
    return target().kind


@functools.lru_cache(maxsize=8)
def _parse(url: str) -> RedisTarget:
    return parse_redis_url(url)


class _BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels where the master is) that waits, like the others, when full."""


def new_client(max_connections: int = 1, timeout: float | None = None, retries: int = 1) -> redis.Redis:
    """A fresh client with its own pool (per node in a Cluster).

    The hub uses one with ``retries=0``: redis-py would otherwise reconnect and
    resubscribe silently, hiding the outage (and the gap in live messages)
    that the hub must report to its subscribers.

    Returns:
        a ``redis.Redis`` (one server, or a Sentinel service's master), or a
        ``redis.RedisCluster``.
    """
    if timeout is None:
        timeout = conf.get("OFFLOAD_REDIS_TIMEOUT")
    where = target()
    pooling = {"max_connections": max_connections, "timeout": timeout}
    if where.kind == "single":
        pool = redis.BlockingConnectionPool.from_url(where.url, **pooling, **_options(timeout, retries))
        return redis.Redis(connection_pool=pool)
    auth = where.connection_options()
    if where.kind == "cluster":
        options = _options(timeout, retries)
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in where.nodes],
            # one blocking pool per node; its wait bound goes in here (plain Redis() refuses ``timeout``)
            connection_pool_class=functools.partial(redis.BlockingConnectionPool, timeout=timeout),
            max_connections=max_connections,
            **auth,
            **options,
        )
    sentinel = redis.sentinel.Sentinel(
        list(where.nodes), sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout}
    )
    return sentinel.master_for(
        where.service,
        connection_pool_class=_BlockingSentinelPool,
        db=where.db,
        **pooling,
        **auth,
        **_options(timeout, retries),
    )


def get_client() -> redis.Redis:
    """This process's (and OS thread's) pooled client for publish and history reads."""
    local = _local
    key = (os.getpid(), _generation)
    if getattr(local, "key", None) != key:
        local.client = new_client(conf.get("OFFLOAD_REDIS_POOL_SIZE"))
        local.scripts = {}
        local.key = key
    return local.client


_sources: dict[str, str] = {}


def script(name: str):
    """The Lua script ``offload/lua/<name>.lua``, registered once per client.

    redis-py runs it with EVALSHA and loads it again if Redis forgot it
    (e.g. after a restart).
    """
    client = get_client()
    scripts = _local.scripts
    found = scripts.get(name)
    if found is None:
        source = _sources.get(name)
        if source is None:
            source = _sources[name] = files("offload.backend").joinpath(f"lua/{name}.lua").read_text()
        found = scripts[name] = client.register_script(source)
    return found


def reset() -> None:
    """Drop the clients (tests that change the Redis URL): every thread makes a new one."""
    global _generation
    client = getattr(_local, "client", None)
    if client is not None:
        pool = getattr(client, "connection_pool", None)  # a RedisCluster has one per node
        pool.disconnect() if pool is not None else client.close()
    _local.key = None
    _generation += 1


def history_key(channel: str) -> str:
    """The channel's history stream; the channel is the hash tag (one slot per channel)."""
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}h:{{{channel}}}"


def publish_token_key(channel: str, token: str) -> str:
    """A publish call's retry token, in its channel's slot (the publish script touches both)."""
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}pub:{{{channel}}}:{token}"


def pubsub_channel(channel: str) -> str:
    """The channel's Redis pub/sub channel, tagged like its keys (SPUBLISH in a Cluster stays on its shard)."""
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}c:{{{channel}}}"


def channel_of(pubsub_name: bytes | str) -> str:
    """Inverse of :func:`pubsub_channel`."""
    if isinstance(pubsub_name, bytes):
        pubsub_name = pubsub_name.decode()
    return pubsub_name[len(conf.get("OFFLOAD_REDIS_PREFIX")) + 3 : -1]
