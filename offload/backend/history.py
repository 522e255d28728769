"""Reading a channel's history stream, for resume (``since``) and re-sync.

History lives in one Redis Stream per channel, capped at the namespace's
``history_size`` and expiring ``history_ttl`` seconds after the last publish.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from .. import metrics
from ..core.cursor import FIRST_PAGE, make_entry
from ..core.protocol import StreamId, format_stream_id, parse_stream_id
from ..core.session import CatchUp
from ..exceptions import BackendUnavailable
from .redis_client import REDIS_ERRORS, get_client, history_key

__all__ = ["CatchUp", "HistoryRead", "catch_up", "read_after", "read_tip"]

# (id, data_json) pairs, oldest first.
HistoryRead = tuple[list[tuple[str, str]], bool]


def read_after(channel: str, since: StreamId, limit: int) -> HistoryRead:
    """Messages after ``since``, and whether the resume is gap-free.

    The read includes ``since`` itself: if that entry is still retained, the
    client has missed nothing older, so ``recovered`` is True. If it was
    trimmed (or the stream expired), messages may be gone: ``recovered`` is
    False and the client gets what is still retained. This check is
    conservative and works on every Redis version.

    Raises:
        BackendUnavailable: Redis is down.
    """
    start = format_stream_id(since)
    try:
        raw = get_client().xrange(history_key(channel), min=start, max="+", count=limit + 1)
    except REDIS_ERRORS as exc:
        metrics.redis_failed("history", isinstance(exc, redis.TimeoutError))
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    entries = [(_text(mid), _text(fields[b"d"])) for mid, fields in raw]
    recovered = bool(entries) and parse_stream_id(entries[0][0]) == since
    if recovered:
        entries = entries[1:]
    return entries, recovered


def read_tip(channel: str) -> StreamId | None:
    """The newest id in the channel's history, or None if there is none.

    Raises:
        BackendUnavailable: Redis is down.
    """
    try:
        raw = get_client().xrevrange(history_key(channel), max="+", min="-", count=1)
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    return parse_stream_id(_text(raw[0][0])) if raw else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_MAX_PAGE = 1000


def catch_up(
    channel: str,
    last: StreamId | None,
    first: bool,
    newest_id: Callable[[str], StreamId | None] = read_tip,
    count: int = FIRST_PAGE,
    page_bytes: int = 256 * 1024,
) -> CatchUp:
    """One page of history for a subscription's cursor. Shared by websockets and SSE.

    A first subscription without a position needs only the newest id ("from
    now"), from ``newest_id`` (the hub's :meth:`~offload.backend.hub.Hub.newest_id`
    knows it without a Redis read once its channel is ready); otherwise up to
    ``count`` retained messages after ``last`` (from the start for a cursor
    that never had a position, e.g. a re-sync after a Redis outage) are read
    and framed as cursor entries. A replay is read page by page so that a
    socket never holds a whole history (a 6 MB history replayed to 40 sockets
    that did not read grew a worker by 1.7 GB); the next page's ``count``
    aims at ``page_bytes``.

    Raises:
        BackendUnavailable: Redis is down.
    """
    if last is None and first:
        return CatchUp([], newest_id(channel), True, False, count)
    rows, recovered = read_after(channel, last or (0, 0), count)
    metrics.history_read(resume=first and last is not None, recovered=recovered or last is None)
    channel_json = json.dumps(channel).encode()
    entries = [make_entry(channel_json, mid.encode(), data.encode()) for mid, data in rows]
    size = sum(len(entry.frame) for entry in entries)
    next_count = max(1, min(_MAX_PAGE, page_bytes * len(entries) // size)) if size else count
    return CatchUp(entries, None, recovered or last is None, len(entries) >= count, next_count)
