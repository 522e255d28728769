"""Redis connections: one pooled client per process, and key naming.

The pool is created lazily and re-created after ``fork()`` (uWSGI loads the
app in the master and forks workers), so no socket is ever shared between
processes. It is a *blocking* pool: when every connection is busy, callers
wait up to the timeout instead of failing with ``MaxConnectionsError``.
Retries are limited to one immediate retry, so that a Redis outage makes
``publish`` fail fast instead of backing off for seconds.
"""

from __future__ import annotations

import os
import threading

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import conf

__all__ = ["REDIS_ERRORS", "channel_of", "get_client", "history_key", "new_client", "pubsub_channel"]

#: What a Redis outage raises; callers turn it into BackendUnavailable.
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError)

_lock = threading.Lock()
_client: redis.Redis | None = None
_client_pid: int | None = None


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
    """The process-wide pooled client for publish and history reads."""
    global _client, _client_pid
    pid = os.getpid()
    if _client is None or _client_pid != pid:
        with _lock:
            if _client is None or _client_pid != pid:
                _client = new_client(conf.get("OFFLOAD_REDIS_POOL_SIZE"))
                _client_pid = pid
    return _client


_scripts: dict[tuple[int, str], object] = {}


def script(name: str):
    """The Lua script ``offload/lua/<name>.lua``, registered once per client.

    redis-py runs it with EVALSHA and loads it again if Redis forgot it
    (e.g. after a restart).
    """
    client = get_client()
    key = (id(client), name)
    found = _scripts.get(key)
    if found is None:
        from importlib.resources import files

        source = files("offload.backend").joinpath(f"lua/{name}.lua").read_text()
        if len(_scripts) > 16:
            _scripts.clear()
        found = _scripts[key] = client.register_script(source)
    return found


def reset() -> None:
    """Drop the process-wide client (tests that change the Redis URL)."""
    global _client
    with _lock:
        if _client is not None:
            _client.connection_pool.disconnect()
        _client = None


def history_key(channel: str) -> str:
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}h:{channel}"


def pubsub_channel(channel: str) -> str:
    return f"{conf.get('OFFLOAD_REDIS_PREFIX')}c:{channel}"


def channel_of(pubsub_name: bytes | str) -> str:
    """Inverse of :func:`pubsub_channel`."""
    if isinstance(pubsub_name, bytes):
        pubsub_name = pubsub_name.decode()
    return pubsub_name[len(conf.get("OFFLOAD_REDIS_PREFIX")) + 2 :]
