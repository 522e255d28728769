"""Prometheus metrics of the whole instance: every uWSGI worker and spooler process adds up.

Theory of operation
-------------------
uWSGI runs several processes; a scrape reaches one of them. ``prometheus_client``
in multiprocess mode gives each process its own memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` (the library's uWSGI options set it to
``var/metrics`` and empty it when the master starts: ``offload/uwsgiconf/offload.ini``);
the worker that answers ``/metrics`` reads and sums every process's files.
An increment is a write into this process's mmap: no lock shared between
processes, no Redis, no syscall.

Dead processes: a counter's file stays after its process died (a SIGKILLed
worker's deliveries still count, and its replacement starts its own file at
zero: nothing is lost or counted twice). Gauges are "live" (``livesum``,
``liveall``): the files of a dead process are removed by :func:`sweep_dead`,
which every new worker runs after its fork (``offload.apps``) and every scrape
runs too, so a dead worker's sockets disappear from the figures.

The hot path stays cheap: the hub's fan-out makes one call per message batch
(:func:`fanned_out`: deliveries to every local socket at once, and the
publish-to-delivery latency), never one per socket. Figures a worker already
keeps (open sockets, subscriptions, channels, queued bytes, hub reconnects) are
copied into gauges once a second by the worker's sampler (:func:`sample`), not
updated at each change. ``OFFLOAD_METRICS = False`` (env ``OFFLOAD_METRICS=0``
in the demo) makes every recording function return at once and ``/metrics``
answer 404.

Without ``PROMETHEUS_MULTIPROC_DIR`` (tests, ``manage.py shell``) the metrics
are this process's only. Labels are bounded: transports, reasons, sources,
outcomes, worker ids; never a channel name (the operator's page lists channels).
The list, with meanings, is docs/metrics.md.
"""

from __future__ import annotations

import glob
import hmac
import ipaddress
import json
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import conf
from .core.closes import Disconnect

try:
    import uwsgi
except ImportError:  # not under uWSGI (tests, manage.py): no uWSGI figures
    uwsgi = None

__all__ = [
    "before_scrape",
    "connection_closed",
    "connection_opened",
    "enabled",
    "fanned_out",
    "handshake_refused",
    "history_read",
    "metrics_view",
    "published",
    "recent_drops",
    "redis_failed",
    "render",
    "sample",
    "scrape_allowed",
    "stream_ended",
    "sweep_dead",
    "task_finished",
]

#: Where every process writes its figures; set in the environment before ``prometheus_client``
#: is imported (uWSGI's ``env =`` option does it for the master and every process it forks).
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

_registry = CollectorRegistry()


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(name, doc, labels, registry=_registry)


def _gauge(name: str, doc: str, labels: Sequence[str] = (), mode: str = "liveall") -> Gauge:
    return Gauge(name, doc, labels, registry=_registry, multiprocess_mode=mode)


CONNECTIONS_OPEN = _gauge("offload_connections_open", "Open websockets and event streams", ("transport", "worker"))
CONNECTIONS_OPENED = _counter("offload_connections_opened", "Websockets and event streams accepted", ("transport",))
CONNECTIONS_CLOSED = _counter(
    "offload_connections_closed", "Connections the server ended, by reason", ("transport", "reason")
)
HANDSHAKE_REFUSALS = _counter(
    "offload_handshake_refusals", "Websocket upgrades and event streams refused, by reason", ("transport", "reason")
)
SUBSCRIPTIONS = _gauge("offload_subscriptions", "Channel subscriptions of local sockets", ("worker",))
CHANNELS = _gauge("offload_channels", "Channels with at least one local subscriber", ("worker",))
QUEUED_BYTES = _gauge("offload_queued_bytes", "Bytes waiting for slow sockets to read", ("worker",))
DELIVERIES = _counter("offload_deliveries", "Messages handed to local sockets by the hub (one per socket)")
PUBLISHES = _counter("offload_publishes", "Messages published, by source (python, api, client)", ("source",))
LATENCY = Histogram(
    "offload_publish_to_delivery_seconds",
    "Publish (the message's Redis stream id) to the hub's fan-out, per message",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=_registry,
)
HISTORY_READS = _counter("offload_history_pages", "History pages read for resumes and re-syncs")
CATCHUPS = _counter("offload_history_catchups", "Subscriptions that resumed from a position (since / Last-Event-ID)")
UNRECOVERED = _counter("offload_history_unrecovered", "History reads answered recovered:false (a gap)")
HUB_RECONNECTS = _counter("offload_hub_reconnects", "Reconnections of the hubs' Redis pub/sub links")
REDIS_ERRORS = _counter("offload_redis_errors", "Failed Redis calls, by operation and kind", ("operation", "kind"))
TASKS = _counter("offload_tasks", "Spooler task attempts, by outcome (done, retry, failed)", ("outcome",))


_children: dict[tuple, Any] = {}


def _child(metric: Counter | Gauge, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: ``labels()`` formats and locks on every call, a few per cent
    of a connect's CPU. The label sets are few by design (no channel names), so the memo stays small."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def enabled() -> bool:
    """``OFFLOAD_METRICS``: False makes every recording function a no-op."""
    return conf.get("OFFLOAD_METRICS")


# -- recording ---------------------------------------------------------------------

_MAX_DROPS = 50
_drops: deque[tuple[float, str, str, object]] = deque(maxlen=_MAX_DROPS)


def connection_opened(transport: str) -> None:
    """A websocket (``"websocket"``) or an event stream (``"sse"``) was accepted."""
    if conf.get("OFFLOAD_METRICS"):
        _child(CONNECTIONS_OPENED, transport).inc()


def connection_closed(transport: str, reason: str, user: object = None) -> None:
    """The server ended a connection (``reason``: slow_consumer, rate_limit, dead_peer,
    protocol_error, restart, shutdown, logged_out, token_expired, internal_error, ...).

    Also kept (for :func:`recent_drops`) when metrics are off: the operator's page shows them.
    """
    _drops.append((time.time(), transport, reason, user))
    if conf.get("OFFLOAD_METRICS"):
        _child(CONNECTIONS_CLOSED, transport, reason).inc()


#: Why an event stream ended (``SseStream.ended``) -> its reason label; None: the client left.
_STREAM_ENDS: dict[str, str | None] = {why.reason: why.name.lower() for why in Disconnect}
_STREAM_ENDS.update(
    {
        "client closed": None,
        # the generator was closed mid-write: the client stopped reading or is gone
        "closed by the server": "dead_peer",
        # an error event went out first: a subscription failed or the token expired
        "finished": "error_event",
    }
)


def stream_ended(ended: str | None, identity: object = None) -> None:
    """An event stream ended, ``ended`` saying why (``SseStream.ended``): counted as a server
    close unless the client left."""
    reason = _STREAM_ENDS.get(ended or "", "other")
    if reason is not None:
        connection_closed("sse", reason, getattr(identity, "user_id", None))


def recent_drops() -> list[dict]:
    """This process's last 50 server-side closes, newest first:
    ``{"ts": epoch seconds, "transport": ..., "reason": ..., "user": user id or None}``."""
    return [
        {"ts": ts, "transport": transport, "reason": reason, "user": user}
        for ts, transport, reason, user in reversed(_drops)
    ]


def handshake_refused(transport: str, reason: str) -> None:
    """An upgrade or an event stream was refused before it opened (``reason``: bad_request,
    origin, token, too_many_connections, abuse_cooldown, timeout, forbidden, ...)."""
    if conf.get("OFFLOAD_METRICS"):
        _child(HANDSHAKE_REFUSALS, transport, reason).inc()


def published(source: str) -> None:
    """A message was published: ``"python"`` (``offload.publish``), ``"api"`` (HTTP), ``"client"``."""
    if conf.get("OFFLOAD_METRICS"):
        _child(PUBLISHES, source).inc()


def fanned_out(entries: Iterable[Any], deliveries: int) -> None:
    """The hub hands messages (``entries``, each with its stream ``id``: ``(ms, seq)``) to
    local sockets, ``deliveries`` socket-messages in all. One call per fan-out, whatever
    the socket count. The latency is now minus the id's milliseconds: the publish time on
    Redis' clock (keep the clocks in sync across hosts)."""
    if conf.get("OFFLOAD_METRICS"):
        DELIVERIES.inc(deliveries)
        now_ms = time.time() * 1000.0
        for entry in entries:
            LATENCY.observe(max(0.0, now_ms - entry.id[0]) / 1000.0)


def history_read(*, resume: bool, recovered: bool) -> None:
    """A page of history was read; ``resume``: the first page of a subscription with a position."""
    if conf.get("OFFLOAD_METRICS"):
        HISTORY_READS.inc()
        if resume:
            CATCHUPS.inc()
        if not recovered:
            UNRECOVERED.inc()


def redis_failed(operation: str, timeout: bool) -> None:
    """A Redis call failed (``operation``: publish, history, hub, slots, presence); ``timeout``: it timed out."""
    if conf.get("OFFLOAD_METRICS"):
        _child(REDIS_ERRORS, operation, "timeout" if timeout else "error").inc()


def task_finished(outcome: str) -> None:
    """A spooler task attempt ended: ``done``, ``retry`` or ``failed``."""
    if conf.get("OFFLOAD_METRICS"):
        _child(TASKS, outcome).inc()


_last_reconnects = 0


def sample(
    worker: int,
    *,
    websockets: int,
    streams: int,
    subscriptions: int,
    channels: int,
    queued_bytes: int,
    hub_reconnects: int,
) -> None:
    """Copy a worker's own figures into its gauges (its sampler calls this once a second)."""
    global _last_reconnects
    if not conf.get("OFFLOAD_METRICS"):
        return
    label = str(worker)
    _child(CONNECTIONS_OPEN, "websocket", label).set(websockets)
    _child(CONNECTIONS_OPEN, "sse", label).set(streams)
    _child(SUBSCRIPTIONS, label).set(subscriptions)
    _child(CHANNELS, label).set(channels)
    _child(QUEUED_BYTES, label).set(queued_bytes)
    if hub_reconnects > _last_reconnects:
        HUB_RECONNECTS.inc(hub_reconnects - _last_reconnects)
    _last_reconnects = hub_reconnects


_before_scrape: list[Callable[[], None]] = []


def before_scrape(refresh: Callable[[], None]) -> None:
    """Run ``refresh`` (this process's :func:`sample`) before every scrape this process
    answers, so its own gauges are current (the others' are at most a second old)."""
    _before_scrape[:] = [refresh]


# -- dead processes -------------------------------------------------------------------

_LIVE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db$")


def sweep_dead(directory: str | None = None) -> list[int]:
    """Remove the live gauges of processes that are gone; returns their pids.

    Counters and histograms of dead processes stay: they keep counting in the sums.
    Safe to run from several processes at once.
    """
    directory = directory or MULTIPROC_DIR
    if not directory:
        return []
    dead = []
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _LIVE_FILE.search(path)
        if match is None:
            continue
        pid = int(match.group(1))
        if _alive(pid):
            continue
        try:
            os.remove(path)
        except FileNotFoundError:  # another process swept it first
            continue
        dead.append(pid)
    return sorted(set(dead))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


# -- scraping ----------------------------------------------------------------------

_FORWARDING_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def scrape_allowed(environ: Mapping[str, str], key: str | None) -> bool:
    """May this request read ``/metrics``?

    Yes with ``Authorization: Bearer <key>`` when ``key`` (``OFFLOAD_METRICS_KEY``)
    is set; otherwise (and also with a key) only from a loopback peer that no
    proxy forwarded: ``REMOTE_ADDR`` is 127.0.0.0/8 or ::1 and the request
    carries no ``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP`` header (a
    reverse proxy on the same host would otherwise make every client local).
    """
    if key:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
    if any(environ.get(header) for header in _FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def render(extra: Iterable[object] = ()) -> tuple[bytes, str]:
    """The exposition text of every process (this one only without a multiprocess
    directory), plus the collectors ``extra``; and its content type."""
    for refresh in _before_scrape:
        refresh()
    if MULTIPROC_DIR:
        sweep_dead()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=MULTIPROC_DIR)
    else:
        registry = _registry
    for collector in extra:
        registry.register(collector)
    try:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    finally:
        if registry is _registry:
            for collector in extra:
                registry.unregister(collector)


# -- uWSGI's own figures, read from its stats server at scrape time ----------------------


def uwsgi_stats(address: str, timeout: float = 2.0) -> dict:
    """The JSON of uWSGI's stats server at ``address`` (``host:port`` or a unix socket path).

    Raises:
        OSError, ValueError: the server cannot be reached or answered garbage.
    """
    host, _, port = address.rpartition(":")
    if "/" not in address and port.isdigit():
        family, target = socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))
    else:
        family, target = socket.AF_UNIX, address
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(target)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of process ``pid`` now (None: gone, or no /proc).

    Read here, not from uWSGI's stats: uWSGI has a worker's RSS only with
    ``memory-report``, which reads ``/proc/self/stat`` at the end of every
    request (about 9 us each, 2 % of a connect storm's worker CPU), and then
    as of that worker's last request.
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def uwsgi_families(stats: dict | None) -> list[Metric]:
    """The uWSGI figures of one stats reading (None: the stats server did not answer)."""
    up = GaugeMetricFamily("offload_uwsgi_stats_up", "1 if uWSGI's stats server answered this scrape")
    up.add_metric([], 0 if stats is None else 1)
    if stats is None:
        return [up]
    listen = GaugeMetricFamily("offload_uwsgi_listen_queue", "Connections waiting in the accept backlog")
    listen.add_metric([], stats.get("listen_queue", 0))
    listen_errors = CounterMetricFamily(
        "offload_uwsgi_listen_queue_errors", "Times the accept backlog was full (connections refused)"
    )
    listen_errors.add_metric([], stats.get("listen_queue_errors", 0))
    busy = GaugeMetricFamily(
        "offload_uwsgi_busy_cores", "Async cores serving a request (websockets leave theirs)", labels=["worker"]
    )
    offloaded = CounterMetricFamily(
        "offload_uwsgi_offloaded_requests", "Requests handed to offload threads (files, upstreams)", labels=["worker"]
    )
    requests = CounterMetricFamily("offload_uwsgi_requests", "Requests served by the worker", labels=["worker"])
    rss = GaugeMetricFamily("offload_uwsgi_worker_rss_bytes", "Resident memory of the worker", labels=["worker"])
    respawns = CounterMetricFamily(
        "offload_uwsgi_worker_respawns", "Times the worker was (re)spawned", labels=["worker"]
    )
    for worker in stats.get("workers", ()):
        label = [str(worker.get("id", 0))]
        cores = worker.get("cores") or ()
        busy.add_metric(label, sum(core.get("in_request", 0) for core in cores))
        offloaded.add_metric(label, sum(core.get("offloaded_requests", 0) for core in cores))
        requests.add_metric(label, worker.get("requests", 0))
        rss.add_metric(label, rss_bytes(worker.get("pid") or 0) or 0)
        respawns.add_metric(label, worker.get("respawn_count", 0))
    return [up, listen, listen_errors, busy, offloaded, requests, rss, respawns]


class _Families:
    """A collector that yields metric families read before the scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _uwsgi_collector() -> _Families | None:
    if uwsgi is None:
        return None
    address = uwsgi.opt.get("stats")
    if isinstance(address, list):
        address = address[0]
    if not address:
        return _Families(uwsgi_families(None))
    try:
        stats = uwsgi_stats(address.decode() if isinstance(address, bytes) else address)
    except (OSError, ValueError):
        stats = None
    return _Families(uwsgi_families(stats))


def metrics_view(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: every process's figures in Prometheus' text format.

    404 when ``OFFLOAD_METRICS`` is off. Answered only to a loopback peer no
    proxy forwarded, or with ``Authorization: Bearer <OFFLOAD_METRICS_KEY>``
    (:func:`scrape_allowed`): 401 then when a key is set, else 403.
    """
    if not conf.get("OFFLOAD_METRICS"):
        return JsonResponse({"error": "not_found", "reason": "metrics are off (OFFLOAD_METRICS)"}, status=404)
    key = conf.get("OFFLOAD_METRICS_KEY")
    if not scrape_allowed(request.META, key):
        if key:
            return JsonResponse(
                {"error": "unauthorized", "reason": "missing or wrong bearer key"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return JsonResponse({"error": "forbidden", "reason": "metrics are for loopback scrapers only"}, status=403)
    collector = _uwsgi_collector()
    body, content_type = render([collector] if collector is not None else [])
    return HttpResponse(body, content_type=content_type, headers={"Cache-Control": "no-store"})
