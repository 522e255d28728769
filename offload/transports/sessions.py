"""A channel session with this deployment's settings, for either transport."""

from __future__ import annotations

from .. import conf
from ..backend.history import catch_up
from ..core.session import ChannelSession, HubLink, Transport
from ..policies import Identity
from .lifecycle import ConnectionEvents

__all__ = ["channel_session"]


def channel_session(
    transport: Transport, hub: HubLink, *, identity: Identity | None, connection_id: str, kind: str
) -> ChannelSession:
    """The session a websocket endpoint or an event stream runs (settings read here, once).

    Args:
        identity, connection_id, kind: who and which connection (``kind``:
            ``"websocket"`` or ``"sse"``), for the lifecycle signals.
    """
    return ChannelSession(
        transport,
        hub,
        subscribe_timeout=conf.get("OFFLOAD_SUBSCRIBE_TIMEOUT"),
        max_buffer_bytes=conf.get("OFFLOAD_MAX_QUEUED_BYTES"),
        page_bytes=conf.get("OFFLOAD_HISTORY_PAGE_BYTES"),
        history=catch_up,
        notify=ConnectionEvents(identity, connection_id, kind),
    )
