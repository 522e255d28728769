"""The event-stream wire format (pure): events, resume ids, resume positions.

Imports no gevent, uwsgi, redis or Django, so every rule of the format is
unit-tested without I/O (tests/test_sse_format.py). The stream itself is
:mod:`offload.transports.sse`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..exceptions import ChannelError, ProtocolError
from .protocol import StreamId, format_stream_id, parse_stream_id, validate_channel

__all__ = ["PING", "RETRY", "format_event", "format_resume_id", "parse_resume_id", "resume_positions"]

#: First bytes of every stream: reconnect 2 s after the stream ends.
RETRY = b"retry: 2000\n\n"
#: Keep-alive comment: proxies keep the stream open, dead clients fail the write.
PING = b": ping\n\n"

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")  # SSE's only line breaks (not U+2028 ...)


def format_event(data: str | bytes, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event: ``id:``, ``event:``, one ``data:`` line per line, blank line.

    JSON text has no raw line breaks, so an envelope is one ``data:`` line.

    Raises:
        ValueError: ``event`` or ``event_id`` contains a line break or NUL.
    """
    if isinstance(data, str):
        data = data.encode()
    head = b""
    if event_id is not None:
        head += b"id: " + _field(event_id) + b"\n"
    if event is not None:
        head += b"event: " + _field(event) + b"\n"
    if b"\n" in data or b"\r" in data:
        return head + b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data)) + b"\n"
    return head + b"data: " + data + b"\n\n"


def _field(value: str) -> bytes:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"an SSE field cannot contain line breaks or NUL: {value!r}")
    return value.encode()


def format_resume_id(positions: Iterable[tuple[str, StreamId]]) -> str:
    """The ``id:`` of an event: ``channel=id`` for every positioned channel, comma-separated."""
    return ",".join(channel + "=" + format_stream_id(position) for channel, position in positions)


_HTTP_BLANKS = " \t"  # the optional whitespace around an HTTP header value


def parse_resume_id(value: str) -> dict[str, StreamId]:
    """Parse a ``Last-Event-ID`` written by :func:`format_resume_id`.

    Channel names may contain ``=`` but ids cannot, so each part splits at its
    last ``=``. A blank value means no positions. Only ASCII digits make an id
    and only HTTP's blanks (space, tab) are trimmed: ``str.strip()`` would also
    take the NBSP and NEL that a Latin-1 decoded header can carry.

    Raises:
        ProtocolError: ``invalid_since`` if any part is malformed.
    """
    positions: dict[str, StreamId] = {}
    value = value.strip(_HTTP_BLANKS)
    if not value:
        return positions
    for part in value.split(","):
        channel, _, position = part.rpartition("=")
        try:
            positions[validate_channel(channel)] = parse_stream_id(position)
        except (ChannelError, ProtocolError):
            raise ProtocolError(
                "Last-Event-ID must be 'channel=id' pairs separated by commas", code="invalid_since"
            ) from None
    return positions


def resume_positions(
    channels: Iterable[str], since: str | None = None, last_event_id: str | None = None
) -> dict[str, StreamId]:
    """Where each channel starts: ``Last-Event-ID`` beats ``since``, channel by channel.

    A channel missing from ``last_event_id`` falls back to ``since``; a channel
    with neither starts "from now" (it is absent from the result).

    Raises:
        ProtocolError: ``invalid_since`` if either value is malformed.
    """
    since_id = None if since is None else parse_stream_id(since)
    resumed = parse_resume_id(last_event_id) if last_event_id else {}
    positions = {}
    for channel in channels:
        position = resumed.get(channel, since_id)
        if position is not None:
            positions[channel] = position
    return positions
