"""The hub: one Redis subscription per worker process, fanned out in-process.

Theory of operation
-------------------
Every websocket of a worker registers its channels with the worker's single
:class:`Hub`. The hub keeps one Redis pub/sub connection and SUBSCRIBEs to a
channel while at least one local socket wants it, UNSUBSCRIBEs when the last
one leaves. One greenlet owns that connection: it wakes when the socket is
readable or when local interest changed, sends the (un)subscribe commands,
then drains *every* buffered reply (redis-py buffers them, so reading one per
wake-up would leave messages stuck) and hands each message to the local
subscribers of its channel.

A subscriber learns, through callbacks, when its channel's Redis subscription
is confirmed (``channel_ready``: from now on nothing is missed, so it may read
history) and when it was lost with the connection (``channel_lost``: a gap may
open, so it must re-read history after ``channel_ready``). After a Redis
failure the hub reconnects with backoff and resubscribes everything.

Acks: Redis answers every SUBSCRIBE/UNSUBSCRIBE in order. A channel is ready
when all commands sent for it are acknowledged and the last one was SUBSCRIBE.

Direct writes: a subscriber whose stream is plain live delivery (no history
to merge, nothing to filter) hands the hub its socket
(:meth:`Hub.write_directly_to`). The hub then writes each message's frames
straight to that socket (its ``offer`` method, :class:`DirectSocket`) without
calling the subscriber; whoever is closing, has bytes queued or never handed
a socket over gets :meth:`Subscriber.deliver` instead. Such a subscriber's
position is the newest id the hub fanned out (:meth:`Hub.last_fanned_out`):
it must ask for it before it needs its own position (resync, replies).

Control messages: every hub also listens on a private control channel.
:func:`send_control` publishes a JSON command there (for example "close
this user's connections", after a logout) and every hub of every worker
and instance passes it to the handlers registered with
:func:`on_control`; the hub itself knows no command.

Notices: a payload whose id part is ``p`` (:func:`publish_notice`) is not a
message but a notice (a presence event): the hub passes its text to every
local subscriber of the channel (:meth:`Subscriber.notice`), outside history.

Newest ids: while a channel is ready, every new message passes through the
hub, so the newest id it saw (or read once from the history stream) stays
current. A subscription "from now" takes it from :meth:`Hub.newest_id`: a
connect storm on one channel costs one Redis read, not one per socket.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

import gevent
import gevent.event

from ..core.cursor import Entry, make_entry
from ..core.protocol import StreamId
from ..exceptions import BackendUnavailable
from .history import read_tip
from .redis_client import REDIS_ERRORS, channel_of, get_client, new_client, pubsub_channel

__all__ = ["NOTICE", "DirectSocket", "Hub", "Subscriber", "on_control", "publish_notice", "send_control"]

log = logging.getLogger("offload.backend.hub")

_CONTROL = "ctl"
_IDLE_PING = 5.0  # seconds of silence before the hub pings Redis
_BACKOFF = (0.05, 0.1, 0.2, 0.3, 0.5)  # short: live delivery must resume before history (the gap filler) is trimmed
_MAX_BATCH = 256  # messages fanned out together at most
_UNKNOWN = object()
#: The id part of a notice published on a channel (a message's is its stream id): see publish_notice.
NOTICE = b"p"
_control_handlers: list[Callable[[dict], None]] = []


def on_control(handler: Callable[[dict], None]) -> None:
    """Call ``handler(command)`` for every control command any process sends
    (see :func:`send_control`), in every hub of this process's lifetime."""
    if handler not in _control_handlers:
        _control_handlers.append(handler)


def send_control(command: dict) -> None:
    """Broadcast ``command`` (JSON-serializable) to every hub, every worker, every instance.

    Raises:
        BackendUnavailable: Redis is down; the command reached nobody.
    """
    try:
        get_client().publish(pubsub_channel(_CONTROL), json.dumps(command, separators=(",", ":")))
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


def publish_notice(channel: str, text: str) -> None:
    """Send JSON ``text`` to every subscriber of ``channel`` in every worker, as a notice
    (not a message: no id, no history; presence events).

    Raises:
        BackendUnavailable: Redis is down; nobody got it.
    """
    try:
        get_client().publish(pubsub_channel(channel), NOTICE + b" " + text.encode())
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


class Subscriber(Protocol):
    """What the hub calls on a local subscriber (a websocket connection)."""

    def channel_ready(self, channel: str) -> None: ...

    def channel_lost(self, channel: str) -> None: ...

    def deliver(self, channel: str, entries: list[Entry], frames: bytes) -> None:
        """New live messages of ``channel``, in id order; ``frames`` is all
        their websocket frames joined, ready to write in one call."""

    def notice(self, channel: str, text: str) -> None:
        """A server notice on ``channel`` that is not a message (a presence event: JSON text)."""


class DirectSocket(Protocol):
    """A socket the hub may write a channel's messages to itself."""

    def offer(self, frames: bytes) -> bool:
        """Write ``frames`` now, in order; False: deliver to the subscriber instead."""


class Hub:
    """Per-process Redis subscription and in-process fan-out.

    Start it once per process (``offload.worker.hub()`` does, after the
    fork); :meth:`close` stops it and leaves Redis.
    """

    def __init__(self, worker_id: int = 0) -> None:
        self.worker_id = worker_id
        # channel -> {subscriber: its socket for direct writes, or None}
        self._local: dict[str, dict[Subscriber, DirectSocket | None]] = {}
        self._last_fanned: dict[str, StreamId] = {}
        self._channel_json: dict[str, bytes] = {}
        self._sent_subscribe: set[str] = set()
        self._pending_acks: dict[str, int] = {}
        self._ready: set[str] = set()
        self._newest: dict[str, StreamId | None] = {}  # ready channels only
        self._generation = 0  # bumped when the Redis connection is lost
        self._wake = gevent.event.Event()
        self._pubsub = None
        self._control_name = b""
        self.connected = False
        self.delivered = 0
        self.reconnects = 0
        self._greenlet = gevent.spawn(self._run)

    def close(self) -> None:
        """Stop the hub: its greenlet ends and its Redis connection closes.
        Subscribers are not told (the process is ending, or a test is)."""
        self._greenlet.kill()
        self._local.clear()
        self._disconnect()

    # -- called by subscribers ------------------------------------------------

    def subscribe(self, subscriber: Subscriber, channel: str) -> None:
        """Register local interest; ``channel_ready`` follows (maybe at once)."""
        subscribers = self._local.get(channel)
        if subscribers is None:
            subscribers = self._local[channel] = {}
            self._channel_json[channel] = json.dumps(channel).encode()
            self._wake.set()
        subscribers.setdefault(subscriber, None)
        if channel in self._ready:
            subscriber.channel_ready(channel)

    def unsubscribe(self, subscriber: Subscriber, channel: str) -> None:
        subscribers = self._local.get(channel)
        if subscribers is None:
            return
        subscribers.pop(subscriber, None)
        if not subscribers:
            del self._local[channel]
            self._channel_json.pop(channel, None)
            self._last_fanned.pop(channel, None)
            self._wake.set()

    def write_directly_to(self, subscriber: Subscriber, channel: str, ws: DirectSocket) -> None:
        """Write ``channel``'s messages straight to ``ws`` instead of calling
        ``subscriber.deliver`` (while ``ws`` is open and has nothing queued).

        Only for a subscriber that would send every later message as it is:
        its channel is ready, its history merged, and every id the hub will
        fan out from now on is newer than what it sent. It stops at
        ``channel_lost`` and at :meth:`unsubscribe`.
        """
        subscribers = self._local.get(channel)
        if subscribers is not None and subscriber in subscribers:
            subscribers[subscriber] = ws

    def last_fanned_out(self, channel: str) -> StreamId | None:
        """The newest id of ``channel`` the hub handed to its local subscribers
        (None: none since the channel got its first local subscriber)."""
        return self._last_fanned.get(channel)

    @property
    def channels(self) -> int:
        return len(self._local)

    @property
    def subscriptions(self) -> int:
        return sum(len(s) for s in self._local.values())

    def is_ready(self, channel: str) -> bool:
        return channel in self._ready

    def newest_id(self, channel: str) -> StreamId | None:
        """The newest message id of ``channel`` (None: its history is empty).

        Call it once the channel is ready (after ``channel_ready``). Every
        message with a greater id reaches the local subscribers live, so a
        subscription "from now" may start after this id. Read from Redis only
        when the hub does not know it yet.

        Raises:
            BackendUnavailable: Redis is down.
        """
        known = self._newest.get(channel, _UNKNOWN)
        if known is not _UNKNOWN:
            return known
        generation = self._generation
        tip = read_tip(channel)  # yields: messages may pass meanwhile
        if channel in self._ready and generation == self._generation:
            known = self._newest.get(channel, _UNKNOWN)
            if known is _UNKNOWN or known is None:
                self._newest[channel] = tip
            elif tip is not None and tip > known:
                self._newest[channel] = tip
        return tip

    # -- the hub greenlet -----------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._connect()
                failures = 0
                self._serve()
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # Redis down, or a bug: never let the hub die.
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("hub error")
                else:
                    log.warning("hub lost Redis: %s", exc)
                self._disconnect()
                gevent.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                failures += 1

    def _connect(self) -> None:
        client = new_client(1, retries=0)
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        # A private control channel opens the connection even with no interest.
        self._control_name = pubsub_channel(_CONTROL).encode()
        self._pubsub.subscribe(pubsub_channel(_CONTROL))
        self._fd = self._pubsub.connection._sock.fileno()
        self.connected = True
        log.info("hub connected to Redis (pid %s)", os.getpid())

    def _disconnect(self) -> None:
        was_connected = self.connected
        self.connected = False
        lost = list(self._ready)
        self._ready.clear()
        self._newest.clear()
        self._generation += 1
        self._sent_subscribe.clear()
        self._pending_acks.clear()
        if self._pubsub is not None:
            try:
                self._pubsub.reset()
            except Exception:
                pass
            self._pubsub = None
        if was_connected:
            self.reconnects += 1
        for channel in lost:
            subscribers = self._local.get(channel, {})
            for subscriber in subscribers:  # no direct writes until re-synchronised
                subscribers[subscriber] = None
            for subscriber in list(subscribers):
                subscriber.channel_lost(channel)

    def _serve(self) -> None:
        watcher = gevent.get_hub().loop.io(self._fd, 1)
        watcher.start(self._wake.set)
        last_seen = time.monotonic()
        ping_sent: float | None = None
        try:
            while True:
                self._wake.wait(timeout=_IDLE_PING)
                self._wake.clear()
                self._reconcile()
                now = time.monotonic()
                if self._drain():
                    last_seen, ping_sent = now, None
                elif ping_sent is not None:
                    if now - ping_sent >= _IDLE_PING:  # no answer: the link is dead
                        raise ConnectionError("Redis did not answer a ping")
                elif now - last_seen >= _IDLE_PING:
                    self._pubsub.ping()
                    ping_sent = now
        finally:
            watcher.stop()

    def _reconcile(self) -> None:
        desired = self._local.keys()
        to_subscribe = [c for c in desired if c not in self._sent_subscribe]
        to_unsubscribe = [c for c in self._sent_subscribe if c not in desired]
        if to_subscribe:
            self._pubsub.subscribe(*[pubsub_channel(c) for c in to_subscribe])
            for channel in to_subscribe:
                self._sent_subscribe.add(channel)
                self._pending_acks[channel] = self._pending_acks.get(channel, 0) + 1
        if to_unsubscribe:
            self._pubsub.unsubscribe(*[pubsub_channel(c) for c in to_unsubscribe])
            for channel in to_unsubscribe:
                self._sent_subscribe.discard(channel)
                self._ready.discard(channel)
                self._newest.pop(channel, None)
                self._pending_acks[channel] = self._pending_acks.get(channel, 0) + 1

    def _drain(self) -> bool:
        """Handle every reply already received. Returns True if any was.

        Messages are grouped per channel and fanned out once per group, so a
        burst costs one write per socket rather than one per message.
        """
        got = False
        get_message = self._pubsub.get_message
        control = self._control_name
        batch: dict[bytes, list[bytes]] = {}
        size = 0
        while True:
            message = get_message(timeout=0)
            if message is None:
                break
            got = True
            kind = message["type"]
            if kind == "message" and message["channel"] == control:
                self._control(message["data"])
            elif kind == "message":
                batch.setdefault(message["channel"], []).append(message["data"])
                size += 1
                if size >= _MAX_BATCH:
                    self._fan_out_batch(batch)
                    batch, size = {}, 0
            elif kind in ("subscribe", "unsubscribe"):
                self._ack(channel_of(message["channel"]))
        if batch:
            self._fan_out_batch(batch)
        return got

    @staticmethod
    def _control(data: bytes) -> None:
        try:
            command = json.loads(data)
        except ValueError:
            log.warning("hub: malformed control message ignored: %r", data[:200])
            return
        for handler in list(_control_handlers):
            try:
                handler(command)
            except Exception:
                log.exception("hub: control handler failed")

    def _fan_out_batch(self, batch: dict[bytes, list[bytes]]) -> None:
        for name, payloads in batch.items():
            self._fan_out(name, payloads)

    def _ack(self, channel: str) -> None:
        if channel == _CONTROL:
            return
        left = self._pending_acks.get(channel, 0) - 1
        if left > 0:
            self._pending_acks[channel] = left
            return
        self._pending_acks.pop(channel, None)
        if channel in self._sent_subscribe and channel not in self._ready:
            self._ready.add(channel)
            for subscriber in list(self._local.get(channel, ())):
                subscriber.channel_ready(channel)

    def _fan_out(self, name: bytes, payloads: list[bytes]) -> None:
        channel = channel_of(name)
        subscribers = self._local.get(channel)
        if not subscribers:
            return
        channel_json = self._channel_json[channel]
        entries = []
        for payload in payloads:
            message_id, _, data = payload.partition(b" ")
            if message_id == NOTICE:
                self._notice(channel, data.decode())
                continue
            entries.append(make_entry(channel_json, message_id, data))
        if not entries:
            return
        newest = entries[-1].id
        self._last_fanned[channel] = newest
        if channel in self._ready:
            self._newest[channel] = newest
        frames = entries[0].frame if len(entries) == 1 else b"".join([entry.frame for entry in entries])
        count = len(subscribers)
        # No copy of the dict: offer() never (un)subscribes anyone.
        others = [subscriber for subscriber, ws in subscribers.items() if ws is None or not ws.offer(frames)]
        for subscriber in others:
            subscriber.deliver(channel, entries, frames)
        self.delivered += count * len(entries)

    def _notice(self, channel: str, text: str) -> None:
        for subscriber in list(self._local.get(channel, ())):
            subscriber.notice(channel, text)

    # -- stats ----------------------------------------------------------------
