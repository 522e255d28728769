"""Client sockets taken over from uWSGI: one detach path for every transport.

A websocket or an event stream outlives its uWSGI request: the transport
keeps a duplicate of the client's fd and the request ends, freeing its async
core. An open socket then costs only its Python objects (docs/performance.md
has the measured figure), and ``CORES`` bounds concurrent requests rather
than open sockets.
"""

from __future__ import annotations

import _socket
import socket

from gevent.monkey import get_original

__all__ = ["close_now", "detach", "shutdown_write"]

_close = get_original("os", "close")


def detach(fd: int) -> int:
    """A duplicate of the client socket ``fd`` that the caller owns, with
    TCP_NODELAY (frames and events go out as they are written: no Nagle delay
    behind a small pong). uWSGI closes ``fd`` itself when its request ends;
    the TCP connection stays open through the duplicate."""
    # The plain C socket type: gevent's cooperative class would set up
    # watchers this fd never uses (it is only borrowed for setsockopt).
    sock = _socket.socket(fileno=_socket.dup(fd))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock.detach()


def close_now(fd: int) -> None:
    """Close a detached fd at once, our watchers on it being stopped already.

    gevent's monkey-patched ``os.close`` defers the close to the event loop's
    next iteration, which on an idle worker may be long after: the client
    would wait for the TCP connection to end.
    """
    _close(fd)


def shutdown_write(fd: int) -> None:
    """Send FIN (no more data from us), keeping the fd open for reading."""
    sock = _socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()
