"""Open connections per client address, counted in Redis across every worker.

:class:`ConnectionSlots` bounds open websockets per client IP across every
  worker. Each open socket is a member of a Redis sorted set per IP, scored
  with its last heartbeat; members not refreshed for ``stale_after`` seconds
  (a worker killed with SIGKILL cannot clean up) stop counting. The check and
  the add are one Lua script, so concurrent connects cannot overshoot.

Slot commands of one process go through :class:`_SlotBroker`: everything
asked for while the event loop was busy (a connect storm's acquires, the
releases of closing sockets, heartbeats) leaves in one pipelined round trip,
folded per IP (one script call takes the slots of every socket of that IP
that asked). Measured on a 5,000-socket storm, one EVALSHA per socket was
14 % of the worker's CPU. uWSGI accepts one connection per loop turn, so a
storm's acquires arrive one by one: a broker that sent less than
``_GATHER`` ago waits that long, and a storm's round trips carry several
sockets each (a lone connect still goes at once).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import gevent
import gevent.event
import redis

from .. import conf, metrics
from .redis_client import REDIS_ERRORS, get_client, script, topology

__all__ = ["ConnectionSlots"]

log = logging.getLogger("offload.backend.slots")

_GATHER = 0.002  # seconds a busy broker waits for more commands before its next round trip


class _SlotBroker:
    """Pipelines this process's slot commands: one round trip for many sockets.

    ``acquire`` waits for its answer; ``release`` and ``refresh`` do not.
    A flush greenlet sends what was queued (releases first, then heartbeats,
    then acquires in the order asked), and repeats while more arrived.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = gevent.sleep):
        self.pid = os.getpid()
        self._queue: list[tuple[str, ConnectionSlots, object]] = []
        self._flushing = False
        self._clock = clock
        self._sleep = sleep
        self._sent_at = -_GATHER  # when the last round trip left

    def acquire(self, slots: ConnectionSlots) -> bool:
        result = gevent.event.AsyncResult()
        self._push("acquire", slots, result)
        return result.get()

    def release(self, slots: ConnectionSlots) -> None:
        self._push("release", slots, None)

    def refresh(self, slots: ConnectionSlots) -> None:
        self._push("refresh", slots, None)

    def _push(self, op: str, slots: ConnectionSlots, result) -> None:
        self._queue.append((op, slots, result))
        if not self._flushing:
            self._flushing = True
            gevent.spawn(self._flush)

    def _flush(self) -> None:
        try:
            while self._queue:
                if self._clock() - self._sent_at < _GATHER:  # commands keep coming: let more gather
                    self._sleep(_GATHER)
                batch, self._queue = self._queue, []
                self._sent_at = self._clock()
                answers = self._send(batch)
                for (_, _, result), answer in zip(batch, answers, strict=True):
                    if result is not None:
                        result.set(answer)
        finally:
            self._flushing = False

    def _send(self, batch: list) -> list[bool]:
        """Run the batch; acquire answers are True/False (True when Redis fails).

        Commands are folded per key: one ZREM of every release, one ZADD of
        every heartbeat, then one script call for every acquire (a storm from
        one address costs one call, not one per socket). Releases go first, so
        a slot given back in the same batch is free for an acquire in it.
        """
        now = time.time()
        releases: dict[str, list[str]] = {}
        refreshes: dict[str, dict[str, float]] = {}
        acquires: dict[tuple[str, int, float], list[int]] = {}  # (key, limit, stale_after) -> batch indexes
        for index, (op, slots, _) in enumerate(batch):
            if op == "acquire":
                acquires.setdefault((slots.key, slots.limit, slots.stale_after), []).append(index)
            elif op == "release":
                releases.setdefault(slots.key, []).append(slots.member)
            else:
                refreshes.setdefault(slots.key, {})[slots.member] = now
        answers = [True] * len(batch)
        acquire = script("acquire_slot")
        calls = [
            (key, limit, stale_after, [batch[i][1].member for i in indexes])
            for (key, limit, stale_after), indexes in acquires.items()
        ]
        cluster = topology() == "cluster"  # a cluster pipeline refuses EVALSHA: one script call per IP key
        try:
            pipe = get_client().pipeline(transaction=False)
            for key, members in releases.items():
                pipe.zrem(key, *members)
            for key, scores in refreshes.items():
                pipe.zadd(key, scores, xx=True)
            if not cluster:
                for key, limit, stale_after, members in calls:
                    pipe.evalsha(acquire.sha, 1, key, *_script_args(now, limit, stale_after), *members)
            replies = pipe.execute(raise_on_error=False) if len(pipe) else []
        except REDIS_ERRORS as exc:
            metrics.redis_failed("slots", isinstance(exc, redis.TimeoutError))
            return answers  # availability first: Redis down must not lock everyone out
        if cluster:
            replies += [
                _call_script(acquire, key, [*_script_args(now, limit, stale_after), *members])
                for key, limit, stale_after, members in calls
            ]
        for reply in replies[: len(releases) + len(refreshes)]:
            if isinstance(reply, Exception):
                log.warning("slot release/heartbeat failed: %s", reply)
        for (key, limit, stale_after, members), indexes, reply in zip(
            calls, acquires.values(), replies[len(releases) + len(refreshes) :], strict=True
        ):
            if isinstance(reply, redis.exceptions.NoScriptError):  # Redis restarted: load it again
                try:
                    reply = acquire(keys=[key], args=[*_script_args(now, limit, stale_after), *members])
                except REDIS_ERRORS as exc:
                    reply = exc
            if isinstance(reply, Exception) or len(reply) != len(indexes):
                log.warning("slot acquire failed: %s", reply)
                continue  # fail open
            for index, taken in zip(indexes, reply, strict=True):
                answers[index] = bool(taken)
        return answers


def _call_script(acquire, key: str, args: list):
    """One acquire call on its own (Redis Cluster); the reply, or the error as a value like a pipeline's."""
    try:
        return acquire(keys=[key], args=args)
    except (*REDIS_ERRORS, redis.RedisError) as exc:
        return exc


def _script_args(now: float, limit: int, stale_after: float) -> list:
    """ARGV of ``lua/acquire_slot.lua`` before the member ids."""
    return [now, now - stale_after, limit, int(stale_after * 2) + 1]


_broker: _SlotBroker | None = None


def _get_broker() -> _SlotBroker:
    global _broker
    if _broker is None or _broker.pid != os.getpid():
        _broker = _SlotBroker()
    return _broker


class ConnectionSlots:
    """Counts open websockets per client IP in Redis (fails open if Redis is down)."""

    def __init__(self, ip: str, limit: int, stale_after: float, member: str | None = None) -> None:
        """``member``: this socket's id in the IP's set, unique across workers and instances (the
        connection's id; 16 random hex digits by default)."""
        self.ip = ip
        self.key = f"{conf.get('OFFLOAD_REDIS_PREFIX')}ip:{ip}"
        self.limit = limit
        self.stale_after = stale_after
        self.member = member if member is not None else os.urandom(8).hex()
        self.held = False

    def acquire(self) -> bool:
        """Take a slot; False if the IP already has ``limit`` open sockets.

        True as well when Redis is down (availability first).
        """
        self.held = _get_broker().acquire(self)
        return self.held

    def refresh(self) -> None:
        """Heartbeat: keep counting this socket (called on every server ping)."""
        if self.held:
            _get_broker().refresh(self)

    def release(self) -> None:
        """Give the slot back (sent with the next batch; the caller does not wait)."""
        if self.held:
            self.held = False
            _get_broker().release(self)
