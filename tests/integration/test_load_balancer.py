"""Two uWSGI instances behind a real HAProxy, started from the shipped docs/deploy/haproxy.cfg (issue 14).

Instance A (two workers) and B (one worker) share one redis-server, the secret
key and the database (tests/integration/instances.py). HAProxy checks
``/readyz`` on each; the instances trust it (``OFFLOAD_TRUSTED_PROXIES``), so
per-client limits (the connection cap, login throttling) count the address
HAProxy forwards for. Clients connect
from distinct loopback addresses (127.0.0.2, ...), so the balancer (127.0.0.1)
and each client are told apart, as on a real network.

The rolling restart drains A (its drain file), waits until HAProxy takes it
out, checks that no new connection reaches it, reloads it, waits until it is
ready and back in, then does the same with B, while a steady publisher
publishes through the balancer and a swarm of websocket clients (which
reconnect and resume with ``since`` like offload.js) reads: every client
ends with every acknowledged message exactly once.
"""

from __future__ import annotations

import csv
import http.client
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from offload.testing import HandshakeError, LiveServer, RedisServer, WebSocketClient, free_port, wait_for
from tests.integration.demo import DemoServer
from tests.integration.instances import User, running_instances
from tests.integration.test_http_surface import RecordingUpstream
from tests.integration.test_resilience import Publisher, Subscriber, Swarm, check_log, delivery_report, wait_caught_up
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(300)

CONFIG = Path(__file__).resolve().parents[2] / "docs" / "deploy" / "haproxy.cfg"
# Debian's package puts it in /usr/sbin, which a non-root PATH may lack (bin/system-deps installs it).
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CAP = 3  # websockets per client address, across both instances
LOGIN_FAILURES = 3  # failed logins per client address before 429 (counted in Redis)
SWARM = 24  # clients through the balancer during the rolling restart
SERVERS = {"app1": "a", "app2": "b"}  # HAProxy's server names in the shipped config -> our instances


class HAProxy:
    """``haproxy -db -f docs/deploy/haproxy.cfg`` with the config's variables set, and its admin socket."""

    def __init__(self, run_dir: Path, app1: LiveServer, app2: LiveServer) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self.log_path = run_dir / "haproxy.log"
        self.env = {
            **os.environ,
            "OFFLOAD_LB_BIND": f"127.0.0.1:{self.port}",
            "OFFLOAD_APP1": f"127.0.0.1:{app1.port}",
            "OFFLOAD_APP2": f"127.0.0.1:{app2.port}",
            "OFFLOAD_HEALTH_HOST": "127.0.0.1",
            "OFFLOAD_LB_RUN_DIR": str(run_dir),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(CONFIG)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(lambda: all(self.checked_up(name) for name in SERVERS), 30, "HAProxy: both servers checked and UP")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> row (status, scur, stot, ...)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.run_dir / "admin.sock"))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "offload_instances" and row["svname"] in SERVERS
        }

    def status(self, name: str) -> str:
        return self.stats()[name]["status"].split()[0]  # "UP", "DOWN", "UP 1/2" (going down), ...

    def checked_up(self, name: str) -> bool:
        """UP after a passed check (a server is "UP" before its first check, with check status INI)."""
        row = self.stats()[name]
        return row["status"] == "UP" and row["check_status"] == "L7OK"

    def sessions(self, name: str) -> int:
        """Connections HAProxy sent to that server so far (health checks not included)."""
        return int(self.stats()[name]["stot"])


@dataclass
class Site:
    a: DemoServer
    b: DemoServer
    lb: HAProxy
    redis: RedisServer
    upstream: RecordingUpstream  # behind /slow
    user: User

    def instance(self, name: str) -> DemoServer:
        return self.a if SERVERS[name] == "a" else self.b


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    drains = tmp_path_factory.mktemp("drain")  # each instance's OFFLOAD_DRAIN_FILE
    envs = {"a": {"WORKERS": "2"}, "b": {"WORKERS": "1"}}
    for name, own in envs.items():
        own["OFFLOAD_DRAIN_FILE"] = str(drains / name)
    common = {
        "OFFLOAD_TRUSTED_PROXIES": "127.0.0.1",
        "OFFLOAD_MAX_CONNECTIONS_PER_IP": str(CAP),
        "LOGIN_FAILURES_PER_IP": str(LOGIN_FAILURES),
        # offload.testing turns it off; only the flooder's own address (127.0.0.9) ever breaks a rate limit here
        "OFFLOAD_ABUSE_COOLDOWN": "30",
    }
    upstream = RecordingUpstream()
    common["SLOW_UPSTREAM_URL"] = upstream.url
    with running_instances(tmp_path_factory, envs, start=envs, users=1, env=common) as (redis, servers, users):
        lb = HAProxy(tmp_path_factory.mktemp("haproxy"), servers["a"], servers["b"]).start()
        try:
            yield Site(servers["a"], servers["b"], lb, redis, upstream, users["user000"])
        finally:
            lb.stop()
            upstream.stop()
            for server in servers.values():
                check_log(server)


def ws_through(site: Site, path: str, source: str, headers: dict[str, str] | None = None) -> WebSocketClient:
    """A websocket through the balancer from the loopback address ``source``."""
    sock = socket.create_connection(("127.0.0.1", site.lb.port), timeout=10, source_address=(source, 0))
    return WebSocketClient(f"ws://127.0.0.1:{site.lb.port}{path}", sock=sock, headers=headers)


def next_message(ws: WebSocketClient) -> dict:
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event.get("type") == "message":
            return event


def readyz(server: LiveServer) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.base_url + "/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- one site over two instances -------------------------------------------------------------


def test_a_message_published_on_one_instance_reaches_clients_on_the_other(site):
    channel = f"public:lb-{uuid.uuid4().hex[:8]}"
    with site.a.ws_client(f"/ws/?channel={channel}") as on_a, site.b.ws_client(f"/ws/?channel={channel}") as on_b:
        for ws in (on_a, on_b):
            assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
        site.b.publish(channel, {"from": "b"})
        assert next_message(on_a)["data"] == {"from": "b"}
        assert next_message(on_b)["data"] == {"from": "b"}
        site.a.publish(channel, {"from": "a"})
        assert next_message(on_b)["data"] == {"from": "a"}
        assert next_message(on_a)["data"] == {"from": "a"}


def test_an_event_stream_through_the_balancer_gets_each_message_at_once(site):
    """No buffering on the way: each event arrives while the stream stays open."""
    channel = f"public:lb-sse-{uuid.uuid4().hex[:8]}"
    stream = SseClient(types.SimpleNamespace(port=site.lb.port), f"/sse/?channel={channel}")
    try:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        stream.subscribed()
        for n, server in enumerate((site.a, site.b, site.a)):
            server.publish(channel, {"n": n})
            assert stream.message()["data"] == {"n": n}
    finally:
        stream.conn.close()


def test_both_instances_are_ready_and_the_balancer_checks_readyz(site):
    for server in (site.a, site.b):
        assert readyz(server) == (200, {"status": "ready"})
    rows = site.lb.stats()
    assert {name: (row["status"], row["check_status"]) for name, row in rows.items()} == {
        name: ("UP", "L7OK") for name in SERVERS
    }, rows


def test_the_per_address_cap_holds_across_instances_through_the_balancer(site):
    channel = f"public:cap-{uuid.uuid4().hex[:8]}"
    path = f"/ws/?channel={channel}"
    before = {name: site.lb.sessions(name) for name in SERVERS}
    held = [ws_through(site, path, "127.0.0.2") for _ in range(CAP)]
    try:
        after = {name: site.lb.sessions(name) for name in SERVERS}
        assert all(after[name] > before[name] for name in SERVERS), f"not spread over both instances: {after}"
        # One more from the same client: refused, whichever instance gets it.
        with pytest.raises(HandshakeError) as refused:
            ws_through(site, path, "127.0.0.2")
        assert refused.value.status == 429
        # A forged X-Forwarded-For does not help: HAProxy appends the real address, which is what counts.
        with pytest.raises(HandshakeError) as forged:
            ws_through(site, path, "127.0.0.2", headers={"X-Forwarded-For": "198.51.100.7"})
        assert forged.value.status == 429
        # Another client behind the same balancer has its own count.
        ws_through(site, path, "127.0.0.3").close()
    finally:
        for ws in held:
            ws.close()

    def admitted_again() -> bool:
        try:
            ws_through(site, path, "127.0.0.2").close()
        except HandshakeError:
            return False
        return True

    wait_for(admitted_again, 15, "a slot freed by a close to admit the client again")


def ws_direct(server: LiveServer, path: str, source: str) -> WebSocketClient:
    """A websocket straight to one instance from the loopback address ``source`` (not a trusted proxy)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0))
    return WebSocketClient(f"ws://127.0.0.1:{server.port}{path}", sock=sock)


def test_a_flooder_closed_on_one_instance_is_refused_by_every_instance(site):
    """The abuse cooldown is shared on the hubs' control channel: any worker the client reaches next refuses it."""
    path = f"/ws/?channel=public:flood-{uuid.uuid4().hex[:8]}"
    flooder = ws_through(site, path, "127.0.0.9")
    for _ in range(40):  # the control-frame bucket holds 10: this breaks it within a few frames
        try:
            flooder.ping(b"x")
        except OSError:
            break
    assert flooder.recv_close(timeout=10).code == 1008
    flooder.abort()

    def refused_by(server: LiveServer) -> bool:
        try:
            ws_direct(server, path, "127.0.0.9").close()
        except HandshakeError as exc:
            return exc.status == 429
        return False

    for server in (site.a, site.b):  # every worker of both instances: the two of A by repeated tries
        wait_for(lambda server=server: refused_by(server), 10, f"{server.log_path} to refuse the flooder")
        assert all(refused_by(server) for _ in range(4)), "a worker admitted the flooder during its cooldown"
    ws_direct(site.b, path, "127.0.0.10").close()  # another address is not refused


def request_through(site: Site, source: str, method: str, path: str, body: str | None = None, headers=None):
    """One HTTP request through the balancer from ``source`` (uWSGI closes each connection after its answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.lb.port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body, headers or {})
        answer = conn.getresponse()
        answer.read()
        return answer
    finally:
        conn.close()


def login_failure(site: Site, source: str, username: str, forwarded_for: str | None = None) -> int:
    """One failed login through the balancer from ``source``: 200 (the form again) or 429 (throttled)."""
    page = request_through(site, source, "GET", "/accounts/login/")
    token = SimpleCookie(", ".join(page.headers.get_all("Set-Cookie")))["csrftoken"].value
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": username, "password": "wrong"})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"csrftoken={token}"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    return request_through(site, source, "POST", "/accounts/login/", form, headers).status


def test_the_slow_upstream_sees_the_client_behind_the_balancer_not_the_balancer(site):
    """The upstream gate finds the client in X-Forwarded-For as every per-client limit does."""
    token = f"token{uuid.uuid4().hex}"
    headers = {"Cookie": f"sessionid={site.user.session}", "X-Forwarded-For": "198.51.100.66"}
    assert request_through(site, "127.0.0.6", "GET", f"/slow?{token}=1", headers=headers).status == 200
    assert dict(site.upstream.received(token))["X-Forwarded-For"] == "127.0.0.6"


def test_login_throttling_counts_the_client_behind_the_balancer(site):
    names = (f"nobody-{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())  # the per-account limit stays out of it
    assert [login_failure(site, "127.0.0.4", next(names)) for _ in range(LOGIN_FAILURES)] == [200] * LOGIN_FAILURES
    assert login_failure(site, "127.0.0.4", next(names)) == 429
    assert login_failure(site, "127.0.0.4", next(names), "198.51.100.8") == 429
    assert login_failure(site, "127.0.0.5", next(names)) == 200  # another client behind the same balancer


# -- the rolling restart ---------------------------------------------------------------------------


def drain_and_reload(site: Site, name: str, publisher: Publisher, swarm: Swarm, subs: list[Subscriber]) -> dict:
    """Drain one instance, check it gets no new connection, reload it, wait until it is back in."""
    server, other = site.instance(name), next(n for n in SERVERS if n != name)
    started = time.monotonic()
    Path(server.env["OFFLOAD_DRAIN_FILE"]).touch()
    status, body = readyz(server)
    assert status == 503 and body["reason"].startswith("draining"), body
    wait_for(lambda: site.lb.status(name) == "DOWN", 15, f"HAProxy to take {name} out")
    out_at = time.monotonic()
    sessions = site.lb.sessions(name)
    # Drained, still running: new connections (the publisher's, new websockets) all go to the other.
    published = len(publisher.acked)
    wait_for(lambda: len(publisher.acked) >= published + 10, 15, "ten publishes while drained")
    newcomers = [ws_through(site, "/ws/?channel=public:newcomers", f"127.0.0.{20 + n}") for n in range(4)]
    for ws in newcomers:
        ws.close()
    assert site.lb.sessions(name) == sessions, f"HAProxy sent new connections to the draining {name}"
    assert site.lb.status(name) == "DOWN"
    # The reload: its clients get 1012 and resume through the balancer on the other instance.
    old = server.worker_pids()
    hup_at = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for_new_workers(old, 30)
    wait_for(lambda: readyz(server)[0] == 200, 30, f"{name} ready after its reload")
    wait_for(lambda: site.lb.checked_up(name), 15, f"HAProxy to put {name} back")
    back_at = time.monotonic()
    wait_for(swarm.all_live, 30, "every client back after the reload")
    moved = [s for s in subs if any(t >= hup_at for t, _ in s.closes)]
    return {
        "instance": name,
        "taken_out_s": round(out_at - started, 2),
        "reload_to_back_in_s": round(back_at - hup_at, 2),
        "clients_moved": len(moved),
        "close_codes": sorted({code for s in moved for t, code in s.closes if t >= hup_at}),
        "other": other,
    }


def test_a_rolling_restart_under_load_loses_and_duplicates_nothing(site):
    channel = f"public:rolling-{uuid.uuid4().hex[:8]}"
    began = time.monotonic()
    entry = types.SimpleNamespace(port=site.lb.port, api_key=LiveServer.api_key)  # publish through the balancer
    publisher = Publisher(entry, channel, interval=(0.03, 0.06))
    subs = [Subscriber(n, channel) for n in range(SWARM)]
    swarm = Swarm(site.lb.port, subs, source=lambda sub: f"127.0.1.{10 + sub.index}")
    swarm.start()
    try:
        wait_for(swarm.all_live, 30, f"{SWARM} clients subscribed through the balancer")
        rows = site.lb.stats()
        assert all(int(rows[name]["scur"]) > 0 for name in SERVERS), f"clients not on both instances: {rows}"
        publisher.start()
        publisher.publish_until_acked()
        steps = [drain_and_reload(site, name, publisher, swarm, subs) for name in SERVERS]
        publisher.stop()
        wait_caught_up(subs, publisher, 30)
        report = delivery_report(subs, publisher)
    finally:
        publisher.stop()
        swarm.stop()
    print(f"\nrolling restart: {steps}; {report.summary()}; took {time.monotonic() - began:.1f} s")
    assert report.ok, report.summary()
    assert not report.unrecovered, report.summary()
    assert report.acked >= 40, report.summary()
    for step in steps:
        assert step["clients_moved"] > 0 and step["close_codes"] == [1012], steps
    assert all(sub.connects >= 2 for sub in subs), "a client was never moved by the rolling restart"
    assert sum(step["clients_moved"] for step in steps) >= SWARM
