"""The resume cursor: history then live, with no gap and no duplicate (sans-I/O).

Theory of operation
-------------------
A subscription must not miss a message published while it is being set up,
and must not deliver one twice. The connection therefore:

1. registers with the hub and waits until the worker's Redis SUBSCRIBE for the
   channel is confirmed; from then on every new message reaches the cursor;
2. reads history after ``since`` (or just the newest id) from the channel's
   Redis Stream;
3. emits history, then the live messages that arrived meanwhile, skipping any
   id it has already emitted.

Ids of one channel strictly increase (Redis Stream ids, assigned atomically
with PUBLISH by one Lua script), so "already emitted" is ``id <= last``.

The same cursor re-synchronises after the hub reconnects to Redis: it goes
back to SYNCING and reads history after ``last``, closing the gap of the
outage.

History is read in pages (a long replay must not sit in memory at once): a
page with ``more=True`` is emitted but the cursor stays SYNCING. The live
buffer is bounded in bytes; when it overflows it is emptied and ``dropped``
counts it. That loses nothing: every buffered message is already in the
history stream (the publish script appends before it publishes), so the
caller reads one more page whenever ``dropped`` changed during a page read.

Transitions::

    state     event                    action                               next
    --------  -----------------------  -----------------------------------  -------
    SYNCING   live(id)                 buffer it                            SYNCING
    SYNCING   live(id), buffer full    empty the buffer, dropped += 1       SYNCING
    SYNCING   history(entries, more)   emit entries > last                  SYNCING
    SYNCING   history(entries, tip)    emit entries > last, then buffered   LIVE
                                       entries > last; last = max emitted
    LIVE      live(id)                 emit if id > last (else duplicate)   LIVE
    LIVE      resync()                 —                                    SYNCING
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple

from .frames import frame_text
from .protocol import StreamId

__all__ = ["FIRST_PAGE", "ChannelCursor", "CursorState", "Entry", "make_entry"]

FIRST_PAGE = 8  # entries in a replay's first history page, before its message size is known


class CursorState(enum.IntEnum):
    SYNCING = 0
    LIVE = 1


class Entry(NamedTuple):
    """One message ready to send, framed once for every socket."""

    id: StreamId
    #: The ``message`` envelope as JSON (what an event stream sends).
    text: bytes
    #: The same envelope as a complete websocket text frame.
    frame: bytes


def make_entry(channel_json: bytes, message_id: bytes, data_json: bytes) -> Entry:
    """Build a message envelope by splicing pre-encoded JSON, and frame it.

    ``channel_json`` is the JSON string of the channel (computed once per
    channel) and ``data_json`` the stored JSON text, so nothing is re-encoded
    per message or per socket.
    """
    text = b'{"type":"message","channel":' + channel_json + b',"id":"' + message_id + b'","data":' + data_json + b"}"
    ms, _, seq = message_id.partition(b"-")
    return Entry((int(ms), int(seq)), text, frame_text(text))


class _Sync:
    """What a cursor keeps only while it syncs (a subscription's first moments, a re-sync after an outage):
    the live messages that arrived meanwhile and their frames' size, the bound on that size, how often the
    bound emptied them, and the size of the next history page. A live cursor, the common case, has none of
    it: four slots per subscription instead of eight (issue 16: memory per socket on many channels)."""

    __slots__ = ("buffer", "dropped", "max_bytes", "page_count", "size")

    def __init__(self, max_bytes: int) -> None:
        self.buffer: list[Entry] | None = None  # made at the first live message
        self.size = 0
        self.max_bytes = max_bytes
        self.dropped = 0
        self.page_count = FIRST_PAGE


class ChannelCursor:
    """Orders and de-duplicates one channel's messages for one connection."""

    __slots__ = ("_sync", "direct", "duplicates", "last")

    def __init__(self, last: StreamId | None = None, max_buffer_bytes: int = 1 << 20) -> None:
        #: Id of the newest message emitted (or the resume point).
        self.last: StreamId | None = last
        self._sync: _Sync | None = _Sync(max_buffer_bytes)  # None once LIVE
        #: The hub writes this channel's live messages straight to the socket (set by the session).
        self.direct = False
        #: How many duplicates were dropped (for tests and stats).
        self.duplicates = 0

    @property
    def state(self) -> CursorState:
        return CursorState.LIVE if self._sync is None else CursorState.SYNCING

    @property
    def buffered(self) -> int:
        sync = self._sync
        return len(sync.buffer) if sync is not None and sync.buffer else 0

    @property
    def dropped(self) -> int:
        """How many times the live buffer overflowed and was emptied during this sync."""
        return self._sync.dropped if self._sync is not None else 0

    @property
    def page_count(self) -> int:
        """Entries to read in the next history page (sized from the last one)."""
        return self._sync.page_count if self._sync is not None else FIRST_PAGE

    @page_count.setter
    def page_count(self, count: int) -> None:
        if self._sync is not None:
            self._sync.page_count = count

    def live(self, entry: Entry) -> list[Entry]:
        """A live message arrived. Returns what to send now (0 or 1 entry)."""
        sync = self._sync
        if sync is not None:
            size = len(entry.frame)
            if sync.size + size > sync.max_bytes:
                sync.buffer = None  # history holds them all: re-read instead of keeping them
                sync.dropped += 1
            if sync.buffer is None:
                sync.buffer, sync.size = [], 0
            sync.buffer.append(entry)
            sync.size += size
            return []
        return self._admit(entry)

    def live_many(self, entries: list[Entry]) -> list[Entry] | None:
        """A batch of live messages (id order) arrived.

        Returns None when the whole batch is admitted as it is (the hot path:
        the caller sends the batch's pre-joined frames in one write), else
        the entries to send now (possibly none).
        """
        if self._sync is None and (self.last is None or entries[0].id > self.last):
            self.last = entries[-1].id
            return None
        out: list[Entry] = []
        for entry in entries:
            out.extend(self.live(entry))
        return out

    def history(self, entries: Iterable[Entry], tip: StreamId | None, *, more: bool = False) -> list[Entry]:
        """History was read. Returns everything to send, in order; goes LIVE
        unless ``more`` pages follow.

        Args:
            entries: retained messages after ``last``, oldest first.
            tip: the newest id in the stream when no ``last`` was set (a
                subscription "from now"): nothing at or below it is sent.
            more: this is not the last page: stay SYNCING, keep buffering.
        """
        if self.last is None and tip is not None:
            self.last = tip
        out: list[Entry] = []
        for entry in entries:
            out.extend(self._admit(entry))
        if more:
            return out
        sync = self._sync
        if sync is not None and sync.buffer:
            for entry in sync.buffer:
                out.extend(self._admit(entry))
        self._sync = None
        return out

    def resync(self, max_buffer_bytes: int = 1 << 20) -> None:
        """The live stream had an outage: buffer (up to ``max_buffer_bytes``) until history is re-read."""
        if self._sync is None:
            self._sync = _Sync(max_buffer_bytes)

    def _admit(self, entry: Entry) -> list[Entry]:
        if self.last is not None and entry.id <= self.last:
            self.duplicates += 1
            return []
        self.last = entry.id
        return [entry]
