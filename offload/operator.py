"""The operator's page: every worker of every instance, live, for staff only.

Theory of operation
-------------------
Each worker already publishes its stats every ``OFFLOAD_STATS_INTERVAL``
(:mod:`offload.worker`). Beside the public figures of the demo's panel it
publishes, on ``OFFLOAD_OPERATOR_CHANNEL``, what an operator needs
(:class:`Sampler`): its open websockets and event streams, RSS and CPU (from
``/proc/self`` and ``os.times``), its hottest channels (by local subscribers
and by message rate, from the hub's counts, with their presence counts), its
Redis link and a PING's round trip, and its recent drops with their reasons
(:func:`offload.metrics.recent_drops`). A message stays bounded: at most
``2 * OFFLOAD_OPERATOR_TOP_CHANNELS`` channels (names are at most 161
characters) and :data:`DROPS` drops, a few KiB.

The page (:func:`operator_page`, ``offload/templates/offload/operator.html``)
dogfoods the library: ``offload.js`` subscribes to that channel over the
library's own websocket, and the page merges the workers' messages. The
channel's namespace admits a subscriber only with a subscription token
(``"subscribe": "token"``; :func:`offload.conf.namespaces` declares it unless
the project does), and only :func:`operator_token`, behind the same staff
check as the page, mints one, bound to the staff user: whoever is not
``is_staff`` (and active) can neither open the page nor listen to its channel.
"""

from __future__ import annotations

import heapq
import logging
import os
import socket
import time
from collections.abc import Callable
from operator import itemgetter
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth import REDIRECT_FIELD_NAME
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render, resolve_url
from django.urls import reverse

from . import conf
from .backend.hub import Hub
from .backend.presence_store import presence_count
from .backend.redis_client import REDIS_ERRORS, get_client
from .exceptions import OffloadError
from .metrics import recent_drops, rss_bytes
from .policies import namespace_of
from .tokens import subscription_token
from .transports.connection import open_connections
from .transports.sse import open_streams

__all__ = ["DROPS", "Sampler", "operator_page", "operator_token", "process_figures"]

log = logging.getLogger("offload.operator")

#: Drops per worker message (the newest of the worker's last 50).
DROPS = 20
#: Channels named per list at most, whatever OFFLOAD_OPERATOR_TOP_CHANNELS says (bounds the message).
_MAX_TOP = 50
_HOST = socket.gethostname()


def _cpu_seconds() -> float:
    """CPU time this process used so far (user + system)."""
    times = os.times()
    return times.user + times.system


def process_figures(cpu_before: float, cpu_now: float, elapsed: float, rss: int | None) -> dict[str, Any]:
    """RSS and CPU percent (100 = one core) over ``elapsed`` seconds (pure)."""
    cpu = round(100.0 * (cpu_now - cpu_before) / elapsed, 1) if elapsed > 0 else None
    return {"rss": rss, "cpu": cpu}


class Sampler:
    """One worker's figures for the operator page, one :meth:`sample` per stats interval.

    Args:
        hub: this worker's hub.
        clock: monotonic seconds (rates and CPU are per second of it).
        cpu: the process's CPU seconds so far.
        rss: the process's resident bytes now.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = _cpu_seconds,
        rss: Callable[[], int | None] = rss_bytes,
    ) -> None:
        self._hub = hub
        self._clock = clock
        self._cpu = cpu
        self._rss = rss
        self._last = clock()
        self._last_cpu = cpu()

    def sample(self) -> dict[str, Any]:
        """The worker's message on ``OFFLOAD_OPERATOR_CHANNEL`` (reads Redis: a PING, presence counts)."""
        now, cpu = self._clock(), self._cpu()
        elapsed = now - self._last
        figures = process_figures(self._last_cpu, cpu, elapsed, self._rss())
        self._last, self._last_cpu = now, cpu
        hub = self._hub
        redis = self._redis()
        return {
            "host": _HOST,
            "pid": os.getpid(),
            "worker": hub.worker_id,
            "ts": time.time(),
            "interval": conf.get("OFFLOAD_STATS_INTERVAL"),
            "sockets": {"websocket": open_connections(), "sse": open_streams()},
            "subscriptions": hub.subscriptions,
            "channels": hub.channels,
            "delivered": hub.delivered,
            **figures,
            "redis": redis,
            # Redis down: no presence counts (each would wait OFFLOAD_REDIS_TIMEOUT for nothing)
            "top": self.top_channels(elapsed, presence=redis["up"]),
            "drops": recent_drops()[:DROPS],
        }

    def top_channels(self, elapsed: float, *, presence: bool = True) -> list[dict[str, Any]]:
        """The channels with the most local subscribers and those with the highest
        message rate (messages per second since the last call), most subscribers first;
        with their presence counts (``presence=False``: None, Redis is not asked)."""
        n = min(conf.get("OFFLOAD_OPERATOR_TOP_CHANNELS"), _MAX_TOP)
        hub = self._hub
        counts = hub.take_message_counts()
        chosen = dict(hub.top_channels(n))
        for channel, _ in heapq.nlargest(n, counts.items(), key=itemgetter(1)):
            if channel not in chosen:
                chosen[channel] = hub.local_subscribers(channel)
        rows = [
            {
                "channel": channel,
                "subscribers": subscribers,
                "rate": round(counts.get(channel, 0) / elapsed, 2) if elapsed > 0 else 0.0,
                "presence": _presence(channel) if presence else None,
            }
            for channel, subscribers in chosen.items()
            if subscribers
        ]
        rows.sort(key=lambda row: (-row["subscribers"], -row["rate"], row["channel"]))
        return rows

    def _redis(self) -> dict[str, Any]:
        """Can this worker reach Redis, how fast does it answer a PING, is its hub subscribed?"""
        started = time.perf_counter()
        try:
            get_client().ping()
        except REDIS_ERRORS as exc:
            up, ping_ms, error = False, None, str(exc)[:200]
        else:
            up, ping_ms, error = True, round((time.perf_counter() - started) * 1000, 3), None
        hub = self._hub
        return {"up": up, "ping_ms": ping_ms, "error": error, "hub": hub.connected, "reconnects": hub.reconnects}


def _presence(channel: str) -> int | None:
    """The channel's member count, if its namespace keeps presence and Redis answers."""
    try:
        if not namespace_of(channel).namespace.presence:
            return None
        return presence_count(channel)
    except OffloadError as exc:  # Redis down, or a namespace gone from the settings
        log.debug("no presence count for %s: %s", channel, exc)
        return None


# -- the page -------------------------------------------------------------------------


def _staff_only(request: HttpRequest) -> HttpResponse | None:
    """None for an active staff user; else a redirect to the login page (anonymous)
    or PermissionDenied (403: logged in, not staff)."""
    user = request.user
    if not user.is_authenticated:  # as django.contrib.auth's redirect_to_login (its module loads the models)
        login = resolve_url(settings.LOGIN_URL)
        return HttpResponseRedirect(f"{login}?{urlencode({REDIRECT_FIELD_NAME: request.get_full_path()}, safe='/')}")
    if not (user.is_active and user.is_staff):
        raise DjangoPermissionDenied("the operator page is for staff only")
    return None


def _channel() -> str:
    channel = conf.get("OFFLOAD_OPERATOR_CHANNEL")
    if not channel:
        raise Http404("OFFLOAD_OPERATOR_CHANNEL is off")
    return channel


def operator_page(request: HttpRequest) -> HttpResponse:
    """``GET /operator/``: the live operator page (staff only; anonymous users are sent to log in)."""
    refusal = _staff_only(request)
    if refusal is not None:
        return refusal
    channel = _channel()
    config = {
        "channel": channel,
        "token": subscription_token(channel, user=request.user),
        "tokenUrl": reverse("offload:operator-token"),
        "wsUrl": reverse("offload:ws"),
        "interval": conf.get("OFFLOAD_STATS_INTERVAL"),
    }
    context = {"config": config, "drops": DROPS, "username": request.user.get_username()}
    response = render(request, "offload/operator.html", context)
    response["Cache-Control"] = "no-store"
    return response


def operator_token(request: HttpRequest) -> JsonResponse:
    """``GET /operator/token``: ``{"token": ...}``, a fresh subscription token for the
    operator channel, bound to this staff user (the page asks on every resubscribe)."""
    if not request.user.is_authenticated:
        raise DjangoPermissionDenied("log in first")
    _staff_only(request)
    token = subscription_token(_channel(), user=request.user)
    return JsonResponse({"token": token}, headers={"Cache-Control": "no-store"})
