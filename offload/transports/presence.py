"""Presence of this worker's connections: the gevent side of ``offload.backend.presence_store``.

Theory of operation
-------------------
A connection that is subscribed to a channel of a presence namespace is in
that channel (its ``subscribed`` reply went out; :class:`ConnectionEvents
<offload.transports.lifecycle.ConnectionEvents>` calls :meth:`Presence.enter`
and :meth:`Presence.exit`). One :class:`Presence` per worker:

* counts its connections per member (:class:`~offload.core.presence.Holdings`),
  so only a member's first connection on this worker joins in Redis and only
  its last one leaves: a user's tabs are one member;
* sends what changed from one greenlet, one script call per channel for
  everything that gathered while it worked (a connect storm is a few calls);
* renews its lease on each channel it holds every ``OFFLOAD_PRESENCE_HEARTBEAT``
  seconds, with the same call that releases the members of workers that
  stopped renewing theirs and ends grace periods (``sweep``); when its own
  lease was lost (Redis unreachable longer than the lease) it joins its
  members again;
* nets the joins and leaves Redis reports over ``OFFLOAD_PRESENCE_COALESCE``
  seconds per channel (:class:`~offload.core.presence.Coalescer`) and
  publishes each window as one ``presence`` event, a notice on the channel
  (:func:`offload.backend.hub.publish_notice`: no history): every hub passes it
  to its subscribers.

No state here is the truth: a worker that dies loses nothing that matters,
its lease expires and another worker's sweep reports its members' leaves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from .. import conf
from ..backend import presence_store
from ..backend.hub import publish_notice
from ..blocking import handler_pool
from ..core.presence import Change, Coalescer, Holdings, Schedule, presence_event
from ..exceptions import BackendUnavailable
from ..policies import Identity, namespace_of

__all__ = ["Presence", "close_presence", "member_of", "presence"]

log = logging.getLogger("offload.transports.presence")

_RETRY = 1.0  # seconds before a failed Redis call is tried again


def member_of(identity: Identity | None, connection_id: str) -> str:
    """A connection's member name: its user's id, or its own id when anonymous (one member per tab)."""
    if identity is not None and identity.user_id is not None:
        return str(identity.user_id)
    return f"anon-{connection_id}"


class Presence:
    """This worker's members in presence channels, kept in Redis.

    Args:
        lease: this worker's lease name (unique per process).
        clock: monotonic seconds (tests drive it).
        run: start the greenlet (False: tests call :meth:`work` themselves).
        redis_clock: the time the Redis scripts go by (None: Redis' own clock, the
            one every worker and instance shares; tests pass theirs).
    """

    def __init__(
        self,
        lease: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        run: bool = True,
        redis_clock: Callable[[], float] | None = None,
    ) -> None:
        self.lease = lease or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._clock = clock
        self._redis_clock = redis_clock
        self._heartbeat = conf.get("OFFLOAD_PRESENCE_HEARTBEAT")
        self._lease_ttl = conf.get("OFFLOAD_PRESENCE_LEASE_TTL")
        self._grace = conf.get("OFFLOAD_PRESENCE_GRACE")
        self._holdings = Holdings()
        #: (channel, member) -> the identity to describe it with, until its join was sent
        self._joining: dict[tuple[str, str], Identity | None] = {}
        self._leaving: set[tuple[str, str]] = set()
        #: (channel, member) -> its info, for the join events and for joining again
        self._infos: dict[tuple[str, str], dict[str, Any]] = {}
        self._coalescer = Coalescer(conf.get("OFFLOAD_PRESENCE_COALESCE"), conf.get("OFFLOAD_PRESENCE_MAX_LISTED"))
        self._schedule = Schedule()
        self._wake = gevent.event.Event()
        self._closed = False
        self._close_done = gevent.event.Event()
        self._greenlet = gevent.spawn(self._run) if run else None

    # -- connections (their greenlets; never blocks) ---------------------------------------

    def enter(self, channel: str, identity: Identity | None, connection_id: str) -> None:
        if self._closed:
            return
        member = member_of(identity, connection_id)
        if self._holdings.add(channel, member):
            key = (channel, member)
            if key in self._leaving:  # left and came back before anything was sent: nothing to send
                self._leaving.discard(key)
            else:
                self._joining[key] = identity
                self._wake.set()

    def exit(self, channel: str, identity: Identity | None, connection_id: str) -> None:
        if self._closed:
            return
        member = member_of(identity, connection_id)
        if self._holdings.remove(channel, member):
            key = (channel, member)
            if self._joining.pop(key, _MISSING) is _MISSING:
                self._leaving.add(key)
                self._wake.set()
            else:
                self._infos.pop(key, None)

    def close(self, timeout: float = 5.0) -> None:
        """Stop (the process ends): leave what this worker holds, and announce what is
        pending (the leaves of a grace of 0, the joins of a window not ended), best effort.

        Nobody else would: a member that left at once is gone from Redis, and no
        later sweep reports it. A second call waits up to ``timeout`` seconds for
        the first one to finish (the worker's exit waits for the signal handler's).
        """
        if self._closed:
            self._close_done.wait(timeout)
            return
        self._closed = True
        try:
            self._close()
        finally:
            self._close_done.set()

    def _close(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
        now = self._clock()
        leaving = _by_channel(self._leaving)  # closed before the greenlet sent them
        self._leaving.clear()
        for channel in self._holdings.channels():
            leaving.setdefault(channel, []).extend(self._holdings.members(channel))
        try:
            for channel, members in leaving.items():
                left = presence_store.leave(
                    channel,
                    self.lease,
                    members,
                    lease_ttl=self._lease_ttl,
                    grace=self._grace,
                    now=self._redis_now(),
                )
                self._coalescer.add(channel, {}, left, now)
            for change in self._coalescer.due(math.inf):
                self._announce(change)
        except BackendUnavailable:
            return  # the leases expire on their own

    def _redis_now(self) -> float | None:
        return None if self._redis_clock is None else self._redis_clock()

    # -- the greenlet -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self._timeout())
            self._wake.clear()
            try:
                self.work(self._clock())
            except BackendUnavailable as exc:
                log.warning("presence: Redis unavailable (%s): retrying in %.0f s", exc, _RETRY)
                gevent.sleep(_RETRY)
            except Exception:  # a bug: never let presence stop for good
                log.exception("presence failed")
                gevent.sleep(_RETRY)

    def _timeout(self) -> float | None:
        deadlines = [d for d in (self._schedule.next_deadline(), self._coalescer.next_deadline()) if d is not None]
        return max(0.0, min(deadlines) - self._clock()) if deadlines else None

    def work(self, now: float) -> None:
        """Send what changed, run the sweeps that are due, announce the windows that ended."""
        if self._leaving:
            leaving, self._leaving = self._leaving, set()
            try:
                for channel, members in _by_channel(leaving).items():
                    self._leave(channel, members, now)
                    leaving.difference_update((channel, member) for member in members)
            finally:
                for key in leaving:  # not sent (Redis failed): next time, unless the member came back
                    if self._joining.pop(key, _MISSING) is _MISSING:
                        self._leaving.add(key)
        if self._joining:
            joining, self._joining = self._joining, {}
            try:
                self._describe(joining)
                for channel, members in _by_channel(joining).items():
                    self._join(channel, members, now)
                    for member in members:
                        del joining[channel, member]
            finally:
                for key, identity in joining.items():  # not sent: next time, unless the member left
                    if key in self._leaving:
                        self._leaving.discard(key)
                    else:
                        self._joining.setdefault(key, identity)
        for channel in self._schedule.due(now):
            self._sweep(channel, now)
        for change in self._coalescer.due(now):
            self._announce(change)

    def _join(self, channel: str, members: list[str], now: float) -> None:
        infos = {member: self._infos.get((channel, member), {"id": member}) for member in members}
        entries = [(member, json.dumps(info)) for member, info in infos.items()]
        joined = presence_store.join(
            channel, self.lease, entries, lease_ttl=self._lease_ttl, grace=self._grace, now=self._redis_now()
        )
        self._coalescer.add(channel, {member: infos[member] for member in joined}, [], now)
        self._schedule.at(channel, now + self._heartbeat)

    def _describe(self, joining: dict[tuple[str, str], Identity | None]) -> None:
        """Fill in each new member's info; project callables run in one handler-thread trip."""
        custom = []
        for (channel, member), identity in joining.items():
            info: dict[str, Any] = {"id": member}
            if identity is not None and identity.user_id is not None:
                info.update(user=identity.user_id, name=identity.username)
            self._infos[channel, member] = info
            describe = namespace_of(channel).presence_info
            if describe is not None and identity is not None:
                custom.append((info, describe, identity))
        if custom:
            handler_pool().apply(_call_infos, (custom,))

    def _leave(self, channel: str, members: list[str], now: float) -> None:
        left = presence_store.leave(
            channel, self.lease, members, lease_ttl=self._lease_ttl, grace=self._grace, now=self._redis_now()
        )
        for member in members:
            if not self._holdings.holds(channel, member):
                self._infos.pop((channel, member), None)
        self._coalescer.add(channel, {}, left, now)
        # A grace period started: the channel needs a sweep when it ends.
        self._schedule.at(channel, now + self._grace)

    def _sweep(self, channel: str, now: float) -> None:
        held = channel in self._holdings
        result = presence_store.sweep(
            channel, self.lease if held else None, lease_ttl=self._lease_ttl, grace=self._grace, now=self._redis_now()
        )
        self._coalescer.add(channel, {}, result.left, now)
        if held and not result.renewed:
            members = self._holdings.members(channel)
            log.warning(
                "presence: the lease on %s was lost (Redis away too long): joining its %d members again",
                channel,
                len(members),
            )
            self._join(channel, members, now)
        if result.more:
            self._schedule.at(channel, now)
            return
        nexts = [now + self._heartbeat] if held else []
        if result.next_in is not None:
            nexts.append(now + result.next_in)
        self._schedule.replace(channel, min(nexts) if nexts else None)

    def _announce(self, change: Change) -> None:
        if not namespace_of(change.channel).namespace.join_leave:
            return
        publish_notice(change.channel, presence_event(change, presence_store.count(change.channel)))


_MISSING = object()


def _by_channel(keys: Any) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for channel, member in keys:
        grouped.setdefault(channel, []).append(member)
    return grouped


def _call_infos(custom: list[tuple[dict, Callable, Identity]]) -> None:
    """Add each project ``presence_info(identity)`` payload to its member's info (a handler thread)."""
    for info, describe, identity in custom:
        try:
            extra = describe(identity)
        except Exception:
            log.exception("presence_info failed for user %s", identity.user_id)
            continue
        if isinstance(extra, dict):
            info.update({key: value for key, value in extra.items() if key not in ("id", "user")})


_presence: Presence | None = None
_presence_pid: int | None = None


def close_presence() -> None:
    """The worker stops: let go of its members now (their grace periods start at
    once instead of when its leases expire). Nothing if it kept no presence."""
    if _presence is not None and _presence_pid == os.getpid():
        _presence.close()


def presence() -> Presence:
    """This worker's presence (made on first use, after the fork)."""
    global _presence, _presence_pid
    if _presence is None or _presence_pid != os.getpid():
        _presence = Presence()
        _presence_pid = os.getpid()
    return _presence
