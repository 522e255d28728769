"""The header-timeout bookkeeping, and its gevent and socket edge, without uWSGI.

The live behaviour (uWSGI's request greenlets, cut connections, freed cores)
is tested in tests/integration/test_slowloris.py.
"""

from __future__ import annotations

import ctypes
import os
import socket

import gevent
import gevent.event
import pytest
from greenlet import getcurrent

from offload import watchdog
from offload.watchdog import HeaderDeadlines, Overdue


def never_dead(key) -> bool:
    return False


# -- HeaderDeadlines: pure ------------------------------------------------------------


def test_nothing_is_overdue_before_the_timeout():
    deadlines = HeaderDeadlines(10)
    deadlines.start("a", 111, now=100.0)
    assert deadlines.sweep(109.9, never_dead) == []
    assert len(deadlines) == 1


def test_a_request_is_overdue_at_the_timeout_reported_once_then_forgotten():
    deadlines = HeaderDeadlines(10)
    deadlines.start("a", 111, now=100.0)
    assert deadlines.sweep(110.0, never_dead) == [Overdue("a", 111, 10.0)]
    assert deadlines.sweep(200.0, never_dead) == []
    assert len(deadlines) == 0


def test_only_the_overdue_ones_are_reported_in_the_order_they_started():
    deadlines = HeaderDeadlines(5)
    deadlines.start("old", 1, now=0.0)
    deadlines.start("older-token", 2, now=1.0)
    deadlines.start("young", 3, now=9.0)
    overdue = deadlines.sweep(10.0, never_dead)
    assert [(o.key, o.token, o.age) for o in overdue] == [("old", 1, 10.0), ("older-token", 2, 9.0)]
    assert list(deadlines.pending) == ["young"]


def test_a_request_that_reached_the_app_is_never_reported():
    deadlines = HeaderDeadlines(1)
    deadlines.start("ws", 7, now=0.0)
    deadlines.reached_app("ws")
    deadlines.reached_app("never-tracked")  # a no-op
    assert deadlines.sweep(1000.0, never_dead) == []


def test_finished_requests_are_forgotten_without_being_reported():
    """uWSGI answered without Python (a static file, a malformed request): its greenlet is dead."""
    deadlines = HeaderDeadlines(1)
    deadlines.start("static", 1, now=0.0)
    deadlines.start("fresh", 2, now=0.5)
    assert deadlines.sweep(0.6, lambda key: key == "static") == []
    assert list(deadlines.pending) == ["fresh"]
    assert deadlines.sweep(5.0, lambda key: True) == []
    assert len(deadlines) == 0


def test_the_timeout_can_change_between_sweeps():
    deadlines = HeaderDeadlines(10)
    deadlines.start("a", 1, now=0.0)
    assert deadlines.sweep(3.0, never_dead) == []
    deadlines.timeout = 2
    assert [o.key for o in deadlines.sweep(3.0, never_dead)] == ["a"]


# -- the edge: uwsgi.opt parsing, gevent.spawn, shutdown of a borrowed fd ---------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"2", 2), ([b"1", b"4"], 4), (b"0", 0), (None, 0), ([], 0), (b"x", 0), ("3", 3)],
)
def test_uwsgi_integer_options_are_read_as_uwsgi_opt_gives_them(value, expected):
    assert watchdog._int_option(value) == expected


def test_nothing_is_installed_outside_uwsgi():
    assert watchdog.install(10.0) is False
    assert getattr(gevent.spawn, "_offload_original", None) is None


@pytest.fixture
def fresh_worker(monkeypatch):
    """The module's per-worker state as in a worker that has served nothing yet."""
    monkeypatch.setattr(watchdog._Worker, "request_function", None)
    monkeypatch.setattr(watchdog._Worker, "loop", None)
    monkeypatch.setattr(watchdog._Worker, "watchdog", None)
    monkeypatch.setattr(watchdog, "_getcurrent", getcurrent)
    monkeypatch.setattr(watchdog._deadlines, "timeout", 60.0)
    watchdog._deadlines.pending.clear()
    yield
    if watchdog._Worker.watchdog is not None:
        watchdog._Worker.watchdog.kill()
    watchdog._deadlines.pending.clear()


def test_request_greenlets_are_tracked_until_they_reach_the_app(fresh_worker):
    """What uWSGI's gevent loop does: ``spawn(uwsgi_gevent_request, <struct address>)``."""
    headers_in = gevent.event.Event()
    finish = gevent.event.Event()

    def uwsgi_gevent_request(address):  # the name uWSGI's C function has
        headers_in.wait()
        watchdog.reached_app()
        finish.wait()

    def something_else(n):
        return n

    spawn = watchdog._tracking_spawn(gevent.spawn)
    other = spawn(something_else, 5)
    request = spawn(uwsgi_gevent_request, 0xDEAD)
    assert watchdog._Worker.request_function is uwsgi_gevent_request
    assert watchdog._Worker.watchdog is not None  # started by the worker's first request
    since, token = watchdog._deadlines.pending[request]
    assert token == 0xDEAD and since == gevent.get_hub().loop.now()
    assert other not in watchdog._deadlines.pending
    assert other.get(timeout=5) == 5
    headers_in.set()
    gevent.sleep(0)
    gevent.sleep(0)
    assert request not in watchdog._deadlines.pending
    finish.set()
    request.join(timeout=5)
    assert spawn._offload_original is gevent.spawn


def test_a_request_that_ends_without_python_is_forgotten_at_the_next_sweep(fresh_worker):
    def uwsgi_gevent_request(address):
        return None

    request = watchdog._tracking_spawn(gevent.spawn)(uwsgi_gevent_request, 1)
    request.join(timeout=5)
    assert request in watchdog._deadlines.pending
    assert watchdog._deadlines.sweep(gevent.get_hub().loop.now() + 1000, watchdog._is_dead) == []
    assert len(watchdog._deadlines) == 0


def test_cut_shuts_the_connection_down_and_leaves_the_fd_to_its_owner():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    request = ctypes.c_int(server.fileno())  # ``int fd`` at offset 0 of struct wsgi_request
    try:
        peer = watchdog._cut(ctypes.addressof(request))
        host, port = client.getsockname()
        assert peer == f"{host}:{port}"
        client.settimeout(5)
        assert client.recv(10) == b""  # the client sees the connection end
        os.fstat(server.fileno())  # still open: uWSGI closes it
        assert server.recv(10) == b""  # and its pending read returns EOF
    finally:
        for s in (client, server, listener):
            s.close()


def test_cut_of_a_descriptor_that_is_not_a_socket_does_nothing():
    read_end, write_end = os.pipe()
    request = ctypes.c_int(read_end)
    try:
        assert watchdog._cut(ctypes.addressof(request)) == ""
        os.fstat(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
