"""Prometheus metrics against a real two-worker uWSGI (issue 15).

One scripted session: websockets connect, messages are published (HTTP API
and ``offload.publish``), clients resume from history, a user's websocket and
event stream end at her logout, handshakes are refused, a flooder is closed for
its rate, another client for a protocol error, a client that stops reading as a
slow consumer; then the worker holding the most subscribers is SIGKILLed and
respawns. ``/metrics`` is scraped along the way and every counter must show
exactly what happened, summed over both workers: the killed worker's counters
still count, its gauges are gone. And a graceful reload keeps the counters.

Also: who may scrape (loopback only, no forwarded request, or the bearer key).
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wsproto.events import CloseConnection

from offload.testing import HandshakeError, LiveServer, WebSocketClient, frame, wait_for
from tests.integration.demo import DemoServer, serve_demo
from tests.integration.test_hostile_clients import publish_direct
from tests.integration.test_resilience import StalledClient
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(180)

KEY = "metrics-test-key"
SUBSCRIBERS = 6
PUBLISHES = 4
SLOW_MESSAGES = 60  # of 12 KB: well over the 100,000 queued bytes below, and the kernel buffers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {
        "WORKERS": "2",
        # no stats messages: every publish of the session is the test's own
        "OFFLOAD_STATS_INTERVAL": "0",
        "OFFLOAD_MAX_QUEUED_BYTES": "100000",
        # only the limits under test may close sockets
        "OFFLOAD_PING_INTERVAL": "20",
        "OFFLOAD_PING_TIMEOUT": "30",
        "OFFLOAD_METRICS_KEY": KEY,
    }
    yield from serve_demo(tmp_path_factory, "metrics-var", env)


# -- scraping ------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset], float]


def scrape(server: LiveServer, headers: dict | None = None) -> Samples:
    status, _, body = server.http().request("GET", "/metrics", headers=headers)
    assert status == 200, body[:300]
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in samples.items() if sample == name and wanted <= got)


def per_pid(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    wanted = set(labels.items())
    out: dict[str, float] = {}
    for (sample, got), value in samples.items():
        if sample == name and wanted <= got:
            pid = dict(got)["pid"]
            out[pid] = out.get(pid, 0.0) + value
    return out


def scrape_until(server: LiveServer, predicate, what: str, timeout: float = 10) -> Samples:
    """Scrape until ``predicate(samples)`` holds (the other worker's gauges are sampled once a second)."""

    def attempt():
        samples = scrape(server)
        return samples if predicate(samples) else None

    return wait_for(attempt, timeout, what, 0.2)


COUNTERS = {
    "opened": ("offload_connections_opened_total", {"transport": "websocket"}),
    "deliveries": ("offload_deliveries_total", {}),
    "latency_count": ("offload_publish_to_delivery_seconds_count", {}),
    "api": ("offload_publishes_total", {"source": "api"}),
    "python": ("offload_publishes_total", {"source": "python"}),
    "slow_consumer": ("offload_connections_closed_total", {"transport": "websocket", "reason": "slow_consumer"}),
    "rate_limit": ("offload_connections_closed_total", {"transport": "websocket", "reason": "rate_limit"}),
    "closed": ("offload_connections_closed_total", {}),
    "protocol_error": ("offload_connections_closed_total", {"transport": "websocket", "reason": "protocol_error"}),
    "sse_opened": ("offload_connections_opened_total", {"transport": "sse"}),
    "logged_out_ws": ("offload_connections_closed_total", {"transport": "websocket", "reason": "logged_out"}),
    "logged_out_sse": ("offload_connections_closed_total", {"transport": "sse", "reason": "logged_out"}),
    "catchups": ("offload_history_catchups_total", {}),
    "history_pages": ("offload_history_pages_total", {}),
    "unrecovered": ("offload_history_unrecovered_total", {}),
    "refused_origin": ("offload_handshake_refusals_total", {"transport": "websocket", "reason": "origin"}),
    "refused_ws_bad": ("offload_handshake_refusals_total", {"transport": "websocket", "reason": "bad_request"}),
    "refused_sse_bad": ("offload_handshake_refusals_total", {"transport": "sse", "reason": "bad_request"}),
}


def counters(samples: Samples) -> dict[str, float]:
    return {key: total(samples, name, **labels) for key, (name, labels) in COUNTERS.items()}


def wait_counters(server: LiveServer, expected: dict[str, float], what: str) -> Samples:
    """Scrape until every counter is exactly as expected (figures of the other worker
    may lag a sampling second behind), and return that scrape."""
    last: dict = {}

    def matches():
        samples = scrape(server)
        last["got"] = counters(samples)
        return samples if last["got"] == expected else None

    try:
        return wait_for(matches, 10, what, 0.2)
    except Exception as exc:
        raise AssertionError(f"{what}: expected {expected}, got {last.get('got')}") from exc


# -- the scripted session ---------------------------------------------------------------


def test_a_scripted_session_is_counted_exactly_across_two_workers_and_a_sigkill(server):
    channel = f"public:metrics-{os.getpid()}"
    before = counters(scrape(server))
    expected = dict(before)

    # Subscribers, spread over both workers by the kernel.
    clients = [server.ws_client(f"/ws/?channel={channel}") for _ in range(SUBSCRIBERS)]
    for client in clients:
        assert json.loads(client.recv())["type"] == "subscribed"
    expected["opened"] += SUBSCRIBERS

    def open_sockets(samples: Samples) -> bool:
        return (
            total(samples, "offload_connections_open", transport="websocket") == SUBSCRIBERS
            and total(samples, "offload_subscriptions") == SUBSCRIBERS
        )

    samples = scrape_until(server, open_sockets, "the open-socket gauges")
    holding = {pid for pid, n in per_pid(samples, "offload_connections_open", transport="websocket").items() if n}
    # A channel is counted once per worker that has local subscribers.
    assert total(samples, "offload_channels") == len(holding)

    # Publishes: the HTTP API reaches every subscriber; offload.publish (the demo's /notify) nobody.
    ids = [server.publish(channel, {"n": n}) for n in range(PUBLISHES)]
    for client in clients:
        assert [json.loads(client.recv())["data"]["n"] for _ in range(PUBLISHES)] == list(range(PUBLISHES))
    expected["api"] += PUBLISHES
    expected["deliveries"] += SUBSCRIBERS * PUBLISHES
    expected["latency_count"] += PUBLISHES * len(holding)  # each worker fans each message out once
    alice = server.http()
    alice.login("alice")
    status, _, body = alice.post_csrf("/notify")
    assert status == 200, body
    expected["python"] += 1

    # Alice's websocket and event stream end when she logs out, on whichever worker holds them.
    hers = server.ws_client(f"/ws/?channel={channel}-alice", cookie=alice.cookie_header())
    assert json.loads(hers.recv())["type"] == "subscribed"
    stream = SseClient(server, f"/sse/?channel={channel}-alice", {"Cookie": alice.cookie_header()})
    while stream.event().get("event") != "subscribed":
        pass
    scrape_until(server, lambda s: total(s, "offload_connections_open", transport="sse") == 1, "the stream's gauge")
    status, _, _ = alice.post_csrf("/accounts/logout/")
    assert status in (200, 302)
    assert hers.recv_close().code == 4001
    with pytest.raises(EOFError):
        while True:
            stream.event()
    stream.conn.close()
    hers.abort()
    expected["opened"] += 1
    expected["sse_opened"] += 1
    expected["logged_out_ws"] += 1
    expected["logged_out_sse"] += 1
    expected["closed"] += 2

    # Resumes: from a retained id, and from one long trimmed (recovered:false). One history page each.
    for since, recovered in ((ids[0], True), ("1-0", False)):
        resumed = server.ws_client(f"/ws/?channel={channel}&since={since}")
        reply = json.loads(resumed.recv())
        assert (reply["type"], reply["recovered"]) == ("subscribed", recovered)
        resumed.close()
    expected["opened"] += 2
    expected["catchups"] += 2
    expected["history_pages"] += 2
    expected["unrecovered"] += 1

    # Refused handshakes: a foreign Origin, a GET without the upgrade, an event stream without a channel.
    with pytest.raises(HandshakeError) as refused:
        server.ws_client(f"/ws/?channel={channel}", origin="http://evil.example")
    assert refused.value.status == 403
    assert server.http().request("GET", "/ws/")[0] == 426
    assert server.http().request("GET", "/sse/")[0] == 400
    expected["refused_origin"] += 1
    expected["refused_ws_bad"] += 1
    expected["refused_sse_bad"] += 1

    # A flooder is closed for its rate.
    flooder = server.ws_client("/ws/echo", auto_reply=False)
    flooder.send_raw(b"".join(frame(9, b"") for _ in range(500)))
    while not isinstance(event := flooder.recv_event(), CloseConnection):
        pass
    assert (event.code, event.reason) == (1008, "rate limit exceeded")
    flooder.abort()
    expected["opened"] += 1
    expected["rate_limit"] += 1
    expected["closed"] += 1

    # A frame with a reserved opcode breaks the protocol: close 1002.
    breaker = server.ws_client("/ws/echo")
    breaker.send_raw(frame(3, b""))
    assert breaker.recv_close().code == 1002
    breaker.abort()
    expected["opened"] += 1
    expected["protocol_error"] += 1
    expected["closed"] += 1

    # A client that stops reading is closed as a slow consumer. Every message reaches
    # the hub's fan-out while it is subscribed (the server waits 2 s for its close frame).
    slow_channel = f"public:metrics-slow-{os.getpid()}"
    stalled = StalledClient(server.port, slow_channel)
    expected["opened"] += 1
    for n in range(SLOW_MESSAGES):
        publish_direct(server, slow_channel, json.dumps({"n": n, "pad": "x" * 12_000}))
    expected["deliveries"] += SLOW_MESSAGES
    expected["latency_count"] += SLOW_MESSAGES
    expected["slow_consumer"] += 1
    expected["closed"] += 1
    wait_counters(server, expected, "the session's counters")
    assert stalled.drain(10)[1] in {"close 1008 'slow consumer'", "EOF", "EOF (after a partial frame)", "reset"}
    stalled.sock.close()
    samples = scrape_until(server, open_sockets, "the stalled socket to go")
    # The histogram's +Inf bucket holds every observation.
    assert total(samples, "offload_publish_to_delivery_seconds_bucket", le="+Inf") == total(
        samples, "offload_publish_to_delivery_seconds_count"
    )

    # SIGKILL the worker that holds the most subscribers: it cannot write anything more.
    by_pid = per_pid(samples, "offload_connections_open", transport="websocket")
    victim = max(by_pid, key=by_pid.get)
    killed = int(by_pid[victim])
    old_pids = server.worker_pids()
    os.kill(int(victim), signal.SIGKILL)
    server.wait_for_new_workers(old_pids)

    def after_respawn(samples: Samples) -> bool:
        return not any(dict(labels).get("pid") == victim for (_, labels) in samples) and (
            total(samples, "offload_connections_open", transport="websocket") == SUBSCRIBERS - killed
        )

    samples = scrape_until(server, after_respawn, "the killed worker's gauges to go", 15)
    # Its counters are still in the sums, the new worker's start at zero: nothing lost or counted twice.
    assert counters(samples) == expected
    assert total(samples, "offload_subscriptions") == SUBSCRIBERS - killed

    # And the new figures add on top.
    survivors = [client for client in clients if not _ended(client)]
    assert len(survivors) == SUBSCRIBERS - killed
    server.publish(channel, {"n": "after"})
    for client in survivors:
        assert json.loads(client.recv())["data"]["n"] == "after"
    expected["api"] += 1
    expected["deliveries"] += len(survivors)
    expected["latency_count"] += 1 if survivors else 0
    wait_counters(server, expected, "the counters after the respawn")
    for client in clients:
        client.abort()


def _ended(client: WebSocketClient) -> bool:
    """The server side of ``client`` is gone (its worker was killed)."""
    try:
        return client.wait_eof(0.2)
    except OSError:  # reset
        return True


# -- who may scrape ------------------------------------------------------------------------


def _get(server: LiveServer, headers: dict) -> int:
    return server.http().request("GET", "/metrics", headers=headers)[0]


def test_metrics_answer_a_loopback_scraper(server):
    samples = scrape(server)
    assert total(samples, "offload_uwsgi_stats_up") == 1
    # uWSGI's own figures, read from its stats server at scrape time, one per worker
    assert {dict(labels)["worker"] for (name, labels) in samples if name == "offload_uwsgi_busy_cores"} == {"1", "2"}
    assert total(samples, "offload_uwsgi_busy_cores") >= 1  # this scrape's own request
    # each worker's resident memory, read from /proc at scrape time (no memory-report in uWSGI)
    rss = {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "offload_uwsgi_worker_rss_bytes"
    }
    assert set(rss) == {"1", "2"} and all(value > 10 << 20 for value in rss.values()), rss


def test_a_forwarded_request_needs_the_key_even_from_loopback(server):
    # A reverse proxy on the same host makes every client a loopback peer; it says so in a header.
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        assert _get(server, {header: "203.0.113.9"}) == 401
        assert _get(server, {header: "203.0.113.9", "Authorization": "Bearer wrong"}) == 401
        assert _get(server, {header: "203.0.113.9", "Authorization": f"Bearer {KEY}"}) == 200


def test_a_remote_peer_is_refused_without_the_key(tmp_path):
    address = _non_loopback_address()
    if address is None:
        pytest.fail("this test needs an interface with a non-loopback IPv4 address")
    live = DemoServer(tmp_path, env={"HOST": "0.0.0.0", "OFFLOAD_STATS_INTERVAL": "0"})
    live.prepare().start()
    try:
        status, _, body = _request(address, live.port, "/metrics", {})
        assert status == 403, body
        assert b"loopback" in body
        status, _, body = _request(address, live.port, "/metrics", {"Authorization": "Bearer anything"})
        assert status == 403, body  # no key configured: no key opens it
        assert _request("127.0.0.1", live.port, "/metrics", {})[0] == 200
    finally:
        live.stop()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for a UDP connect
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def _request(host: str, port: int, path: str, headers: dict) -> tuple[int, dict, bytes]:
    with socket.create_connection((host, port), timeout=10) as sock:
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, {}, body


def test_spooler_task_outcomes_are_counted_in_the_spooler_processes(server):
    alice = server.http()
    alice.login("alice")
    before = scrape(server)
    for form in ({"seconds": "0", "rows": "100"}, {"seconds": "0", "fail": "1"}):
        status, _, body = alice.post_csrf("/reports/", form)
        assert status == 202, body

    def outcomes(samples: Samples) -> dict[str, float]:
        def delta(outcome: str) -> float:
            return total(samples, "offload_tasks_total", outcome=outcome) - total(
                before, "offload_tasks_total", outcome=outcome
            )

        return {outcome: delta(outcome) for outcome in ("done", "retry", "failed")}

    # done, and failed at once (TaskError is never retried)
    samples = scrape_until(server, lambda s: outcomes(s) == {"done": 1, "retry": 0, "failed": 1}, "the task outcomes")
    assert outcomes(samples) == {"done": 1, "retry": 0, "failed": 1}


def test_a_graceful_reload_keeps_the_counters_and_counts_its_closes(server):
    channel = f"public:metrics-reload-{os.getpid()}"
    client = server.ws_client(f"/ws/?channel={channel}")
    assert json.loads(client.recv())["type"] == "subscribed"
    before = scrape_until(server, lambda s: total(s, "offload_connections_open") >= 1, "the socket's gauge")
    restarts = total(before, "offload_connections_closed_total", reason="restart")
    old_pids = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGHUP)  # uWSGI's graceful reload: the master re-executes itself
    event = client.recv_event()
    assert isinstance(event, CloseConnection) and event.code == 1012
    server.wait_for_new_workers(old_pids, 30)
    after = scrape_until(server, lambda s: total(s, "offload_connections_open") == 0, "the old workers' gauges to go")
    # var/metrics is emptied when the master starts, not when a reload re-executes it
    assert total(after, "offload_connections_closed_total", reason="restart") == restarts + 1
    for key in ("opened", "deliveries", "api", "slow_consumer", "rate_limit"):
        assert counters(after)[key] == counters(before)[key], key
    client.abort()
