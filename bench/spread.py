"""Publishes spread over many channels: one numbering shared by every publisher and subscriber.

Standard library only: imported by the orchestrator and the Redis publisher
(project ``.venv``), the load clients (``bench/.venv-bench``) and the
Channels publisher (``bench/.venv-channels``).

Publish number ``g`` (counted per run, from the window's ``first``) goes to
channel ``g % channels``, where it is that channel's message number
``g // channels``; its data is ``{"t": <time_ns at publish>, "seq": g}``.
Subscriber ``i`` listens on channel ``i % channels``, so consecutive
subscribers land on different channels and every channel gets
``subscribers / channels`` of them. A subscriber can then tell from ``g``
alone whether a message was meant for it, and which one it was.
"""

from __future__ import annotations

import time

#: the channel names of the many-channel scenarios: ``public:mc-0`` ... (``public``: anyone may subscribe)
PREFIX = "public:mc-"


def channel_index(g: int, channels: int) -> int:
    """The channel (0-based) publish number ``g`` goes to."""
    return g % channels


def channel_name(index: int, prefix: str = PREFIX) -> str:
    return f"{prefix}{index}"


def body(g: int) -> bytes:
    """The message data: compact JSON, ``t`` first (what ``bench.loadclient.probe.parse_stamp`` reads)."""
    return b'{"t":%d,"seq":%d}' % (time.time_ns(), g)


def expected(first: int, count: int, channels: int, failed: list[int] | tuple = ()) -> list[list[int]]:
    """Per channel, the per-channel numbers (``g // channels``) of publishes ``first .. first+count-1``
    that did not fail: what each of the channel's subscribers must receive exactly once."""
    skip = set(failed)
    out: list[list[int]] = [[] for _ in range(channels)]
    for g in range(first, first + count):
        if g not in skip:
            out[g % channels].append(g // channels)
    return out
