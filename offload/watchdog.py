"""A bound on the total time a client may take to send its request headers (slowloris).

Theory of operation
-------------------
uWSGI's gevent plugin gives every accepted connection an async core and a
greenlet, ``gevent.spawn(uwsgi_gevent_request, <struct wsgi_request *>)``,
which loops "wait until the fd is readable (at most ``socket-timeout``), parse
what arrived" until the headers are complete, then calls the WSGI app.
``socket-timeout`` bounds each wait, not the loop: a client that sends one
header byte every few seconds holds the core for as long as it likes (up to
``buffer-size`` bytes at one per 29 s: days), and a few thousand such clients
hold every core of a worker. Plain HTTP has no per-IP cap in front of us.

The bound is kept here, with no help from uWSGI's C code:

* **Birth.** At application load (in the master, before the fork: no
  ``lazy-apps``) :func:`install` replaces ``gevent.spawn`` in the gevent
  module. Each worker's gevent loop looks ``spawn`` up in that module after
  the fork, so every request greenlet is spawned through
  :func:`_tracking_spawn`, which remembers it with the loop's cached time (no
  system call) and the ``struct wsgi_request`` address uWSGI passes it.
* **Headers complete.** :func:`reached_app` (the first line of
  ``OffloadWSGIHandler.__call__``) forgets the current greenlet: uWSGI calls
  the app only once the headers are in. Websockets and event streams pass
  there too, so the long-lived sockets are never tracked.
* **Sweep.** Once per ``min(1 s, timeout / 4)`` a watchdog greenlet per worker
  (started by the worker's first request) forgets the dead greenlets (uWSGI
  answered without Python: a static file, handed to an offload thread, or a
  malformed request) and, for each live one older than the timeout, reads the
  fd from the request struct (``int fd`` is its first field) and shuts the
  socket down. uWSGI's pending read then returns EOF, and uWSGI itself closes
  the fd and frees the core, as for any client that hangs up. The fd is never
  closed here (uWSGI owns it). Nothing is sent: like nginx on
  ``client_header_timeout``, the connection is just closed.

Why the fd is still the request's when it is read: a tracked greenlet that is
not dead has not finished ``uwsgi_close_request`` (which runs without
switching greenlets before the greenlet returns), and the watchdog runs
between switches.

The pure bookkeeping (:class:`HeaderDeadlines`) takes the time as an argument
and is tested without uWSGI (tests/test_watchdog.py); the uWSGI, gevent and
ctypes edge below it is the rest of this module. Measured figures and how many
slow connections one worker survives: docs/security.md.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["HeaderDeadlines", "Overdue", "install", "reached_app"]

log = logging.getLogger("offload.watchdog")

#: ``__name__`` of the C function uWSGI's gevent plugin spawns for each connection.
REQUEST_FUNCTION = "uwsgi_gevent_request"
_MAX_PEERS_LOGGED = 5  # peers named in one warning line (the rest are counted)


@dataclass(frozen=True)
class Overdue:
    """A request still reading its headers after the timeout."""

    key: Hashable  # the request's greenlet
    token: int  # the address of uWSGI's ``struct wsgi_request``
    age: float  # seconds since it was accepted


class HeaderDeadlines:
    """Which requests are still reading their headers, and since when.

    Pure bookkeeping, with the clock injected: :meth:`start` when uWSGI spawns
    a request, :meth:`reached_app` when it reaches the app, :meth:`sweep` now
    and then to learn which are overdue. A request is reported once, then
    forgotten. ``pending`` is public so that the hot paths can bind its
    methods directly (one dict operation per request, no method call).
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pending: dict[Hashable, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def start(self, key: Hashable, token: int, now: float) -> None:
        """Request ``key`` (uWSGI's ``token``) was accepted at ``now``."""
        self.pending[key] = (now, token)

    def reached_app(self, key: Hashable) -> None:
        """Request ``key`` has its headers (a no-op if it was not tracked)."""
        self.pending.pop(key, None)

    def sweep(self, now: float, is_dead: Callable[[Any], bool]) -> list[Overdue]:
        """Forget the finished requests; return (and forget) the overdue ones, oldest first.

        Args:
            now: the current time, on the clock given to :meth:`start`.
            is_dead: tells whether a request has ended (its greenlet is dead).
        """
        limit = now - self.timeout
        done: list[Hashable] = []
        overdue: list[Overdue] = []
        for key, (since, token) in self.pending.items():
            if is_dead(key):
                done.append(key)
            elif since <= limit:
                done.append(key)
                overdue.append(Overdue(key, token, now - since))
        for key in done:
            del self.pending[key]
        return overdue


# -- the uWSGI / gevent edge ------------------------------------------------------------

_deadlines = HeaderDeadlines(10.0)
_forget = _deadlines.pending.pop
_getcurrent: Callable[[], Any] = lambda: None  # noqa: E731  (greenlet.getcurrent once installed)


def reached_app() -> None:
    """The current request reached the WSGI app: its headers are complete.

    Called first thing for every request, so it is one dict operation. Outside
    uWSGI, or before :func:`install`, nothing is tracked and it does nothing.
    """
    _forget(_getcurrent(), None)


class _Worker:
    """What a worker learns at its first request (after the fork)."""

    request_function: Any = None  # the C function uWSGI spawns per connection
    loop: Any = None  # the worker's gevent loop (its cached ``now()``)
    watchdog: Any = None  # the sweeping greenlet


def install(timeout: float) -> bool:
    """Bound the header read of every request to ``timeout`` seconds, under uWSGI + gevent.

    Call it at application load (``offload.wsgi.get_wsgi_application`` does,
    with ``OFFLOAD_HEADER_TIMEOUT``), before uWSGI's gevent loop starts.

    Returns:
        True if installed. False outside uWSGI's gevent loop engine, for a
        ``timeout`` of 0 or None (disabled), and without offload threads:
        uWSGI then sends static files from the request's own core before
        Python ever sees it, and a slow download would be cut.
    """
    try:
        import uwsgi
    except ImportError:
        return False
    if not timeout or timeout <= 0 or not uwsgi.opt.get("gevent"):
        return False
    if not _int_option(uwsgi.opt.get("offload-threads")):
        log.warning(
            "OFFLOAD_HEADER_TIMEOUT is not enforced: without offload-threads uWSGI sends static files "
            "from the request's core, and slow downloads would be cut"
        )
        return False
    import gevent
    from greenlet import getcurrent

    global _getcurrent
    _deadlines.timeout = float(timeout)
    if getattr(gevent.spawn, "_offload_original", None) is None:
        gevent.spawn = _tracking_spawn(gevent.spawn)
    _getcurrent = getcurrent
    return True


def _int_option(value: Any) -> int:
    """An integer uWSGI option from ``uwsgi.opt`` (bytes, a list of them when repeated, or True)."""
    if isinstance(value, list):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _tracking_spawn(original: Callable) -> Callable:
    """``gevent.spawn`` that remembers uWSGI's request greenlets with their start time.

    A hot path (every connection and every ``gevent.spawn`` of the worker): an
    identity test for other spawns, a cached clock read and one dict write for
    requests.
    """
    pending = _deadlines.pending

    def spawn(function, *args, **kwargs):
        greenlet = original(function, *args, **kwargs)
        if function is _Worker.request_function:
            pending[greenlet] = (_Worker.loop.now(), args[0])
        elif _Worker.request_function is None and getattr(function, "__name__", None) == REQUEST_FUNCTION:
            _start_worker(original, function)
            pending[greenlet] = (_Worker.loop.now(), args[0])
        return greenlet

    spawn._offload_original = original  # type: ignore[attr-defined]
    spawn.__doc__ = original.__doc__
    return spawn


def _start_worker(original: Callable, function: Any) -> None:
    """The worker's first request: learn the function and loop, start the watchdog."""
    import gevent

    _Worker.request_function = function
    _Worker.loop = gevent.get_hub().loop
    _Worker.watchdog = original(_watch, min(1.0, _deadlines.timeout / 4))


def _watch(interval: float) -> None:
    """The watchdog greenlet: sweep every ``interval`` seconds, for the worker's life."""
    import gevent

    while True:
        gevent.sleep(interval)
        try:
            overdue = _deadlines.sweep(_Worker.loop.now(), _is_dead)
            if overdue:
                _cut_all(overdue)
        except Exception:  # never let the watchdog die
            log.exception("header timeout watchdog failed")


def _is_dead(greenlet: Any) -> bool:
    return greenlet.dead


def _cut_all(overdue: list[Overdue]) -> None:
    """Shut the overdue connections down; one warning line per sweep (at most one per second)."""
    peers = [_cut(item.token) for item in overdue]
    named = ", ".join(p for p in peers[:_MAX_PEERS_LOGGED] if p)
    more = f" and {len(peers) - _MAX_PEERS_LOGGED} more" if len(peers) > _MAX_PEERS_LOGGED else ""
    log.warning(
        "closed %d connection(s) that did not send their request headers within %g s (slowloris?): %s%s",
        len(peers),
        _deadlines.timeout,
        named or "?",
        more,
    )


def _cut(token: int) -> str:
    """``shutdown(SHUT_RDWR)`` the connection of uWSGI's request struct at ``token``; its peer.

    The unpatched ``_socket`` module: a gevent socket would create watchers.
    ``detach()``, never ``close()``: uWSGI closes the fd when its read ends.
    """
    import _socket

    fd = ctypes.c_int.from_address(token).value
    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return ""
    try:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        sock.shutdown(_socket.SHUT_RDWR)
    except OSError:
        return ""
    finally:
        sock.detach()
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")
