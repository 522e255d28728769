"""Client sockets taken over from uWSGI: one detach path for every transport.

A websocket or an event stream outlives its uWSGI request: the transport
keeps a duplicate of the client's fd and the request ends, freeing its async
core. An open socket then costs only its Python objects (docs/performance.md
has the measured figure), and ``CORES`` bounds concurrent requests rather
than open sockets.
"""

from __future__ import annotations

import _socket
import ctypes
import socket

import gevent
from gevent.monkey import get_original

__all__ = ["close_now", "cork", "detach", "no_delay", "shutdown_write"]

_close = get_original("os", "close")
_EPOLL_CTL_DEL = 2
try:
    _epoll_ctl = ctypes.CDLL(None, use_errno=True).epoll_ctl
    _epoll_ctl.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
except AttributeError:  # no epoll (not Linux): the event loop's backend forgets a closed fd itself
    _epoll_ctl = None


def _borrow(fd: int) -> _socket.socket:
    """A socket object over ``fd``, only for ``setsockopt``/``shutdown`` (``detach()`` it after).

    The plain C type (gevent's cooperative class would set up watchers), with
    the family and type given: guessed, they cost three system calls per
    socket (getsockname, two getsockopt), and the options set here do not
    depend on them.
    """
    return _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)


def detach(fd: int) -> int:
    """A duplicate of the client socket ``fd`` that the caller owns. uWSGI
    closes ``fd`` itself when its request ends; the TCP connection stays open
    through the duplicate. Set its options with :func:`no_delay` and
    :func:`cork` (on either fd: they share the socket)."""
    duplicate = _socket.dup(fd)
    _unregister(fd)
    return duplicate


def _unregister(fd: int) -> None:
    """Take uWSGI's ``fd`` out of the event loop's epoll set while it still names the socket.

    uWSGI waited for the request on ``fd`` with a gevent watcher, so libev put
    it in its epoll set, and libev never takes an fd out when a watcher stops
    (it counts on the close). But epoll holds open files, not fd numbers: the
    duplicate keeps the socket, and with it the registration, alive after
    uWSGI's close. The client's first frame then woke that registration too;
    libev saw an fd number that was closed or reused and rebuilt its whole
    epoll set, one system call per open socket. Measured: with 5,000 open
    websockets, a connect whose client sent one frame cost 16.5 ms of worker
    CPU instead of 1.2 ms.
    """
    epoll_fd = gevent.get_hub().loop.fileno() if _epoll_ctl is not None else None
    if epoll_fd is not None:  # ENOENT (another backend's fd, or never watched) needs nothing
        _epoll_ctl(epoll_fd, _EPOLL_CTL_DEL, fd, None)


def no_delay(fd: int) -> None:
    """TCP_NODELAY: frames and events go out as they are written, with no
    Nagle delay behind a small pong. Setting it also sends whatever a
    :func:`cork` holds, so a corked socket gets it first."""
    _set_tcp(fd, socket.TCP_NODELAY, 1)


def cork(fd: int, on: bool) -> None:
    """Hold (``on``) or release what is written to ``fd`` (TCP_CORK).

    A websocket's 101 and its first frames (``subscribed``) then leave in one
    segment: one transmit and one wake-up of the client instead of two. The
    kernel sends held bytes after 200 ms at the latest; closing sends them too.
    """
    _set_tcp(fd, socket.TCP_CORK, 1 if on else 0)


def _set_tcp(fd: int, option: int, value: int) -> None:
    sock = _borrow(fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:  # not TCP (a unix socket behind a proxy), or closed: nothing to tune
        pass
    finally:
        sock.detach()


def close_now(fd: int) -> None:
    """Close a detached fd at once, our watchers on it being stopped already.

    gevent's monkey-patched ``os.close`` defers the close to the event loop's
    next iteration, which on an idle worker may be long after: the client
    would wait for the TCP connection to end.
    """
    _close(fd)


def shutdown_write(fd: int) -> None:
    """Send FIN (no more data from us), keeping the fd open for reading."""
    sock = _borrow(fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()
