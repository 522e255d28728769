"""Rate limits, pure: how often a client may act, and who must wait after abusing it.

* :class:`TokenBucket` bounds the frames a client may send per second
  (``OFFLOAD_MAX_MESSAGES_PER_SECOND`` with a burst of
  ``OFFLOAD_MESSAGE_BURST`` for every frame; pings and pongs also take from
  a smaller bucket of their own); unit-tested with a fake clock.
* :class:`Cooldowns` remembers, per process, the addresses whose socket was
  closed for flooding: they may not open websockets for
  ``OFFLOAD_ABUSE_COOLDOWN`` seconds, so a flooder that reconnects at once
  is refused before the handshake instead of costing one each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Cooldowns", "TokenBucket", "cooldowns"]


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


class Cooldowns:
    """Addresses refused for a while after they broke a rate limit (one process).

    Checked per process on purpose: one dict lookup on the upgrade path, with
    no Redis round trip. Penalties reach every process through the hubs'
    control channel (:mod:`offload.backend.abuse`).
    """

    _MAX = 10_000  # remembered addresses; beyond, the oldest half is forgotten

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._until: dict[str, float] = {}
        self._clock = clock

    def penalise(self, address: str, seconds: float) -> None:
        if seconds <= 0 or not address:
            return
        if len(self._until) >= self._MAX:
            for stale in list(self._until)[: self._MAX // 2]:
                del self._until[stale]
        self._until.pop(address, None)  # re-insert: dicts keep insertion order, oldest first
        self._until[address] = self._clock() + seconds

    def remaining(self, address: str) -> float:
        """Seconds ``address`` is still refused for (0: not refused)."""
        until = self._until.get(address)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._until[address]
            return 0.0
        return left


#: This process's cooldowns (checked by offload.wsgi, set through offload.backend.abuse).
cooldowns = Cooldowns()
