"""Presence in Redis: who is in a channel, across workers and instances.

The truth lives in Redis only (``lua/presence.lua`` explains the model:
per-worker leases renewed by heartbeats, one member per user however many
tabs, a grace period before a leave). Every key of a channel carries the
channel as its hash tag, so each call is one script on one shard of a Redis
Cluster. Times are seconds here and milliseconds in Redis; ``now=None`` uses
Redis' own clock, which every instance shares (tests pass their own).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from .. import conf, metrics
from ..core.presence import Change, presence_event
from ..exceptions import BackendUnavailable, ChannelError
from ..policies import namespace_of
from .hub import publish_notice
from .redis_client import REDIS_ERRORS, get_client, script

__all__ = [
    "Page",
    "Sweep",
    "count",
    "join",
    "leave",
    "members",
    "presence",
    "presence_count",
    "presence_keys",
    "sweep",
]

#: Keys outlive the last renewal by this much more than a lease and a grace period.
_KEY_MARGIN = 60.0


@dataclass(frozen=True)
class Sweep:
    """What one sweep of a channel found."""

    #: Members whose grace period ended (each reported by exactly one sweep).
    left: list[str]
    #: Seconds until the channel needs its next sweep, None if never.
    next_in: float | None
    #: More expired work is due now (the sweep stopped at its budget).
    more: bool
    #: The lease was renewed; False: it had expired and its members were released.
    renewed: bool


@dataclass(frozen=True)
class Page:
    """One page of a channel's members, in name order."""

    members: list[tuple[str, Any]]
    #: Pass as ``after`` for the next page; None after the last one.
    next: str | None
    #: Members in the channel now (grace periods included).
    count: int


def presence_keys(channel: str) -> list[str]:
    """The channel's presence keys, in the order ``lua/presence.lua`` takes them."""
    base = f"{conf.get('OFFLOAD_REDIS_PREFIX')}p:{{{channel}}}:"
    return [base + part for part in ("m", "g", "n", "i", "l", "c")]


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _now(now: float | None) -> str:
    return "" if now is None else str(_ms(now))


def _call(channel: str, *args: Any) -> Any:
    try:
        return script("presence")(keys=presence_keys(channel), args=list(args))
    except REDIS_ERRORS as exc:
        metrics.redis_failed("presence", isinstance(exc, redis.TimeoutError))
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


def _key_ttl(lease_ttl: float, grace: float) -> int:
    return _ms(lease_ttl + grace + _KEY_MARGIN)


def join(
    channel: str,
    lease: str,
    entries: Iterable[tuple[str, str]],
    *,
    lease_ttl: float,
    grace: float,
    now: float | None = None,
) -> list[str]:
    """Hold ``entries`` (member, info JSON) in ``channel`` through ``lease``.

    Returns:
        The members that joined: absent before (a member in its grace period
        comes back silently).
    """
    flat = [part for entry in entries for part in entry]
    joined = _call(channel, "join", _now(now), _key_ttl(lease_ttl, grace), lease, _ms(lease_ttl), *flat)
    return [member.decode() for member in joined]


def leave(
    channel: str, lease: str, members: Iterable[str], *, lease_ttl: float, grace: float, now: float | None = None
) -> list[str]:
    """Let go of ``members``; each starts its grace period if no other lease holds it.

    Returns:
        The members that left at once (only with ``grace`` 0).
    """
    left = _call(channel, "leave", _now(now), _key_ttl(lease_ttl, grace), lease, _ms(grace), *members)
    return [member.decode() for member in left]


def sweep(
    channel: str, lease: str | None, *, lease_ttl: float, grace: float, budget: int = 1000, now: float | None = None
) -> Sweep:
    """Renew ``lease`` (the heartbeat), release expired leases, end finished grace periods."""
    left, next_in, more, renewed = _call(
        channel, "sweep", _now(now), _key_ttl(lease_ttl, grace), lease or "", _ms(lease_ttl), _ms(grace), budget
    )
    return Sweep(
        [member.decode() for member in left],
        None if next_in is None else next_in / 1000,
        bool(more),
        bool(renewed),
    )


def members(channel: str, *, after: str | None = None, limit: int = 100) -> Page:
    """A page of ``channel``'s members with their info, and the member count.

    Args:
        after: the previous page's ``next`` (None: from the start).
        limit: members per page.
    """
    m, _, _, i, _, _ = presence_keys(channel)
    try:
        with get_client().pipeline(transaction=True) as pipe:
            pipe.zrangebylex(m, "-" if after is None else f"({after}", "+", start=0, num=limit + 1)
            pipe.zcard(m)
            names, total = pipe.execute()
            page = [name.decode() for name in names[:limit]]
            infos = get_client().hmget(i, page) if page else []
    except REDIS_ERRORS as exc:
        metrics.redis_failed("presence", isinstance(exc, redis.TimeoutError))
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    # A member that left between the two reads has no info any more: it is not listed.
    entries = [(name, json.loads(info)) for name, info in zip(page, infos, strict=True) if info is not None]
    return Page(entries, page[-1] if page and len(names) > limit else None, total)


def presence(channel: str, *, after: str | None = None, limit: int = 100) -> Page:
    """``offload.presence()``: a page of a presence channel's members, and their count.

    Members are in name order; pass the page's ``next`` as ``after`` for the
    next one. ``limit`` is capped at ``OFFLOAD_PRESENCE_PAGE_SIZE``; 0 gives the
    count only. A member is listed from its first connection's subscription
    until its grace period after the last one ended (docs/presence.md).

    Raises:
        ChannelError: invalid channel, undeclared namespace, or one without
            presence (``presence_disabled``).
        BackendUnavailable: Redis is down.
    """
    _check(channel)
    _sweep_now(channel)
    return members(channel, after=after, limit=max(0, min(limit, conf.get("OFFLOAD_PRESENCE_PAGE_SIZE"))))


def presence_count(channel: str) -> int:
    """``offload.presence_count()``: how many members a presence channel has (O(1)).

    Raises: as :func:`presence`.
    """
    _check(channel)
    _sweep_now(channel)
    return count(channel)


def _sweep_now(channel: str) -> None:
    """Release what expired before answering, and announce the leaves it found.

    The workers holding a channel sweep it on their heartbeat; when all of them
    died, nobody does, and a query would list their members until the keys
    expire. One more script call (O(log n) when nothing expired) keeps every
    answer within the documented bound. Its leaves are announced at once, not
    coalesced: each is reported by exactly one sweep, whoever runs it.
    """
    result = sweep(
        channel,
        None,
        lease_ttl=conf.get("OFFLOAD_PRESENCE_LEASE_TTL"),
        grace=conf.get("OFFLOAD_PRESENCE_GRACE"),
    )
    if result.left and namespace_of(channel).namespace.join_leave:
        publish_notice(channel, presence_event(Change(channel, leaves=result.left), count(channel)))


def _check(channel: str) -> None:
    if not namespace_of(channel).namespace.presence:
        raise ChannelError(f"{channel.partition(':')[0]!r} keeps no presence", code="presence_disabled")


def count(channel: str) -> int:
    """How many members ``channel`` has (O(1))."""
    try:
        return get_client().zcard(presence_keys(channel)[0])
    except REDIS_ERRORS as exc:
        metrics.redis_failed("presence", isinstance(exc, redis.TimeoutError))
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
