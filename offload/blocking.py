"""Run blocking Django work (ORM, custom policies) off the event loop.

A websocket greenlet must not stall its worker's loop on a database query,
and must not keep a database connection open for the socket's lifetime. Such
work runs in gevent's native thread pool; the thread's database connections
are closed when the work is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_blocking"]


def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a worker thread and wait (cooperatively) for it.

    Exceptions raised by ``fn`` propagate to the caller.
    """
    import gevent

    return gevent.get_hub().threadpool.apply(_call_and_close, (fn, args))


def _call_and_close(fn: Callable[..., T], args: tuple) -> T:
    from django.db import connections

    try:
        return fn(*args)
    finally:
        connections.close_all()
