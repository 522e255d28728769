"""Run blocking Django work (ORM, custom policies) off the event loop.

A websocket greenlet must not stall its worker's loop on a database query,
and must not keep a database connection open for the socket's lifetime. Such
work runs in gevent's native thread pool; the thread's database connections
are closed when the work is done.

The project's own handlers (RPC methods, publish hooks, lifecycle signal
receivers: :mod:`offload.handlers`) run in a second pool,
:func:`handler_pool`: gevent's pool also resolves the user of every
handshake (``offload.views.resolve_identity``), and ten slow handlers would
otherwise hold all ten of its threads while connects wait (measured:
``tests/integration/test_handlers.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from django.db import connections
from gevent.threadpool import ThreadPool

from . import conf

T = TypeVar("T")

__all__ = ["handler_pool", "run_blocking"]

log = logging.getLogger("offload.blocking")


def run_blocking(fn: Callable[..., T], *args: Any, inline_after: float | None = None) -> T:
    """Call ``fn(*args)`` in a worker thread and wait (cooperatively) for it.

    Args:
        inline_after: seconds to wait for the thread pool before running
            ``fn`` on the caller's greenlet instead (for idempotent reads:
            the pool may still run it later). A task stuck in the pool would
            otherwise hold its caller for good: the first session lookups of a
            fresh worker did, importing a module in several threads at once
            (:func:`offload.views.preload_identity_modules`); a read that
            blocks the loop for a moment beats that.

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


_handler_pool: ThreadPool | None = None
_handler_pool_pid: int | None = None


def handler_pool() -> ThreadPool:
    """This process's pool for the project's handlers (``OFFLOAD_HANDLER_THREADS`` threads).

    Made on first use in each process (uWSGI forks workers from the master).
    Its ``spawn`` waits for a free thread: call it from a greenlet that may
    wait (under a timeout), never from a connection's own.
    """
    global _handler_pool, _handler_pool_pid
    if _handler_pool is None or _handler_pool_pid != os.getpid():
        _handler_pool = ThreadPool(conf.get("OFFLOAD_HANDLER_THREADS"))
        _handler_pool_pid = os.getpid()
    return _handler_pool
