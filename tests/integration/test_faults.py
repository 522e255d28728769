"""Redis failures and graceful reloads, against a real uWSGI and redis-server."""

from __future__ import annotations

import json
import os
import signal
import struct
import time

import pytest

from offload.testing import RedisServer, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def stack(tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    server = DemoServer(tmp_path / "var", redis_url=redis.url).prepare().start()
    try:
        yield server, redis
    finally:
        server.stop()
        redis.stop()


def recv(ws) -> dict:
    return json.loads(ws.recv())


def api_publish(server, channel, data):
    return server.http().request(
        "POST",
        f"/api/publish/{channel}",
        json.dumps(data),
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )


def test_redis_restart_keeps_sockets_open_fails_fast_and_loses_nothing(stack):
    server, redis = stack
    ws = server.websocket("/ws/?channel=public:outage")
    assert recv(ws)["type"] == "subscribed"
    first = server.publish("public:outage", "before")
    assert recv(ws)["id"] == first

    redis.stop()
    started = time.monotonic()
    status, _, body = api_publish(server, "public:outage", "during")
    assert status == 503 and json.loads(body)["error"] == "unavailable"
    assert time.monotonic() - started < 5, "publish must fail fast while Redis is down"
    status, _, _ = server.http().request("GET", "/healthz")
    assert status == 503

    redis.start()  # same socket, same append-only file: history survives
    # Published before the hub has resubscribed: only history has it, and the
    # socket must still get it (re-sync after the outage), then live ones.
    ids = [server.publish("public:outage", n) for n in range(3)]
    name = b"offload:c:{public:outage}"
    wait_for(lambda: dict(server.redis().pubsub_numsub(name))[name] == 1, 10, "the hub to resubscribe in Redis")
    ids.append(server.publish("public:outage", "live again"))
    got = [recv(ws) for _ in range(4)]
    assert [m["id"] for m in got if m["type"] == "message"] == ids
    ws.close()


def close_code(ws) -> int | None:
    """Read until the server's close frame; return its code."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == 8:
            return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None


def test_graceful_reload_closes_sockets_with_1012_quickly(stack):
    server, _ = stack

    sockets = [server.websocket("/ws/?channel=public:reload") for _ in range(20)]
    for ws in sockets:
        assert recv(ws)["type"] == "subscribed"
    old_pids = server.worker_pids()
    started = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)  # uwsgi --reload
    for ws in sockets:
        assert close_code(ws) == 1012
    server.wait_for_new_workers(old_pids)
    assert time.monotonic() - started < 10, "reload waited for websockets instead of closing them"
    ws = server.websocket("/ws/?channel=public:reload")
    assert recv(ws)["type"] == "subscribed"
    ws.close()


def test_shutdown_tells_clients_1001(stack):
    server, _ = stack
    sockets = [server.websocket("/ws/?channel=public:bye") for _ in range(5)]
    for ws in sockets:
        assert recv(ws)["type"] == "subscribed"
    os.kill(server.proc.pid, signal.SIGTERM)  # die-on-term: stop the instance
    assert [close_code(ws) for ws in sockets] == [1001] * 5
    server.proc.wait(30)


def test_an_endpoint_failure_closes_only_that_socket_with_1011(tmp_path):
    """Corrupt history in Redis (an entry without its ``d`` field) makes the
    resume of one socket raise inside the endpoint: that socket is closed with
    1011 (internal error), the worker survives and its other sockets keep
    receiving."""
    from tests.integration.demo import DemoServer

    # its own server: the traceback it causes must not reach the shared server's log
    server = DemoServer(tmp_path).prepare().start()
    try:
        _endpoint_failure_closes_with_1011(server)
    finally:
        server.stop()


def _endpoint_failure_closes_with_1011(server) -> None:
    from offload.backend.redis_client import history_key

    channel = f"public:corrupt-{os.getpid()}-{time.monotonic_ns()}"
    healthy = server.websocket(f"/ws/?channel={channel}")
    assert recv(healthy)["type"] == "subscribed"
    before = server.publish(channel, "before")
    assert recv(healthy)["id"] == before

    key = history_key(channel)
    redis = server.redis()
    assert redis.xlen(key) == 1, f"{key} is not the server's history stream"
    redis.xadd(key, {"junk": "no d field"})  # not published: only history has it
    pids = server.worker_pids()
    log_start = len(server.log_text())

    broken = server.websocket(f"/ws/?channel={channel}&since={before}")
    assert close_code(broken) == 1011
    broken.close()

    ids = [server.publish(channel, n) for n in range(3)]
    assert [recv(healthy)["id"] for _ in ids] == ids
    assert server.worker_pids() == pids
    log = server.log_text()[log_start:]
    assert "websocket endpoint failed" in log and "KeyError" in log, log[-2000:]
    # The worker still accepts new sockets on that channel (without the corrupt range).
    fresh = server.websocket(f"/ws/?channel={channel}")
    assert recv(fresh)["type"] == "subscribed"
    last = server.publish(channel, "after")
    assert recv(fresh)["id"] == last and recv(healthy)["id"] == last
    for ws in (healthy, fresh):
        ws.close()
    redis.close()


def test_a_handshake_stuck_on_redis_gets_503_and_says_why(tmp_path):
    """``OFFLOAD_HANDSHAKE_TIMEOUT`` bounds the slot check: with Redis frozen
    (SIGSTOP: connected but silent, slower than the handshake timeout) the
    upgrade is refused with 503 after the timeout, the log names what it waited
    for, and once Redis answers again upgrades succeed."""
    import websocket

    redis = RedisServer(tmp_path / "redis").start()
    env = {"OFFLOAD_HANDSHAKE_TIMEOUT": "1", "OFFLOAD_REDIS_TIMEOUT": "8", "WORKERS": "1"}
    server = DemoServer(tmp_path / "var", redis_url=redis.url, env=env).prepare().start()
    try:
        warm = server.websocket("/ws/?channel=public:frozen")
        assert recv(warm)["type"] == "subscribed"
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                server.websocket("/ws/?channel=public:frozen")
            waited = time.monotonic() - started
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert refused.value.status_code == 503
        assert 0.9 < waited < 4, f"refused after {waited:.2f} s, the timeout is 1 s"
        again = server.websocket("/ws/?channel=public:frozen")
        assert recv(again)["type"] == "subscribed"
        log = server.log_text()
        assert "handshake timed out after 1.0 s waiting for a connection slot (Redis)" in log, log[-2000:]
    finally:
        server.stop()
        redis.stop()
