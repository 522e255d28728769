"""What each uWSGI worker process sets up once: its hub, its stats, its signals.

The transports (``offload.transports.endpoints``, ``offload.transports.sse``) are given their hub;
this module is where a worker's one hub is made (after the fork: uWSGI loads
the application in the master, and a hub's Redis connection and greenlet must
belong to the worker) and where the process-wide reactions live: closing
every socket on reload or shutdown, and publishing the worker's stats.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import gevent

from . import conf, metrics
from .backend.hub import Hub
from .backend.publishing import publish
from .core.closes import Disconnect
from .operator import Sampler
from .transports import connection, sse
from .transports.connection import close_all, open_connections
from .transports.presence import close_presence
from .transports.sse import close_all_streams, open_streams

__all__ = ["draining", "hub", "install_signal_handlers", "start_after_fork", "stats"]

log = logging.getLogger("offload.worker")

_hub: Hub | None = None
_hub_pid: int | None = None
_handlers_installed_pid: int | None = None
#: When this code was loaded: in uWSGI's master before the fork, and again in the new
#: master of a graceful reload (it re-executes itself), so a drain file touched
#: before a reload drains the old workers and not their replacements.
_loaded_at = time.time()
_draining_since: float | None = None  # set by the reload and shutdown handlers
#: Seconds between copies of the worker's figures into its Prometheus gauges.
_METRICS_INTERVAL = 1.0


def draining() -> str | None:
    """Why this worker takes no new connections (for ``/readyz``), or None.

    A worker drains once it was told to reload or stop, and while the
    ``OFFLOAD_DRAIN_FILE`` is newer than the code it runs: an operator touches
    that file, waits until the load balancer's health checks see 503, then
    reloads the instance, so no client is sent to a worker that is going away.
    """
    if _draining_since is not None:
        return "draining: the worker is reloading or stopping"
    path = conf.get("OFFLOAD_DRAIN_FILE")
    if path:
        try:
            touched = os.stat(path).st_mtime
        except OSError:  # no drain file: ready
            return None
        if touched >= _loaded_at:
            return f"draining: {path} was touched after this worker started"
    return None


def _start_draining() -> None:
    global _draining_since
    if _draining_since is None:
        _draining_since = time.time()


def hub(worker_id: int = 0) -> Hub:
    """This process's hub, started on first use (after fork), with its stats publisher."""
    global _hub, _hub_pid
    if _hub is None or _hub_pid != os.getpid():
        _hub = Hub(worker_id)
        _hub_pid = os.getpid()
        if conf.get("OFFLOAD_STATS_INTERVAL") > 0:
            gevent.spawn(_publish_stats, _hub)
        if conf.get("OFFLOAD_METRICS"):
            gevent.spawn(_sample_metrics, _hub)
    return _hub


def start_after_fork(worker_id: int) -> None:
    """Start this worker's hub as the worker starts (uWSGI's post-fork hook).

    A hub started at the first websocket would leave a worker that has served
    none deaf to the control channel, so it would admit an address another
    worker had just penalised for flooding.

    It also removes the Prometheus gauges of processes that died (the worker
    this one replaces, if it was killed): their counters stay (offload.metrics).
    """
    metrics.sweep_dead()
    hub(worker_id)


def stats(of: Hub) -> dict:
    """The figures a worker publishes on ``OFFLOAD_STATS_CHANNEL``."""
    return {
        "pid": os.getpid(),
        "worker": of.worker_id,
        "connections": open_connections() + open_streams(),
        "channels": of.channels,
        "delivered": of.delivered,
        "redis": "up" if of.connected else "down",
        "ts": time.time(),
    }


def sample_metrics(of: Hub) -> None:
    """Copy this worker's figures into its Prometheus gauges (:func:`offload.metrics.sample`)."""
    metrics.sample(
        of.worker_id,
        websockets=open_connections(),
        streams=open_streams(),
        subscriptions=of.subscriptions,
        channels=of.channels,
        queued_bytes=connection.queued_bytes() + sse.queued_bytes(),
        hub_reconnects=of.reconnects,
    )


def _sample_metrics(of: Hub) -> None:
    """Every second, and before each scrape this worker answers: its figures into its gauges."""
    metrics.before_scrape(lambda: sample_metrics(of))
    while True:
        try:
            sample_metrics(of)
        except Exception:  # a bug must not stop the sampling for good
            log.exception("metrics sample failed")
        gevent.sleep(_METRICS_INTERVAL)


def _publish_stats(of: Hub) -> None:
    """Every ``OFFLOAD_STATS_INTERVAL``: the public stats, then the operator page's figures
    (``OFFLOAD_OPERATOR_CHANNEL``, staff only: :mod:`offload.operator`)."""
    interval = conf.get("OFFLOAD_STATS_INTERVAL")
    channel = conf.get("OFFLOAD_STATS_CHANNEL")
    operator_channel = conf.get("OFFLOAD_OPERATOR_CHANNEL")
    sampler = Sampler(of) if operator_channel else None
    while True:
        gevent.sleep(interval)
        try:
            publish(channel, stats(of))
        except Exception as exc:  # Redis down or namespace missing: keep going
            log.debug("stats not published: %s", exc)
        if sampler is not None:
            try:
                publish(operator_channel, sampler.sample())
            except Exception as exc:  # Redis down: the page marks this worker stale
                log.debug("operator stats not published: %s", exc)


def install_signal_handlers() -> None:
    """On graceful reload (SIGHUP to the worker), close every socket with 1012;
    on shutdown with 1001.

    uWSGI's gevent loop waits for every open request before a worker can be
    replaced; closing websockets promptly makes reloads take seconds instead
    of ``worker-reload-mercy``, and 1012 tells clients to reconnect and resume.
    """
    global _handlers_installed_pid
    if _handlers_installed_pid == os.getpid():
        return
    _handlers_installed_pid = os.getpid()

    def reload() -> None:
        _start_draining()
        close_all(Disconnect.RESTART)
        close_all_streams(Disconnect.RESTART)
        close_presence()

    def shutdown() -> None:
        _start_draining()
        close_all(Disconnect.SHUTDOWN)
        close_all_streams(Disconnect.SHUTDOWN)
        close_presence()

    gevent.signal_handler(signal.SIGHUP, reload)
    # Shutdown (uWSGI stops a worker with SIGINT, and with SIGTERM/SIGQUIT on
    # some paths): tell clients with 1001 instead of just dropping TCP.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        gevent.signal_handler(signum, shutdown)
    _finish_presence_before_exit()


def _finish_presence_before_exit() -> None:
    """uWSGI's gevent loop exits the worker at the first switch after SIGINT/SIGTERM,
    without waiting for greenlets: presence's Redis calls in the handler above were
    cut (with two workers, members left Redis and no event said so). uWSGI calls
    ``uwsgi.atexit`` first, from the main greenlet with the hub still running:
    there, wait for presence to finish."""
    try:
        import uwsgi
    except ImportError:  # not under uWSGI
        return
    before = getattr(uwsgi, "atexit", None)

    def at_exit() -> None:
        close_presence()
        if before is not None:
            before()

    uwsgi.atexit = at_exit
