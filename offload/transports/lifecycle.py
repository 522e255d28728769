"""Lifecycle events of websockets and event streams, delivered to :mod:`offload.signals`.

Theory of operation
-------------------
The channel session emits a connection's events (``connected``,
``subscribed``, ``unsubscribed``, ``disconnected``) through the small callable
it was given, a :class:`ConnectionEvents` (the session stays free of Django).
The same events keep presence (``subscribed``/``unsubscribed`` on a channel of
a presence namespace enter and leave it: :mod:`offload.transports.presence`).
Emitting must cost nothing that a connection would wait for:

* no receiver connected (``Signal.has_listeners()``, checked per event): nothing happens;
* otherwise the event is appended to this worker's :class:`Dispatcher` queue
  and the emitter goes on. If the queue holds ``OFFLOAD_SIGNAL_QUEUE_SIZE``
  events already, the event is dropped, counted (:attr:`Dispatcher.dropped`)
  and logged once per overflow, never waited for;
* one greenlet per worker takes the queued events in order and sends them, a
  batch at a time, in a thread of :func:`offload.blocking.handler_pool`
  (receivers may use the ORM). Events are sent one after the other, so a
  connection's ``connected`` always reaches the receivers before its
  ``disconnected``; a slow receiver delays only the events behind it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

import gevent
import gevent.event
from django.db import close_old_connections
from django.dispatch import Signal

from .. import conf, signals
from ..blocking import handler_pool
from ..policies import Identity, namespace_of
from .presence import presence

__all__ = ["ConnectionEvents", "Dispatcher", "dispatcher", "new_connection_id"]

log = logging.getLogger("offload.transports.lifecycle")

_BATCH = 100  # events sent per trip to a handler thread

_SIGNALS: dict[str, Signal] = {
    "connected": signals.connected,
    "disconnected": signals.disconnected,
    "subscribed": signals.subscribed,
    "unsubscribed": signals.unsubscribed,
}


def new_connection_id() -> str:
    """A connection's id: 16 random hex digits (from the OS: workers forked
    from one master would share the ``random`` module's sequence)."""
    return os.urandom(8).hex()


class ConnectionEvents:
    """One connection's ``notify(event, channel=None)``, given to its channel session.

    One per socket: ``__slots__`` keeps it small (thousands per worker).
    """

    __slots__ = ("connection_id", "identity", "transport")

    def __init__(self, identity: Identity | None, connection_id: str, transport: str) -> None:
        self.identity = identity
        self.connection_id = connection_id
        self.transport = transport

    def __call__(self, event: str, channel: str | None = None) -> None:
        if channel is not None and namespace_of(channel).namespace.presence:
            if event == "subscribed":
                presence().enter(channel, self.identity, self.connection_id)
            elif event == "unsubscribed":
                presence().exit(channel, self.identity, self.connection_id)
        signal = _SIGNALS[event]
        # An empty receiver list first: has_listeners() takes a lock and sweeps dead references, on every
        # connect and subscribe of a site that listens to none of them.
        if not signal.receivers or not signal.has_listeners():
            return
        kwargs: dict[str, Any] = {
            "identity": self.identity,
            "connection_id": self.connection_id,
            "transport": self.transport,
        }
        if channel is not None:
            kwargs["channel"] = channel
        dispatcher().put(signal, kwargs)


class Dispatcher:
    """A worker's queue of lifecycle events and the one greenlet that sends them.

    Args:
        max_queued: events that may wait; beyond, new ones are dropped.
    """

    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        #: events dropped because the queue was full, since the process started
        self.dropped = 0
        self._queue: deque[tuple[Signal, dict[str, Any]]] = deque()
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._overflowing = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    def put(self, signal: Signal, kwargs: dict[str, Any]) -> None:
        """Queue ``signal.send(None, **kwargs)`` (any greenlet of this worker; never blocks)."""
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            if not self._overflowing:
                self._overflowing = True
                log.warning(
                    "lifecycle signal queue full (%d events): dropping events until the receivers catch up"
                    " (%d dropped so far)",
                    self.max_queued,
                    self.dropped,
                )
            return
        self._queue.append((signal, kwargs))
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
        self._wake.set()

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), _BATCH))]
                try:
                    handler_pool().apply(_send, (batch,))
                except Exception:  # never end the dispatcher: the next events still go out
                    log.exception("lifecycle signals could not be sent")
            self._overflowing = False


def _send(batch: list[tuple[Signal, dict[str, Any]]]) -> None:
    """Send a batch of events in order (in a handler thread)."""
    close_old_connections()
    try:
        for signal, kwargs in batch:
            signal.send_robust(None, **kwargs)  # a receiver's exception is logged by Django
    finally:
        close_old_connections()


_dispatcher: Dispatcher | None = None
_dispatcher_pid: int | None = None


def dispatcher() -> Dispatcher:
    """This worker's dispatcher (made on first use, after the fork)."""
    global _dispatcher, _dispatcher_pid
    if _dispatcher is None or _dispatcher_pid != os.getpid():
        _dispatcher = Dispatcher(conf.get("OFFLOAD_SIGNAL_QUEUE_SIZE"))
        _dispatcher_pid = os.getpid()
    return _dispatcher
