"""The slice of ``docs/protocol.md`` the anchor speaks, and Channels' group names."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time

# docs/protocol.md: namespace 1-32 of [A-Za-z0-9_-], name 1-128 of [A-Za-z0-9_.@=-]
CHANNEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}:[A-Za-z0-9_.@=-]{1,128}$")
_GROUP_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def group_for(channel: str) -> str:
    """Channels group of a channel (only ``[a-zA-Z0-9._-]``, under 100 characters): ``public:bench`` ->
    ``public.bench``, other unsafe characters ``-<hex>-``, a name still too long its hash."""
    group = _GROUP_UNSAFE.sub(lambda m: f"-{ord(m.group()):02X}-", channel.replace(":", ".", 1))
    return group if len(group) < 99 else "h." + hashlib.sha1(channel.encode()).hexdigest()


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def message(channel: str, message_id: str, data_json: str) -> str:
    """A ``message`` envelope, built once per publish (as the project frames once)."""
    return '{"type":"message","channel":' + json.dumps(channel) + ',"id":"' + message_id + '","data":' + data_json + "}"


_seq = itertools.count()


def next_id() -> str:
    """``<ms>-<n>`` ids that strictly increase in this process (``next()`` of a count is atomic under the GIL):
    Channels has none; this imitates a Redis Stream's."""
    return f"{time.time_ns() // 1_000_000}-{next(_seq)}"
