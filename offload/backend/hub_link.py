"""One pub/sub connection of the hub and the greenlet that owns it.

With one Redis (or a Sentinel-watched master) the hub has one link; in a
Redis Cluster it has one per shard master, each holding the channels whose
hash slot that master serves (SSUBSCRIBE). It is the same loop either way:

* it wakes when its socket is readable or when the hub changed what it wants
  (:attr:`Link.wanted`), sends the (un)subscribe commands, then drains *every*
  buffered reply (redis-py buffers them) and hands messages to the hub;
* acks: Redis answers every (un)subscribe in order; a channel is ready when
  all commands sent for it are answered and the last one subscribed;
* a lost connection loses its ready channels (the hub tells their
  subscribers) and the link reconnects with backoff and subscribes again;
* Cluster only: a ``sunsubscribe`` nobody asked for (Redis sends it when the
  slot moved away, by a migration or a failover) and a ``-MOVED``/``-ASK``
  answer mean the channel lives elsewhere now: the link drops it and the hub
  routes it again after refreshing its slot map.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import gevent
import gevent.event
import redis

from .. import metrics
from .redis_client import REDIS_ERRORS, channel_of, pubsub_channel

if TYPE_CHECKING:
    from redis.client import PubSub

__all__ = ["CONTROL", "Link", "LinkOwner"]

log = logging.getLogger("offload.backend.hub")

#: The private control channel (see offload.backend.hub.send_control).
CONTROL = "ctl"
_IDLE_PING = 5.0  # seconds of silence before the link pings Redis
_BACKOFF = (0.05, 0.1, 0.2, 0.3, 0.5)  # short: live delivery must resume before history (the gap filler) is trimmed
_MAX_BATCH = 256  # messages fanned out together at most
_STARTUP_TRIES = len(_BACKOFF)  # failed first connects (about 1 s of backoff) before the link reports an outage


class LinkOwner(Protocol):
    """What a link calls on its hub (:class:`offload.backend.hub.Hub`)."""

    _local: Mapping[str, Any]  # the channels local subscribers want
    _closed_reconnects: int

    def _fan_out(self, name: bytes, payloads: list[bytes]) -> None: ...
    def _control(self, data: bytes) -> None: ...
    def _channel_ready(self, channel: str) -> None: ...
    def _channels_lost(self, channels: list[str]) -> None: ...
    def _unsubscribed(self, channel: str) -> None: ...
    def _link_failed(self, link: Link) -> None: ...
    def _moved(self, channels: list[str]) -> None: ...
    def _slot_of(self, channel: str) -> int: ...


class Link:
    """One Redis pub/sub connection, kept subscribed to :attr:`wanted`.

    Args:
        hub: told about messages, ready and lost channels, and failures.
        wanted: the channels this link must hold, kept by the hub (the hub's
            own subscriber dict with one Redis, a set per node in a Cluster).
        connect: makes a fresh pub/sub object (not yet connected).
        sharded: SSUBSCRIBE (a Cluster node) rather than SUBSCRIBE; a sharded
            link holds the control channel only if the hub puts it in ``wanted``.
        name: for logs (the node's address).
    """

    def __init__(
        self,
        hub: LinkOwner,
        wanted: Collection[str],
        connect: Callable[[], PubSub],
        sharded: bool = False,
        name: str = "redis",
    ) -> None:
        self.hub = hub
        self.wanted = wanted
        self.name = name
        self._new_pubsub = connect
        self.sharded = sharded
        self._kind = "smessage" if sharded else "message"
        self._sent_subscribe: set[str] = set()
        self._pending_acks: dict[str, int] = {}
        self.ready: set[str] = set()
        self._wake = gevent.event.Event()
        self._pubsub: PubSub | None = None
        self._control_name = pubsub_channel(CONTROL).encode()
        self.connected = False
        self.retired = False
        self.reconnects = 0
        self._greenlet = gevent.spawn(self._run)

    def wake(self) -> None:
        """What the hub wants changed: reconcile soon."""
        self._wake.set()

    def close(self) -> None:
        """Stop now (the hub closes): no subscriber is told."""
        self.retired = True
        self._greenlet.kill()
        self._disconnect(report=False)

    def retire(self) -> None:
        """The node no longer serves slots: report its ready channels lost now and
        let the greenlet end at its next wake (never killed in a subscriber's call)."""
        self.retired = True
        lost = list(self.ready)
        self.ready.clear()
        self.hub._channels_lost(lost)
        self._wake.set()  # the greenlet closes the connection itself (it may be using it now)

    def drop(self, channel: str) -> None:
        """The hub routes ``channel`` elsewhere: lost here if it was ready."""
        if channel in self.ready:
            self.ready.discard(channel)
            self.hub._channels_lost([channel])
        self._wake.set()

    # -- the greenlet ----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        connected_once = False
        while not self.retired:
            try:
                self._connect()
                failures, connected_once = 0, True
                self._serve()
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # Redis down, or a bug: never let the hub die.
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("hub error (%s)", self.name)
                elif not connected_once and failures < _STARTUP_TRIES:
                    # A worker's hub starts with the worker, often before the embedded Redis
                    # listens: not an error (nor a metric) every deploy would raise.
                    log.info("hub waiting for Redis (%s): %s", self.name, exc)
                else:
                    log.warning("hub lost Redis (%s): %s", self.name, exc)
                    metrics.redis_failed("hub", isinstance(exc, redis.TimeoutError))
                self._disconnect()
                if self.retired:
                    break
                self.hub._link_failed(self)
                self._wake.wait(_BACKOFF[min(failures, len(_BACKOFF) - 1)])
                self._wake.clear()
                failures += 1
        self._disconnect()

    def _connect(self) -> None:
        self._pubsub = self._new_pubsub()
        if self.sharded:
            self._pubsub.ping()  # opens the connection: a node may hold no channel yet
        else:  # A private control channel opens the connection even with no interest.
            self._pubsub.subscribe(self._control_name)
        self._fd = self._pubsub.connection._sock.fileno()
        self.connected = True
        log.info("hub connected to Redis %s (pid %s)", self.name, os.getpid())

    def _disconnect(self, report: bool = True) -> None:
        was_connected = self.connected
        self.connected = False
        lost = list(self.ready)
        self.ready.clear()
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
        if report:
            self.hub._channels_lost(lost)

    def _serve(self) -> None:
        watcher = gevent.get_hub().loop.io(self._fd, 1)
        watcher.start(self._wake.set)
        last_seen = time.monotonic()
        ping_sent: float | None = None
        try:
            while not self.retired:
                self._wake.wait(timeout=_IDLE_PING)
                self._wake.clear()
                if self.retired:
                    return
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
        desired = self.wanted
        to_subscribe = [c for c in desired if c not in self._sent_subscribe]
        to_unsubscribe = [c for c in self._sent_subscribe if c not in desired]
        if to_subscribe:
            self._send(True, to_subscribe)
            self._sent_subscribe.update(to_subscribe)
        if to_unsubscribe:
            self._send(False, to_unsubscribe)
            for channel in to_unsubscribe:
                self._sent_subscribe.discard(channel)
                self.ready.discard(channel)
                self.hub._unsubscribed(channel)

    def _send(self, subscribe: bool, channels: list[str]) -> None:
        """(S)SUBSCRIBE or (S)UNSUBSCRIBE ``channels``; each command's answer is awaited (acks)."""
        pubsub = self._pubsub
        if self.sharded:  # one command per channel: a sharded command takes channels of one slot only
            command = pubsub.ssubscribe if subscribe else pubsub.sunsubscribe
            for channel in channels:
                command(pubsub_channel(channel))
        else:
            command = pubsub.subscribe if subscribe else pubsub.unsubscribe
            command(*[pubsub_channel(c) for c in channels])
        for channel in channels:
            self._pending_acks[channel] = self._pending_acks.get(channel, 0) + 1

    def _drain(self) -> bool:
        """Handle every reply already received. Returns True if any was.

        Messages are grouped per channel and fanned out once per group, so a
        burst costs one write per socket rather than one per message.
        """
        got = False
        get_message = self._pubsub.get_message
        control = self._control_name
        kind_of_message = self._kind
        fan_out = self.hub._fan_out
        batch: dict[bytes, list[bytes]] = {}
        size = 0
        while True:
            try:
                message = get_message(timeout=0)
            except redis.ResponseError as exc:  # Cluster: -MOVED/-ASK for a (s)subscribe
                self._redirected(exc)
                got = True
                continue
            if message is None:
                break
            got = True
            kind = message["type"]
            if kind == kind_of_message and message["channel"] == control:
                self.hub._control(message["data"])
            elif kind == kind_of_message:
                batch.setdefault(message["channel"], []).append(message["data"])
                size += 1
                if size >= _MAX_BATCH:
                    for name, payloads in batch.items():
                        fan_out(name, payloads)
                    batch, size = {}, 0
            elif kind in ("subscribe", "unsubscribe", "ssubscribe", "sunsubscribe"):
                self._ack(kind, channel_of(message["channel"]))
        if batch and not self.retired:
            for name, payloads in batch.items():
                fan_out(name, payloads)
        return got

    def _ack(self, kind: str, channel: str) -> None:
        left = self._pending_acks.get(channel, 0) - 1
        if left < 0:  # nothing asked: Redis dropped the channel (its slot moved)
            if kind == "sunsubscribe" and channel in self._sent_subscribe:
                log.info("hub: %s no longer serves %s", self.name, channel)
                self._sent_subscribe.discard(channel)
                self.drop(channel)
                self.hub._moved([channel])
            return
        if left > 0:
            self._pending_acks[channel] = left
            return
        self._pending_acks.pop(channel, None)
        if channel in self._sent_subscribe and channel not in self.ready and channel != CONTROL:
            self.ready.add(channel)
            self.hub._channel_ready(channel)

    def _redirected(self, exc: redis.ResponseError) -> None:
        """A ``-MOVED <slot> <node>``/``-ASK`` answer: every channel of that slot
        awaiting an answer here belongs elsewhere (Redis names no channel)."""
        if not isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError)):
            raise exc
        slot_of = self.hub._slot_of
        moved = []
        for channel in [c for c in self._pending_acks if slot_of(c) == exc.slot_id]:
            del self._pending_acks[channel]
            if channel in self._sent_subscribe:  # not an answer to a sunsubscribe: the channel is elsewhere
                self._sent_subscribe.discard(channel)
                self.drop(channel)
                moved.append(channel)
        log.info("hub: %s redirected %s (%s)", self.name, moved, exc)
        self.hub._moved(moved)
