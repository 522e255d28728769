"""One client's channel subscriptions, written once for every transport.

Theory of operation
-------------------
A websocket (``offload.transports.endpoints``) and an event stream (``offload.transports.sse``) both
subscribe a client to channels and must join history and live messages with
no gap and no duplicate. :class:`ChannelSession` is that logic, once: it owns
the resume cursors, the subscriptions waiting for the hub's Redis
subscription, the history re-reads (page by page) and their retry timing,
and the hand-over to the hub's direct writes. It does no I/O of its own:

* the hub calls it (``channel_ready``, ``channel_lost``, ``deliver``: the
  :class:`~offload.backend.hub.Subscriber` interface);
* the transport calls :meth:`subscribe`, :meth:`unsubscribe`, :meth:`step`
  (with ``now``) whenever it wakes, and :meth:`next_deadline` for its timer;
* the session answers through the small :class:`Transport` interface:
  replies, messages, wake-ups, and whether history may be sent now;
* history is read through an injected function (``history``: the
  transports pass :func:`offload.backend.history.catch_up`) and the hub is passed in, so the session
  is unit-tested with neither a socket, nor Redis, nor a clock
  (``tests/test_session.py``);
* lifecycle events go out through an injected ``notify(event, channel=None)``
  (the transports pass :class:`offload.transports.lifecycle.ConnectionEvents`):
  ``connected`` from :meth:`open`, ``subscribed`` when a subscription's
  ``subscribed`` reply is sent, ``unsubscribed`` when a confirmed one ends
  (:meth:`unsubscribe`, or :meth:`close` for each one left), then
  ``disconnected`` from :meth:`close`, once.

Subscription lifecycle (per channel)::

    state      event                                   action / next
    ---------  --------------------------------------  -------------------------------
    PENDING    hub: channel_ready                      read history (page 1)
    PENDING    step(now) past subscribe timeout        transport.subscribe_failed; gone
    SYNCING    page read, more pages follow            send it; next page when the
                                                       transport can take history
    SYNCING    last page read                          reply "subscribed" (first time),
                                                       send history + buffered; LIVE
    SYNCING    history read failed (Redis)             retry after RETRY_HISTORY
    LIVE       hub: deliver                            send (or the hub writes directly)
    LIVE       hub: channel_lost                       SYNCING until channel_ready
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..exceptions import BackendUnavailable, LimitExceeded
from .cursor import ChannelCursor, Entry
from .protocol import StreamId, format_stream_id, reply

__all__ = ["RETRY_HISTORY", "CatchUp", "ChannelSession", "HubLink", "Transport"]

RETRY_HISTORY = 1.0  # seconds before re-reading history after a Redis error


class Transport(Protocol):
    """What a session needs of the connection that carries it."""

    #: The socket the hub may write live messages to itself (None: never).
    direct_socket: Any

    def send_reply(self, kind: str, channel: str, text: str, position: StreamId | None) -> None:
        """Send a JSON control message (``subscribed``, ``error``); ``position``
        is the channel's resume point it establishes, if any."""

    def send_messages(self, channel: str, entries: list[Entry], frames: bytes | None) -> None:
        """Send messages in id order; ``frames`` is their websocket frames
        joined, when the hub framed them already."""

    def can_take_history(self) -> bool:
        """May the next history page go out now? (No while the client has not
        taken the last one.)"""

    def wake(self) -> None:
        """Run :meth:`ChannelSession.step` soon (where the transport runs its endpoint: a websocket's next turn)."""

    def subscribe_failed(self, channel: str, ref: Any, code: str, reason: str) -> None:
        """A subscription gave up (Redis unavailable)."""


class HubLink(Protocol):
    """The part of :class:`offload.backend.hub.Hub` a session uses."""

    def subscribe(self, subscriber: Any, channel: str) -> None: ...

    def unsubscribe(self, subscriber: Any, channel: str) -> None: ...

    def write_directly_to(self, subscriber: Any, channel: str, socket: Any) -> None: ...

    def last_fanned_out(self, channel: str) -> StreamId | None: ...

    def newest_id(self, channel: str) -> StreamId | None: ...


@dataclass(frozen=True)
class CatchUp:
    """One page of what a subscription's cursor needs to go live."""

    entries: list[Entry]
    #: The newest id when the subscription starts "from now" (no entries then).
    tip: StreamId | None
    #: False when messages after the position may have been trimmed (a gap).
    recovered: bool
    #: The page was full: more history may follow it.
    full: bool
    #: How many entries to ask for next, for pages of about ``page_bytes``.
    next_count: int


@dataclass(slots=True)
class _Pending:
    """A subscription waiting for its first ``subscribed`` reply."""

    ref: Any
    started: float


History = Callable[..., CatchUp]
Notify = Callable[..., None]
"""``notify(event, channel=None)``: a lifecycle event (``connected``, ``subscribed``, ...)."""


class ChannelSession:
    """The channels of one client: cursors, pending subscribes, history, direct writes.

    One per open socket: ``__slots__`` keeps each small (thousands per worker).

    Args:
        transport: the connection (websocket or event stream).
        hub: this process's hub (or anything with its :class:`HubLink` methods).
        subscribe_timeout: seconds a subscription may wait for the hub.
        max_buffer_bytes: live messages buffered per channel during a history replay.
        page_bytes: target size of one history page.
        history: reads one page of history (:func:`offload.backend.history.catch_up`; a
            fake in tests).
        notify: receives the lifecycle events (None: nobody).
    """

    __slots__ = (
        "_history",
        "_max_buffer",
        "_needs_history",
        "_notify",
        "_page_bytes",
        "_pending",
        "_retry_at",
        "_subscribe_timeout",
        "cursors",
        "hub",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        hub: HubLink,
        *,
        subscribe_timeout: float,
        max_buffer_bytes: int,
        page_bytes: int,
        history: History,
        notify: Notify | None = None,
    ) -> None:
        self.transport = transport
        self.hub = hub
        self.cursors: dict[str, ChannelCursor] = {}
        # Made when needed, dropped when empty: an idle session keeps only its
        # cursors (each cursor knows whether the hub writes its channel directly).
        self._pending: dict[str, _Pending] | None = None
        self._needs_history: set[str] | None = None
        self._retry_at: float | None = None
        self._subscribe_timeout = subscribe_timeout
        self._max_buffer = max_buffer_bytes
        self._page_bytes = page_bytes
        self._history = history
        self._notify = notify

    # -- the transport's side -----------------------------------------------------

    def open(self) -> None:
        """The connection is established (emits ``connected``)."""
        if self._notify is not None:
            self._notify("connected")

    def subscribe(self, channel: str, since: StreamId | None, ref: Any, now: float, limit: int) -> bool:
        """Subscribe to ``channel`` (its policy already checked).

        Returns False if it was subscribed already (a ``subscribed`` reply was
        sent again unless it is still pending).

        Raises:
            LimitExceeded: ``limit`` subscriptions already.
        """
        if channel in self.cursors:
            if not self._is_pending(channel):
                position = self.position(channel)
                last = None if position is None else format_stream_id(position)
                text = reply("subscribed", ref, channel=channel, last_id=last, recovered=True)
                self.transport.send_reply("subscribed", channel, text, None)
            return False
        if len(self.cursors) >= limit:
            raise LimitExceeded(f"at most {limit} subscriptions per connection", code="too_many_subscriptions")
        # Thousands of sessions keep the same few names: one string each in the process.
        channel = sys.intern(channel)
        self.cursors[channel] = ChannelCursor(since, self._max_buffer)
        if self._pending is None:
            self._pending = {}
        self._pending[channel] = _Pending(ref, now)
        self.hub.subscribe(self, channel)
        return True

    def unsubscribe(self, channel: str) -> None:
        if self._notify is not None and channel in self.cursors and not self._is_pending(channel):
            self._notify("unsubscribed", channel)
        self.cursors.pop(channel, None)
        self._not_pending(channel)
        if self._needs_history is not None:
            self._needs_history.discard(channel)
        self.hub.unsubscribe(self, channel)

    def _is_pending(self, channel: str) -> bool:
        return self._pending is not None and channel in self._pending

    def _not_pending(self, channel: str) -> None:
        if self._pending is not None:
            self._pending.pop(channel, None)
            if not self._pending:
                self._pending = None

    def _need_history(self, channel: str) -> None:
        if self._needs_history is None:
            self._needs_history = set()
        self._needs_history.add(channel)

    def close(self) -> None:
        """Leave the hub (the transport ended); emits ``disconnected`` the first time."""
        notify, self._notify = self._notify, None
        for channel in list(self.cursors):
            self.hub.unsubscribe(self, channel)
            if notify is not None and not self._is_pending(channel):
                notify("unsubscribed", channel)
        self.cursors.clear()
        self._pending = None
        self._needs_history = None
        if notify is not None:
            notify("disconnected")

    def step(self, now: float) -> None:
        """Read history where the hub is ready; give up on subscriptions that waited too long."""
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
        if self._needs_history and self._retry_at is None and self.transport.can_take_history():
            for channel in list(self._needs_history):
                if self._needs_history is None:
                    break  # closed meanwhile
                self._needs_history.discard(channel)
                self._sync(channel, now)
            if not self._needs_history:
                self._needs_history = None
        for channel, pending in list(self._pending.items()) if self._pending else ():
            if now - pending.started >= self._subscribe_timeout:
                self.unsubscribe(channel)
                self.transport.subscribe_failed(
                    channel, pending.ref, "unavailable", "subscription timed out: Redis unavailable"
                )

    def next_deadline(self) -> float | None:
        """When :meth:`step` must run at the latest (None: only when woken)."""
        deadlines = [p.started + self._subscribe_timeout for p in self._pending.values()] if self._pending else []
        if self._retry_at is not None:
            deadlines.append(self._retry_at)
        return min(deadlines) if deadlines else None

    def position(self, channel: str) -> StreamId | None:
        """The id of the newest message sent on ``channel`` (brings the cursor
        up to date with what the hub wrote directly)."""
        cursor = self.cursors[channel]
        if cursor.direct:
            fanned = self.hub.last_fanned_out(channel)
            if fanned is not None and (cursor.last is None or fanned > cursor.last):
                cursor.last = fanned
        return cursor.last

    # -- the hub's side (Subscriber) ------------------------------------------------

    def channel_ready(self, channel: str) -> None:
        if channel in self.cursors:
            self._need_history(channel)
            self.transport.wake()

    def channel_lost(self, channel: str) -> None:
        cursor = self.cursors.get(channel)
        if cursor is not None:
            self.position(channel)
            cursor.resync(self._max_buffer)
            cursor.direct = False

    def notice(self, channel: str, text: str) -> None:
        """A notice on a channel (a presence event): for subscriptions already confirmed."""
        if channel in self.cursors and not self._is_pending(channel):
            self.transport.send_reply("presence", channel, text, None)

    def deliver(self, channel: str, entries: list[Entry], frames: bytes) -> None:
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        admitted = cursor.live_many(entries)
        if admitted is None:  # plain live delivery: the batch as it is
            self.transport.send_messages(channel, entries, frames)
            if not cursor.direct:  # the hub has caught up with us: let it write directly
                self._write_directly(channel, cursor)
        elif admitted:
            self.transport.send_messages(channel, admitted, None)

    # -- history ----------------------------------------------------------------------

    def _write_directly(self, channel: str, cursor: ChannelCursor) -> None:
        socket = self.transport.direct_socket
        if socket is not None:
            cursor.direct = True
            self.hub.write_directly_to(self, channel, socket)

    def _sync(self, channel: str, now: float) -> None:
        """The hub's subscription is live: send a page of history; after the last one, go live."""
        cursor = self.cursors.get(channel)
        if cursor is None:
            return
        pending = self._pending.get(channel) if self._pending else None
        dropped = cursor.dropped
        try:
            page = self._history(
                channel, cursor.last, pending is not None, self.hub.newest_id, cursor.page_count, self._page_bytes
            )
        except BackendUnavailable:
            # Stay SYNCING (live messages keep buffering) and retry shortly.
            self._need_history(channel)
            self._retry_at = now + RETRY_HISTORY
            return
        if self.cursors.get(channel) is not cursor:
            return  # unsubscribed while history was read
        cursor.page_count = page.next_count
        if pending is not None:
            self._not_pending(channel)
            start = cursor.last if cursor.last is not None else page.tip
            last_id = None if start is None else format_stream_id(start)
            text = reply("subscribed", pending.ref, channel=channel, last_id=last_id, recovered=page.recovered)
            # A channel with no history yet resumes from 0-0: all it will retain is new.
            self.transport.send_reply("subscribed", channel, text, start or (0, 0))
            if self._notify is not None:
                self._notify("subscribed", channel)
        elif not page.recovered:
            text = reply("subscribed", None, channel=channel, last_id=None, recovered=False)
            self.transport.send_reply("subscribed", channel, text, None)
        # Another page when this one was full, or when live messages were
        # dropped from the cursor's buffer while it was read (history has them).
        more = page.full or cursor.dropped != dropped
        sent = cursor.history(page.entries, page.tip, more=more)
        if sent:
            self.transport.send_messages(channel, sent, None)
        if more:
            self._need_history(channel)
            self.transport.wake()  # the next page: once the transport can take it
            return
        # Live from here on. Once every id the hub will fan out is newer than
        # what we sent, the hub may write to the socket itself; otherwise the
        # first plain live delivery switches (see deliver).
        fanned = self.hub.last_fanned_out(channel)
        if cursor.last is None or (fanned is not None and fanned >= cursor.last):
            self._write_directly(channel, cursor)
