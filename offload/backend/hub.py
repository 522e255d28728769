"""The hub: one Redis subscription per worker process, fanned out in-process.

Theory of operation
-------------------
Every websocket of a worker registers its channels with the worker's single
:class:`Hub`. The hub SUBSCRIBEs to a channel while at least one local socket
wants it, UNSUBSCRIBEs when the last one leaves, and hands each message to
the local subscribers of its channel. The Redis side is a *link*
(:mod:`.hub_link`): one pub/sub connection and the greenlet that owns it,
waking when the socket is readable or local interest changed, sending the
(un)subscribe commands, then draining *every* buffered reply. With one Redis
(or a Sentinel-watched master) the hub has one link; in a Redis Cluster one
per shard master, with sharded pub/sub, each channel on the link of its
slot's master (:mod:`.hub_cluster`, which follows migrations and failovers).

A subscriber learns, through callbacks, when its channel's Redis subscription
is confirmed (``channel_ready``: from now on nothing is missed, so it may read
history) and when it was lost with the connection (``channel_lost``: a gap may
open, so it must re-read history after ``channel_ready``). After a Redis
failure the link reconnects with backoff and resubscribes everything; in a
Cluster a slot that moved loses only its channels, which are subscribed on
their new master.

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

import heapq
import json
import logging
from collections.abc import Callable
from typing import Protocol

from .. import metrics
from ..core.cursor import Entry, make_entry
from ..core.protocol import StreamId
from ..exceptions import BackendUnavailable
from .history import read_tip
from .hub_cluster import ClusterRoutes
from .hub_link import CONTROL, Link
from .redis_client import REDIS_ERRORS, channel_of, get_client, new_client, pubsub_channel, topology

__all__ = ["NOTICE", "DirectSocket", "Hub", "Subscriber", "on_control", "publish_notice", "send_control"]

log = logging.getLogger("offload.backend.hub")

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
        _publish(pubsub_channel(CONTROL), json.dumps(command, separators=(",", ":")).encode())
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


def publish_notice(channel: str, text: str) -> None:
    """Send JSON ``text`` to every subscriber of ``channel`` in every worker, as a notice
    (not a message: no id, no history; presence events).

    Raises:
        BackendUnavailable: Redis is down; nobody got it.
    """
    try:
        _publish(pubsub_channel(channel), NOTICE + b" " + text.encode())
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc


def _publish(name: str, payload: bytes) -> None:
    """PUBLISH, or SPUBLISH in a Cluster (the hubs subscribe per shard there)."""
    client = get_client()
    if topology() == "cluster":
        client.spublish(name, payload)
    else:
        client.publish(name, payload)


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
        self._ready: set[str] = set()
        self._newest: dict[str, StreamId | None] = {}  # ready channels only
        self._generation = 0  # bumped when a channel is lost
        self._closed_reconnects = 0  # of links retired or closed
        self.delivered = 0
        #: channel -> messages fanned out since :meth:`take_message_counts` (the operator page's rates)
        self._messages: dict[str, int] = {}
        self._cluster = topology() == "cluster"
        if self._cluster:
            self._routes = ClusterRoutes(self)
            self._link: Link | None = None
        else:  # one link, whose wanted channels are exactly the local ones
            self._link = Link(
                self, self._local, lambda: new_client(1, retries=0).pubsub(ignore_subscribe_messages=False)
            )

    def close(self) -> None:
        """Stop the hub: its greenlets end and its Redis connections close.
        Subscribers are not told (the process is ending, or a test is)."""
        self._local.clear()
        for link in self.links:
            link.close()
        if self._cluster:
            self._routes.close()

    @property
    def links(self) -> list[Link]:
        """The hub's pub/sub connections: one, or one per Cluster master."""
        return [self._link] if self._link is not None else list(self._routes.links.values())

    @property
    def connected(self) -> bool:
        links = self.links
        return bool(links) and all(link.connected for link in links)

    @property
    def reconnects(self) -> int:
        return self._closed_reconnects + sum(link.reconnects for link in self.links)

    # -- called by subscribers ------------------------------------------------

    def subscribe(self, subscriber: Subscriber, channel: str) -> None:
        """Register local interest; ``channel_ready`` follows (maybe at once)."""
        subscribers = self._local.get(channel)
        if subscribers is None:
            subscribers = self._local[channel] = {}
            self._channel_json[channel] = json.dumps(channel).encode()
            if self._link is not None:
                self._link.wake()
            else:
                self._routes.add(channel)
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
            self._messages.pop(channel, None)
            if self._link is not None:
                self._link.wake()
            else:
                self._routes.remove(channel)

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

    # -- called by the links (offload.backend.hub_link) ---------------------

    def _channel_ready(self, channel: str) -> None:
        self._ready.add(channel)
        for subscriber in list(self._local.get(channel, ())):
            subscriber.channel_ready(channel)

    def _channels_lost(self, channels: list[str]) -> None:
        """Their subscription is gone (a connection lost, a slot moved): a gap may open."""
        if not channels:
            return
        self._generation += 1
        for channel in channels:
            self._ready.discard(channel)
            self._newest.pop(channel, None)
            subscribers = self._local.get(channel, {})
            for subscriber in subscribers:  # no direct writes until re-synchronised
                subscribers[subscriber] = None
            for subscriber in list(subscribers):
                subscriber.channel_lost(channel)

    def _unsubscribed(self, channel: str) -> None:
        self._ready.discard(channel)
        self._newest.pop(channel, None)

    def _link_failed(self, link: Link) -> None:
        if self._cluster:  # maybe a failover: ask where the slots are now
            self._routes.refresh_soon()

    def _moved(self, channels: list[str]) -> None:
        """Cluster: these channels' slots moved; route them again once the slot map is fresh."""
        self._routes.unroute(channels)

    def _slot_of(self, channel: str) -> int:
        return self._routes.slot_of(channel) if self._cluster else -1

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
        self._messages[channel] = self._messages.get(channel, 0) + len(entries)
        if channel in self._ready:
            self._newest[channel] = newest
        frames = entries[0].frame if len(entries) == 1 else b"".join([entry.frame for entry in entries])
        count = len(subscribers)
        metrics.fanned_out(entries, count * len(entries))  # one call per fan-out, whatever the socket count
        # No copy of the dict: offer() never (un)subscribes anyone.
        others = [subscriber for subscriber, ws in subscribers.items() if ws is None or not ws.offer(frames)]
        for subscriber in others:
            subscriber.deliver(channel, entries, frames)
        self.delivered += count * len(entries)

    def _notice(self, channel: str, text: str) -> None:
        for subscriber in list(self._local.get(channel, ())):
            subscriber.notice(channel, text)

    # -- stats ----------------------------------------------------------------

    def top_channels(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` local channels with the most local subscribers, most first: (channel, subscribers)."""
        return [(channel, len(subs)) for channel, subs in heapq.nlargest(n, self._local.items(), key=_size)]

    def local_subscribers(self, channel: str) -> int:
        """How many local subscribers ``channel`` has (0: none, the hub is not subscribed)."""
        return len(self._local.get(channel, ()))

    def take_message_counts(self) -> dict[str, int]:
        """Messages fanned out per local channel since the last call (and start counting again).

        One dict per call, not per message: the fan-out only adds to a count.
        A channel that lost its last local subscriber is forgotten with it.
        """
        counts, self._messages = self._messages, {}
        return counts


def _size(item: tuple[str, dict]) -> int:
    return len(item[1])
