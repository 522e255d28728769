"""A user's session ends, and so do their open sockets, on every worker (issue 10 §4).

Logout, a password change and a deactivation close that user's websockets
with 4001 and end their event streams, on both workers of a real uWSGI;
other users' sockets stay open.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from offload.testing import LiveServer
from tests.integration.demo import serve_demo
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(120)

SOCKETS = 16  # per test: enough for both workers to hold some


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, "session-var", {"WORKERS": "2", "OFFLOAD_STATS_INTERVAL": "0.2"})


def worker_counts(watcher, expected_total: int, timeout: float = 10) -> dict[int, int]:
    """Open sockets per worker pid, from the workers' stats channel, once they add up to ``expected_total``."""
    counts: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(watcher.recv())
        if message.get("type") == "message":
            counts[message["data"]["pid"]] = message["data"]["connections"]
            if sum(counts.values()) == expected_total:
                return counts
    raise AssertionError(f"workers report {counts}, expected {expected_total} connections in all")


def django_shell(server: LiveServer, code: str) -> None:
    server.manage("shell", "-c", f"from django.contrib.auth.models import User; {code}")


def close_code(ws) -> int | None:
    """Read until the server closes; the close code (None: TCP just ended)."""
    try:
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big") if len(data) >= 2 else None
    except websocket.WebSocketConnectionClosedException:
        return None


def open_sockets(server: LiveServer, session, count: int) -> list:
    """``count`` subscribed sockets, opened at once so that both workers accept some."""

    def one(_):
        ws = server.websocket("/ws/?channel=room:general", cookie=session.cookie_header())
        assert json.loads(ws.recv())["type"] == "subscribed"
        return ws

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("how", ["logout", "password change", "deactivation"])
def test_the_end_of_a_session_closes_that_users_sockets_on_every_worker(server, how):
    alice, bob = server.http(), server.http()
    alice.login("alice")
    bob.login("bob")
    watcher = server.websocket("/ws/?channel=stats:workers")
    assert json.loads(watcher.recv())["type"] == "subscribed"
    bobs = open_sockets(server, bob, 1)
    before = worker_counts(watcher, 2)
    alices = open_sockets(server, alice, SOCKETS)
    stream = SseClient(server, "/sse/?channel=room:general", {"Cookie": alice.cookie_header()})
    while stream.event().get("event") != "subscribed":
        pass
    try:
        counts = worker_counts(watcher, SOCKETS + 3)
        added = {pid: n - before.get(pid, 0) for pid, n in counts.items()}
        assert len(added) == 2 and min(added.values()) >= 1, f"alice's sockets did not reach both workers: {added}"
        if how == "logout":
            status, _, _ = alice.post_csrf("/accounts/logout/")
            assert status in (200, 302)
        elif how == "password change":  # from another process, as the admin or a management command would
            django_shell(server, "u = User.objects.get(username='alice'); u.set_password('demo'); u.save()")
        else:
            django_shell(server, "u = User.objects.get(username='alice'); u.is_active = False; u.save()")
        started = time.monotonic()
        codes = [close_code(ws) for ws in alices]
        closed_in = time.monotonic() - started
        assert codes == [4001] * SOCKETS, codes
        with pytest.raises(EOFError):
            while True:
                stream.event()
        # Bob's socket is untouched and still delivers.
        server.publish("public:after-logout", {"n": 1})  # any traffic
        bobs[0].send(json.dumps({"type": "ping", "ref": 1}))
        while (reply := json.loads(bobs[0].recv()))["type"] == "presence":  # alice's join in room:general
            pass
        assert reply == {"type": "pong", "ref": 1}
        print(f"\n{how}: {SOCKETS} websockets over {len(counts)} workers closed with 4001 within {closed_in:.2f} s")
        assert "of user" in server.log_text()
    finally:
        if how == "deactivation":
            django_shell(server, "User.objects.filter(username='alice').update(is_active=True)")
        for ws in [*alices, *bobs, watcher]:
            ws.close()
        stream.close()


def test_a_socket_opened_after_logout_is_anonymous(server):
    alice = server.http()
    alice.login("alice")
    cookie = alice.cookie_header()
    alice.post_csrf("/accounts/logout/")
    ws = server.websocket("/ws/?channel=room:general", cookie=cookie)  # the old, now dead, session cookie
    reply = json.loads(ws.recv())
    assert reply["type"] == "error" and reply["code"] == "forbidden"
    ws.close()
