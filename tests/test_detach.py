"""A socket leaves its uWSGI request through a duplicate fd (offload.transports.sockets.detach),
and uWSGI closes the original: no registration of the closed fd may outlive it in the event loop's
epoll set. Real loopback TCP on the gevent loop, as uWSGI's gevent plugin waits for a request."""

from __future__ import annotations

import os

import gevent
import gevent.socket

from offload.transports.sockets import close_now, detach
from tests.epoll_sets import stale_registrations
from tests.test_idle_sockets import WAIT, tcp_pair


def test_the_duplicate_keeps_no_registration_of_the_closed_fd_in_the_loops_epoll_set():
    """uWSGI waits for the request with a gevent read watcher, so libev registers the fd, and keeps it
    registered after the watcher stops (it expects a close to drop it). The socket outlives the close in
    its duplicate: without the unregistration the client's first frame woke a registration of a closed
    (or reused) fd number, and libev rebuilt its whole epoll set, one system call per open socket."""
    server, client = tcp_pair()
    client.sendall(b"GET /ws/ HTTP/1.1\r\n\r\n")
    gevent.socket.wait_read(server.fileno(), timeout=WAIT)  # uWSGI's read hook
    assert server.recv(100)
    loop_epoll = gevent.get_hub().loop.fileno()
    fd = server.detach()
    duplicate = detach(fd)
    close_now(fd)  # uWSGI ends the request
    try:
        assert (loop_epoll, fd) not in stale_registrations(os.getpid(), loop_epoll)
        client.sendall(b"\x89\x80abcd")  # the client's first frame reaches the duplicate
        gevent.socket.wait_read(duplicate, timeout=WAIT)
        assert os.read(duplicate, 100) == b"\x89\x80abcd"
    finally:
        close_now(duplicate)
        client.close()
