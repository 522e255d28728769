"""offload: a real-time and offloading layer for Django on uWSGI.

Public API::

    offload.publish(channel, data, *, on_commit=True, using=None) -> message id
        (None inside transaction.atomic(): it goes out after the commit)
    offload.connection_token(user, *, ttl=None) -> token   (connect without the session cookie)
    offload.subscription_token(channel, *, user=None, ttl=None) -> token   ("token" namespaces)
    @offload.rpc("name")  def method(identity, data) -> reply data   (server-side handlers)
    offload.presence(channel, *, after=None, limit=100) -> members page; offload.presence_count(channel)
    raise offload.Rejected(reason, code="...")   (an RPC method or publish hook refuses)
    offload.signals.connected / disconnected / subscribed / unsubscribed   (lifecycle)

The architecture, in layers whose dependencies point one way (README.md):

* ``core/``       - pure, no I/O: the wire protocol, the websocket protocol state
  machine, the resume cursor, the channel session, rate limits, close codes
* ``backend/``    - Redis: atomic publish (Lua), history, the per-worker hub, slots
* ``transports/`` - websockets and event streams around the session (gevent, uWSGI)
* the Django/uWSGI edge at the top level: ``views``, ``wsgi``, ``urls``,
  ``worker`` (one hub per process), ``accounts``, ``policies``, ``tokens``, ``conf``,
  ``tasks``, ``transfers``, ``upstream_gate``, ``watchdog``, ``testing`` (servers, a websocket
  client and waits for tests of any project)
* ``uwsgiconf/`` - the library's uWSGI options (``offload.ini``, the embedded Redis'
  script): a project's uwsgi.ini includes them with
  ``ini = exec://%d.venv/bin/python -m offload.uwsgiconf %d`` (docs/guide.md)
"""

#: The library's version (pyproject.toml reads it; the uWSGI options carry it, checked at app load).
__version__ = "0.4.0"

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .exceptions import (
    BackendUnavailable,
    ChannelError,
    LimitExceeded,
    OffloadError,
    OutcomeUnknown,
    PermissionDenied,
    ProtocolError,
    RefusedError,
    Rejected,
)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .backend.presence_store import presence, presence_count
    from .backend.publishing import publish
    from .handlers import rpc
    from .tokens import connection_token, subscription_token

# Where the public functions live. They are imported at first use (PEP 562), so
# that importing the pure layer (``offload.core``, e.g. in a client or a test)
# pulls in neither Django, nor redis-py, nor gevent (tests/test_architecture.py).
_PUBLIC = {
    "publish": ".backend.publishing",
    "rpc": ".handlers",
    "presence": ".backend.presence_store",
    "presence_count": ".backend.presence_store",
    "connection_token": ".tokens",
    "subscription_token": ".tokens",
}

__all__ = [
    "BackendUnavailable",
    "ChannelError",
    "LimitExceeded",
    "OffloadError",
    "OutcomeUnknown",
    "PermissionDenied",
    "ProtocolError",
    "RefusedError",
    "Rejected",
    "connection_token",
    "presence",
    "presence_count",
    "publish",
    "rpc",
    "subscription_token",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = globals()[name] = getattr(import_module(module, __name__), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
