"""Lifecycle signals: connections and subscriptions, for auditing and app state.

::

    from django.dispatch import receiver
    from offload.signals import connected

    @receiver(connected)
    def audit(sender, identity, connection_id, transport, **kwargs):
        Visit.objects.create(user_id=identity.user_id, connection=connection_id)

Connect receivers in an ``AppConfig.ready()`` (or a module it imports), as for
any Django signal. Every signal is sent with ``sender=None`` and these keyword
arguments:

* ``identity``: the :class:`offload.policies.Identity` of the client;
* ``connection_id``: a random hex string, unique per websocket or event stream;
* ``transport``: ``"websocket"`` or ``"sse"``;
* ``channel`` (``subscribed`` and ``unsubscribed`` only).

For one connection they come in order: ``connected``; ``subscribed`` once a
subscription is confirmed (its ``subscribed`` reply sent) and ``unsubscribed``
when it ends, whether the client unsubscribed or the connection ended; then
``disconnected``. A subscription that never went through sends neither.

Receivers never run on the event loop and never delay a connection: each
event is queued, and one dispatcher per worker process calls the receivers in
a handler thread (they may use the ORM), one event after the other, in order
(:mod:`offload.transports.lifecycle`). At most ``OFFLOAD_SIGNAL_QUEUE_SIZE``
events wait per worker; beyond, new events are dropped (counted and logged),
so a receiver slower than the connections come and go loses events rather
than memory. A receiver's exception is logged (``django.dispatch``) and the
other receivers still run. With no receiver connected, an event costs one check.
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["connected", "disconnected", "subscribed", "unsubscribed"]

#: A websocket opened (after the handshake) or an event stream started.
connected = Signal()
#: A websocket or event stream ended (after the ``unsubscribed`` of its channels).
disconnected = Signal()
#: A subscription was confirmed (its ``subscribed`` reply sent); kwarg ``channel``.
subscribed = Signal()
#: A confirmed subscription ended (unsubscribe, or the connection ended); kwarg ``channel``.
unsubscribed = Signal()
