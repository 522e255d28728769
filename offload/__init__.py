"""offload: a real-time and offloading layer for Django on uWSGI.

Public API::

    offload.publish(channel, data) -> message id

The architecture, one module per concept:

* ``protocol``   - message envelope and client commands (pure)
* ``frames``     - client frames via wsproto (pure)
* ``cursor``     - resume state machine: history then live (pure)
* ``policies``   - namespaces and authorization
* ``conf``       - settings with documented defaults
* ``publish``    - atomic publish + history append (Lua)
* ``history``    - reading history for resume
* ``hub``        - one Redis subscription per worker, in-process fan-out
* ``connection`` - one websocket's life on its uWSGI greenlet
* ``endpoints``  - the channels and echo endpoints
* ``views``, ``urls``, ``wsgi`` - the Django edge
"""

from .exceptions import (
    BackendUnavailable,
    ChannelError,
    LimitExceeded,
    OffloadError,
    OutcomeUnknown,
    PermissionDenied,
    ProtocolError,
    RefusedError,
)

__all__ = [
    "BackendUnavailable",
    "ChannelError",
    "LimitExceeded",
    "OffloadError",
    "OutcomeUnknown",
    "PermissionDenied",
    "ProtocolError",
    "RefusedError",
    "publish",
]


def publish(channel: str, data) -> str:
    """Publish ``data`` on ``channel``; returns the message id.

    See :func:`offload.publishing.publish` (imported lazily so that importing
    ``offload`` does not require configured Django settings).
    """
    from .publishing import publish as _publish

    return _publish(channel, data)
