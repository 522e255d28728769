"""Presence bookkeeping of one worker, without I/O: holdings, event coalescing, sweeps.

Theory of operation
-------------------
Redis holds the truth (``offload.backend.presence``): which members each
worker's lease holds, who is in a grace period, who left. A worker only
keeps what it needs to talk to Redis economically:

* :class:`Holdings` counts this worker's connections per (channel, member):
  only the first connection of a member sends a join, only the last one a
  leave, so a user's tabs on one worker cost one entry.
* :class:`Coalescer` gathers the joins and leaves Redis reported for a
  channel during a short window and nets them out: a member who left and
  came back within the window makes no event at all. A window with more
  changes than clients should be shown one by one becomes a single
  ``reset`` (the member count, and "ask again"): a reload's reconnect storm
  of thousands of sockets is a handful of messages per channel, and what a
  client shows still converges on the true list.
* :class:`Schedule` says when each channel needs its next heartbeat or sweep.

Everything takes ``now`` from the caller: the tests drive time by hand.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Change", "Coalescer", "Holdings", "Schedule", "presence_event"]


class Holdings:
    """This worker's connections per channel and member."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, channel: str, member: str) -> bool:
        """Count one more connection; True if it is the member's first here (join it)."""
        members = self._counts.setdefault(channel, {})
        held = members.get(member, 0)
        members[member] = held + 1
        return held == 0

    def remove(self, channel: str, member: str) -> bool:
        """Count one connection less; True if it was the member's last here (leave)."""
        members = self._counts.get(channel)
        held = members.get(member, 0) if members else 0
        if held <= 1:
            if held and members is not None:
                del members[member]
                if not members:
                    del self._counts[channel]
            return held == 1
        members[member] = held - 1
        return False

    def holds(self, channel: str, member: str) -> bool:
        return member in self._counts.get(channel, ())

    def members(self, channel: str) -> list[str]:
        """The members this worker holds in ``channel`` (to join again after a lost lease)."""
        return list(self._counts.get(channel, ()))

    def channels(self) -> list[str]:
        return list(self._counts)

    def __contains__(self, channel: str) -> bool:
        return channel in self._counts


@dataclass(frozen=True)
class Change:
    """What clients of a channel are told after one coalescing window."""

    channel: str
    #: The info of each member who joined (as it was when it joined), in member order.
    joins: list[Any] = field(default_factory=list)
    leaves: list[str] = field(default_factory=list)
    #: Too many changes to list: clients re-read the members instead.
    reset: bool = False


class Coalescer:
    """Joins and leaves of each channel, netted over a window of ``window`` seconds.

    Args:
        window: seconds from a channel's first change to its event.
        max_listed: changes listed in one event; beyond, the event is a reset.
    """

    def __init__(self, window: float, max_listed: int) -> None:
        self.window = window
        self.max_listed = max_listed
        # channel -> (first change time, member -> [first op, last op, info at its last join])
        self._pending: dict[str, tuple[float, dict[str, list]]] = {}

    def add(self, channel: str, joins: Mapping[str, Any], leaves: Iterable[str], now: float) -> None:
        """Record what Redis reported: ``joins`` maps each member who joined to its info."""
        if not joins and not leaves:
            return
        _, ops = self._pending.setdefault(channel, (now, {}))
        for member, info in joins.items():
            entry = ops.setdefault(member, ["join", "join", None])
            entry[1:] = ["join", info]
        for member in leaves:
            entry = ops.setdefault(member, ["leave", "leave", None])
            entry[1] = "leave"

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(started for started, _ in self._pending.values()) + self.window

    def due(self, now: float) -> list[Change]:
        """The channels whose window has passed, as changes (netted; none if all cancelled out)."""
        changes = []
        for channel, (started, ops) in list(self._pending.items()):
            if now < started + self.window:
                continue
            del self._pending[channel]
            # Redis reports exact transitions, alternating per member: a member's
            # net change is its last op, unless it ended where it started.
            joins = [info for _, (first, last, info) in sorted(ops.items()) if first == last == "join"]
            leaves = sorted(member for member, (first, last, _) in ops.items() if first == last == "leave")
            if len(joins) + len(leaves) > self.max_listed:
                changes.append(Change(channel, reset=True))
            elif joins or leaves:
                changes.append(Change(channel, joins, leaves))
        return changes


def presence_event(change: Change, count: int) -> str:
    """The JSON text clients get for a change (``docs/protocol.md``)."""
    event: dict[str, Any] = {"type": "presence", "channel": change.channel, "count": count}
    if change.reset:
        event["reset"] = True
    else:
        event["joins"] = change.joins
        event["leaves"] = change.leaves
    return json.dumps(event, separators=(",", ":"))


class Schedule:
    """When each channel needs its next heartbeat or sweep (a heap with lazy deletion)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def at(self, channel: str, when: float) -> None:
        """Run ``channel`` at ``when`` at the latest (an earlier time already planned stays)."""
        planned = self._due.get(channel)
        if planned is not None and planned <= when:
            return
        self._due[channel] = when
        heapq.heappush(self._heap, (when, channel))

    def replace(self, channel: str, when: float | None) -> None:
        """Plan ``channel`` for exactly ``when`` (None: not at all)."""
        self._due.pop(channel, None)
        if when is not None:
            self.at(channel, when)

    def due(self, now: float) -> list[str]:
        """Channels due by ``now`` (each once), removed from the plan."""
        found = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, channel = heapq.heappop(heap)
            if self._due.get(channel) == when:
                del self._due[channel]
                found.append(channel)
        return found

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # superseded entries
        return heap[0][0] if heap else None
