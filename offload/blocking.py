"""Run blocking Django work (ORM, custom policies) off the event loop.

A websocket greenlet must not stall its worker's loop on a database query,
and must not keep a database connection open for the socket's lifetime. Such
work runs in gevent's native thread pool; the thread's database connections
are closed when the work is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from django.db import connections

T = TypeVar("T")

__all__ = ["run_blocking"]

log = logging.getLogger("offload.blocking")


def run_blocking(fn: Callable[..., T], *args: Any, inline_after: float | None = None) -> T:
    """Call ``fn(*args)`` in a worker thread and wait (cooperatively) for it.

    Args:
        inline_after: seconds to wait for the thread pool before running
            ``fn`` on the caller's greenlet instead (for idempotent reads:
            the pool may still run it later). On a freshly forked worker a
            task was seen stranded in gevent's pool for good (a handshake then
            waited its full timeout); a read that blocks the loop for a moment
            beats that.

    Exceptions raised by ``fn`` propagate to the caller.
    """
    pool = gevent.get_hub().threadpool
    if inline_after is None:
        return pool.apply(_call_and_close, (fn, args))
    result = pool.spawn(_call_and_close, fn, args)
    try:
        return result.get(timeout=inline_after)
    except gevent.Timeout:
        log.warning("the thread pool did not run %s within %.1f s: running it inline", fn.__name__, inline_after)
        return _call_and_close(fn, args)


def _call_and_close(fn: Callable[..., T], args: tuple) -> T:
    try:
        return fn(*args)
    finally:
        connections.close_all()
