"""offload.metrics without uWSGI: who may scrape, the dead-process sweep, the reasons,
uWSGI's figures, and the Grafana dashboard's metric names.

The whole path (every worker's files summed, a SIGKILLed worker, the guard on
the real server) is tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.test import RequestFactory, override_settings
from prometheus_client.parser import text_string_to_metric_families

from offload import metrics
from offload.core.closes import Disconnect
from offload.policies import Identity

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "deploy" / "grafana-dashboard.json"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

# -- who may scrape -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_a_loopback_peer_may_scrape(address):
    assert metrics.scrape_allowed({"REMOTE_ADDR": address}, None)
    assert metrics.scrape_allowed({"REMOTE_ADDR": address}, "key")


@pytest.mark.parametrize("address", ["10.0.0.5", "203.0.113.9", "2001:db8::1", "::ffff:10.0.0.1", "", "unknown"])
def test_any_other_peer_may_not_without_the_key(address):
    assert not metrics.scrape_allowed({"REMOTE_ADDR": address}, None)
    assert not metrics.scrape_allowed({"REMOTE_ADDR": address, "HTTP_AUTHORIZATION": "Bearer key"}, None)
    assert not metrics.scrape_allowed({"REMOTE_ADDR": address, "HTTP_AUTHORIZATION": "Bearer nope"}, "key")
    assert not metrics.scrape_allowed({"REMOTE_ADDR": address, "HTTP_AUTHORIZATION": "Basic key"}, "key")


@pytest.mark.parametrize("address", ["10.0.0.5", "127.0.0.1"])
def test_the_bearer_key_opens_it_from_anywhere(address):
    assert metrics.scrape_allowed({"REMOTE_ADDR": address, "HTTP_AUTHORIZATION": "Bearer key"}, "key")
    assert metrics.scrape_allowed({"REMOTE_ADDR": address, "HTTP_AUTHORIZATION": "bearer  key "}, "key")


@pytest.mark.parametrize("header", ["HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP"])
def test_a_forwarded_request_is_not_local_even_from_loopback(header):
    # A reverse proxy on the same host: every client would look like 127.0.0.1.
    environ = {"REMOTE_ADDR": "127.0.0.1", header: "203.0.113.9"}
    assert not metrics.scrape_allowed(environ, None)
    assert metrics.scrape_allowed({**environ, "HTTP_AUTHORIZATION": "Bearer key"}, "key")


def _get(**meta):
    return metrics.metrics_view(RequestFactory().get("/metrics", **meta))


def test_the_view_answers_loopback_and_refuses_others():
    response = _get(REMOTE_ADDR="127.0.0.1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert "offload_deliveries" in names
    refused = _get(REMOTE_ADDR="10.0.0.5")
    assert refused.status_code == 403
    assert b"offload_" not in refused.content


@override_settings(OFFLOAD_METRICS_KEY="scrape")
def test_with_a_key_the_view_asks_for_it():
    refused = _get(REMOTE_ADDR="10.0.0.5", HTTP_AUTHORIZATION="Bearer wrong")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"] == "Bearer"
    assert _get(REMOTE_ADDR="10.0.0.5", HTTP_AUTHORIZATION="Bearer scrape").status_code == 200


@override_settings(OFFLOAD_METRICS=False)
def test_metrics_off_is_a_404_and_records_nothing():
    before = metrics.DELIVERIES._value.get()
    metrics.fanned_out([], 5)
    metrics.published("api")
    assert metrics.DELIVERIES._value.get() == before
    assert _get(REMOTE_ADDR="127.0.0.1").status_code == 404


# -- recording -------------------------------------------------------------------------


class _Entry:
    def __init__(self, ms):
        self.id = (ms, 0)


def test_a_fan_out_counts_every_socket_and_each_message_once():
    deliveries = metrics.DELIVERIES._value.get()
    observed = _histogram_count()
    metrics.fanned_out([_Entry(1), _Entry(2)], 2 * 500)
    assert metrics.DELIVERIES._value.get() == deliveries + 1000
    assert _histogram_count() == observed + 2


def _histogram_count() -> float:
    (family,) = [f for f in metrics._registry.collect() if f.name == "offload_publish_to_delivery_seconds"]
    return next(s.value for s in family.samples if s.name.endswith("_count"))


def test_recent_drops_are_the_last_fifty_newest_first():
    for n in range(60):
        metrics.connection_closed("websocket", "slow_consumer", n)
    metrics.connection_closed("sse", "dead_peer", None)
    drops = metrics.recent_drops()
    assert len(drops) == 50
    assert drops[0]["transport"] == "sse" and drops[0]["user"] is None
    assert [d["user"] for d in drops[1:4]] == [59, 58, 57]
    assert set(drops[0]) == {"ts", "transport", "reason", "user"}


def _closed(transport, reason):
    return metrics.CONNECTIONS_CLOSED.labels(transport, reason)._value.get()


@pytest.mark.parametrize(
    ("ended", "reason"),
    [
        (Disconnect.SLOW_CONSUMER.reason, "slow_consumer"),
        (Disconnect.LOGGED_OUT.reason, "logged_out"),
        (Disconnect.RESTART.reason, "restart"),
        ("internal error", "internal_error"),
        ("closed by the server", "dead_peer"),
        ("finished", "error_event"),
        ("something new", "other"),
    ],
)
def test_an_event_stream_end_is_counted_under_its_reason(ended, reason):
    before = _closed("sse", reason)
    metrics.stream_ended(ended, Identity(user_id=7))
    assert _closed("sse", reason) == before + 1
    assert metrics.recent_drops()[0] == {**metrics.recent_drops()[0], "reason": reason, "user": 7}


def test_a_client_that_leaves_is_no_server_close():
    before = metrics.recent_drops()[:1]
    metrics.stream_ended("client closed", None)
    assert metrics.recent_drops()[:1] == before


def test_the_sampler_copies_figures_and_counts_reconnects_once():
    reconnects = metrics.HUB_RECONNECTS._value.get()
    figures = dict(websockets=3, streams=1, subscriptions=5, channels=2, queued_bytes=10)
    metrics.sample(4, hub_reconnects=metrics._last_reconnects + 2, **figures)
    metrics.sample(4, hub_reconnects=metrics._last_reconnects, **figures)
    assert metrics.HUB_RECONNECTS._value.get() == reconnects + 2
    assert metrics.CONNECTIONS_OPEN.labels("websocket", "4")._value.get() == 3
    assert metrics.SUBSCRIPTIONS.labels("4")._value.get() == 5


# -- dead processes -------------------------------------------------------------------------


def test_the_sweep_removes_live_gauges_of_dead_processes_and_keeps_their_counters(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = [
            f"gauge_liveall_{alive.pid}.db",
            f"gauge_livesum_{alive.pid}.db",
            f"counter_{alive.pid}.db",
            f"gauge_liveall_{dead.pid}.db",
            f"gauge_livesum_{dead.pid}.db",
            f"gauge_all_{dead.pid}.db",
            f"counter_{dead.pid}.db",
            f"histogram_{dead.pid}.db",
        ]
        for name in names:
            (tmp_path / name).write_bytes(b"")
        assert metrics.sweep_dead(str(tmp_path)) == [dead.pid]
        left = {p.name for p in tmp_path.iterdir()}
        assert left == set(names) - {f"gauge_liveall_{dead.pid}.db", f"gauge_livesum_{dead.pid}.db"}
        assert metrics.sweep_dead(str(tmp_path)) == []  # a second sweeper finds nothing to do
    finally:
        alive.kill()
        alive.wait()


def test_without_a_directory_the_sweep_does_nothing():
    assert metrics.MULTIPROC_DIR is None  # the unit tests run single-process
    assert metrics.sweep_dead() == []


# -- uWSGI's figures ---------------------------------------------------------------------

STATS = {
    "listen_queue": 3,
    "listen_queue_errors": 1,
    "workers": [
        {
            "id": 1,
            "pid": os.getpid(),
            "requests": 10,
            "respawn_count": 2,
            "cores": [{"in_request": 1, "offloaded_requests": 4}, {"in_request": 0, "offloaded_requests": 1}],
        },
        {"id": 2, "pid": 0, "requests": 7, "respawn_count": 1, "cores": [{"in_request": 1}]},
    ],
}


def _values(families):
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_uwsgi_figures_come_from_one_stats_reading():
    values = _values(metrics.uwsgi_families(STATS))
    assert values[("offload_uwsgi_stats_up", ())] == 1
    assert values[("offload_uwsgi_listen_queue", ())] == 3
    assert values[("offload_uwsgi_listen_queue_errors_total", ())] == 1
    assert values[("offload_uwsgi_busy_cores", (("worker", "1"),))] == 1
    assert values[("offload_uwsgi_offloaded_requests_total", (("worker", "1"),))] == 5
    assert values[("offload_uwsgi_offloaded_requests_total", (("worker", "2"),))] == 0
    assert values[("offload_uwsgi_worker_respawns_total", (("worker", "1"),))] == 2
    # RSS is read from /proc when scraped (uWSGI's memory-report is off): this process's, and 0 for no process
    assert values[("offload_uwsgi_worker_rss_bytes", (("worker", "1"),))] > 10 << 20
    assert values[("offload_uwsgi_worker_rss_bytes", (("worker", "2"),))] == 0


def test_an_unreachable_stats_server_is_reported_not_raised():
    assert _values(metrics.uwsgi_families(None)) == {("offload_uwsgi_stats_up", ()): 0}


def test_the_stats_server_is_read_over_tcp_and_unix_sockets(tmp_path):
    body = json.dumps(STATS).encode()

    def serve(server):
        conn, _ = server.accept()
        with conn:
            conn.sendall(body)

    for family, address in ((socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_UNIX, str(tmp_path / "stats.sock"))):
        with socket.socket(family) as server:
            server.bind(address)
            server.listen()
            thread = threading.Thread(target=serve, args=(server,))
            thread.start()
            name = server.getsockname()
            where = f"{name[0]}:{name[1]}" if family == socket.AF_INET else name
            assert metrics.uwsgi_stats(where) == STATS
            thread.join()


# -- the dashboard and the docs name only metrics that exist ---------------------------------


def _families() -> set[str]:
    names = {family.name for family in metrics._registry.collect()}
    names |= {family.name for family in metrics.uwsgi_families(STATS)}
    return names


def _family_of(name: str) -> str:
    return re.sub(r"_(total|bucket|count|sum)$", "", name)


def test_the_grafana_dashboard_is_json_and_uses_only_our_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    used = {_family_of(name) for expr in exprs for name in re.findall(r"\boffload_[a-z_]+", expr)}
    assert used, "the dashboard queries no metric"
    assert used <= _families(), used - _families()
    # every metric is on the dashboard
    assert _families() - used == set()


def test_the_docs_list_every_metric():
    listed = {_family_of(name) for name in re.findall(r"`(offload_[a-z_]+)`", DOCS.read_text())}
    assert _families() <= listed, _families() - listed
    assert listed <= _families(), listed - _families()
