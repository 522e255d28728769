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
"""

from __future__ import annotations

import os
import sys
import threading
from importlib.resources import files

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import conf

__all__ = ["REDIS_ERRORS", "channel_of", "get_client", "history_key", "new_client", "pubsub_channel"]

#: What a Redis outage raises; callers turn it into BackendUnavailable.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)


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


def new_client(max_connections: int = 1, timeout: float | None = None, retries: int = 1) -> redis.Redis:
    """A fresh client with its own pool.

    The hub uses one with ``retries=0``: redis-py would otherwise reconnect and
    resubscribe silently, hiding the outage (and the gap in live messages)
    that the hub must report to its subscribers.
    """
    if timeout is None:
        timeout = conf.get("OFFLOAD_REDIS_TIMEOUT")
    pool = redis.BlockingConnectionPool.from_url(
        conf.get("OFFLOAD_REDIS_URL"), max_connections=max_connections, timeout=timeout, **_options(timeout, retries)
    )
    return redis.Redis(connection_pool=pool)


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
        client.connection_pool.disconnect()
    _local.key = None
    _generation += 1


def history_key(channel: str) -> str:
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}h:{channel}"


def pubsub_channel(channel: str) -> str:
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}c:{channel}"


def channel_of(pubsub_name: bytes | str) -> str:
    """Inverse of :func:`pubsub_channel`."""
    if isinstance(pubsub_name, bytes):
        pubsub_name = pubsub_name.decode()
    return pubsub_name[len(conf.get("OFFLOAD_REDIS_PREFIX")) + 2 :]
