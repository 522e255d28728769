"""Test helpers: a real redis-server, a real uWSGI from a project's uwsgi.ini, a websocket client.

Users of the library test their own apps the same way the project does::

    # conftest.py
    pytest_plugins = ["offload.testing"]

    @pytest.fixture(scope="session")
    def offload_server_options():  # optional: what differs from the defaults
        return {"prepare_commands": [*LiveServer.prepare_commands, ("loaddata", "users.json")], "password": "pw"}

    # test_live.py
    def test_live(offload_server):
        with offload_server.ws_client("/ws/?channel=public:news") as ws:
            assert json.loads(ws.recv())["type"] == "subscribed"

Nothing here is a fake: :class:`RedisServer` runs ``redis-server`` on a unix
socket in a temporary directory, and :class:`LiveServer` runs ``uwsgi --ini
uwsgi.ini`` from the project directory on a free port with its own var/
directory (database, static files, embedded Redis), after the ``manage.py``
commands a deployment runs first (``migrate``, ``collectstatic``).

Which project: ``LiveServer(project_dir=..., ini=...)``. By default the
current working directory if it holds a ``uwsgi.ini`` (pytest started from
your project), else the directory that holds the ``offload`` package (this
repository's demo). The project directory must hold ``manage.py``.

:class:`WebSocketClient` is a blocking client on wsproto over a plain socket:
messages, pings, close codes, and raw bytes for hostile tests (:func:`frame`
builds any client frame, valid or not). :func:`wait_for` polls observable
state instead of sleeping (:func:`tcp_connections` is one: the kernel's view
of a server's connections). Its budgets, and so the start-up waits of the
servers, are multiplied by ``OFFLOAD_TEST_TIMEOUT_FACTOR`` (default 1) from
the environment: a slow CI gets more time instead of skipping; tests scale
their own budgets with :func:`timeout_factor`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import HttpSession, LiveServer, RedisServer, default_project_dir, redis_server_binary
from .topologies import LocalRedisCluster, LocalRedisSentinel, use_redis
from .waiting import TcpConnection, WaitTimeout, free_port, tcp_connections, timeout_factor, wait_for
from .websocket import ConnectionClosed, HandshakeError, RawFrame, WebSocketClient, frame

__all__ = [
    "ConnectionClosed",
    "HandshakeError",
    "HttpSession",
    "LiveServer",
    "LocalRedisCluster",
    "LocalRedisSentinel",
    "RawFrame",
    "RedisServer",
    "TcpConnection",
    "WaitTimeout",
    "WebSocketClient",
    "default_project_dir",
    "frame",
    "free_port",
    "redis_server_binary",
    "tcp_connections",
    "timeout_factor",
    "use_redis",
    "wait_for",
]


# -- pytest fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def offload_server_options() -> dict:
    """Keyword arguments for the session's :class:`LiveServer`; override it in your conftest.py.

    For example ``{"project_dir": ..., "prepare_commands": [...], "password": ..., "env": {...}}``.
    """
    return {}


@pytest.fixture(scope="session")
def offload_server(offload_server_options: dict) -> Iterator[LiveServer]:
    """One live uWSGI (one worker, embedded Redis, pings every second) shared by a test session."""
    options = dict(offload_server_options)
    options["env"] = {"OFFLOAD_PING_INTERVAL": "1", "OFFLOAD_PING_TIMEOUT": "2", **(options.get("env") or {})}
    server = LiveServer(**options).prepare().start()
    try:
        yield server
    finally:
        server.stop()
