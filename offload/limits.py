"""Per-connection and per-client limits (pure logic plus one Redis script).

* :class:`TokenBucket` bounds the messages a client may send per second
  (``OFFLOAD_MAX_MESSAGES_PER_SECOND`` with a burst of
  ``OFFLOAD_MESSAGE_BURST``); pure, so it is unit-tested with a fake clock.
* :class:`ConnectionSlots` bounds open websockets per client IP across every
  worker. Each open socket is a member of a Redis sorted set per IP, scored
  with its last heartbeat; members not refreshed for ``stale_after`` seconds
  (a worker killed with SIGKILL cannot clean up) stop counting. The check and
  the add are one Lua script, so concurrent connects cannot overshoot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from . import conf
from .redis_client import REDIS_ERRORS, get_client, script

__all__ = ["ConnectionSlots", "TokenBucket"]


class TokenBucket:
    """Allows ``rate`` events per second on average, ``burst`` at once."""

    __slots__ = ("_clock", "burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self.updated = clock()

    def allow(self) -> bool:
        """Take one token; False when the client is over its rate."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ConnectionSlots:
    """Counts open websockets per client IP in Redis (fails open if Redis is down)."""

    def __init__(self, ip: str, limit: int, stale_after: float) -> None:
        self.key = f"{conf.get('OFFLOAD_REDIS_PREFIX')}ip:{ip}"
        self.limit = limit
        self.stale_after = stale_after
        self.member = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> bool:
        """Take a slot; False if the IP already has ``limit`` open sockets."""
        now = time.time()
        try:
            self.held = bool(
                script("acquire_slot")(
                    keys=[self.key],
                    args=[now, now - self.stale_after, self.limit, self.member, int(self.stale_after * 2) + 1],
                )
            )
        except REDIS_ERRORS:
            return True  # availability first: Redis down must not lock everyone out
        return self.held

    def refresh(self) -> None:
        """Heartbeat: keep counting this socket (called on every server ping)."""
        if self.held:
            try:
                get_client().zadd(self.key, {self.member: time.time()}, xx=True)
            except REDIS_ERRORS:
                pass

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                get_client().zrem(self.key, self.member)
            except REDIS_ERRORS:
                pass
