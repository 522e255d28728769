"""One numbering of publishes shared by every publisher and subscriber of the bench (stdlib only).

Publish number ``g`` goes to channel ``g % C`` of the run's ``C`` channels,
where it is that channel's message ``g // C``; its data is ``{"t": <time_ns
at publish>, "seq": g}`` (padded with ``"p"`` when a scenario wants big
messages). Subscriber ``i`` listens on channel ``i % C``. So whoever
publishes, a subscriber can tell from a message alone which publish it was
and whether it was meant for it.
"""

from __future__ import annotations

import json
import time

#: the channel names of the many-channel scenarios: ``public:mc-0`` ... (``public``: anyone may subscribe)
PREFIX = "public:mc-"


def names(cfg: dict) -> list[str]:
    """The run's channels: ``[cfg["channel"]]``, or ``cfg["channels"]`` of them named ``public:mc-<i>``."""
    if cfg.get("channel"):
        return [cfg["channel"]]
    return [f"{PREFIX}{i}" for i in range(int(cfg["channels"]))]


def stamp(g: int, size: int = 0) -> bytes:
    """The data of publish ``g``: compact JSON, ``t`` and ``seq`` first (what :func:`parse_stamp` reads)."""
    head = b'{"t":%d,"seq":%d' % (time.time_ns(), g)
    if size <= len(head) + 1:
        return head + b"}"
    return head + b',"p":"' + b"x" * max(0, size - len(head) - 8) + b'"}'


def parse_stamp(raw: bytes) -> tuple[int, int]:
    """``(t, seq)`` of a stamp from its first bytes, without a JSON parser (much cheaper per delivery)."""
    comma = raw.find(b',"seq":', 0, 64)
    if not raw.startswith(b'{"t":') or comma < 0:
        data = json.loads(raw)
        return data["t"], data["seq"]
    end = raw.find(b",", comma + 7, comma + 40)
    return int(raw[5:comma]), int(raw[comma + 7 : end if end > 0 else -1])


def expected(ranges: list[dict], channels: int) -> list[list[int]]:
    """Per channel, the per-channel numbers of the publishes in ``ranges`` (``first``, ``count``,
    ``failed``) that did not fail: what each of the channel's subscribers must receive exactly once."""
    out: list[list[int]] = [[] for _ in range(channels)]
    for r in ranges:
        skip = set(r.get("failed") or ())
        for g in range(r["first"], r["first"] + r["count"]):
            if g not in skip:
                out[g % channels].append(g // channels)
    return out
