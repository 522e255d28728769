"""Server-side handlers: RPC methods that clients call, and how project code runs.

A method is a function of the connection's identity and the call's data,
registered under a name::

    import offload

    @offload.rpc("chat.typing")
    def typing(identity, data):
        offload.publish(f"room:{data['room']}", {"typing": identity.username}, on_commit=False)
        return {"ok": True}

A client sends ``{"type":"rpc","method":"chat.typing","data":...,"ref":R}`` and
gets ``{"type":"reply","ref":R,"data":<the return value>}``, or an ``error``
(``docs/protocol.md``). Methods are registered when their module is imported:
at start-up ``offload`` imports the ``rpc`` module of every installed app (as
the admin does with ``admin.py``); register others from an
``AppConfig.ready()``.

Theory of operation
-------------------
Project code (RPC methods, namespaces' publish hooks, lifecycle signal
receivers) runs in a thread of :func:`offload.blocking.handler_pool`, never on
the event loop, so it may use the ORM and call ``offload.publish()``. This
module is the thread's side: it calls the function, encodes what it returned
as JSON text and turns what it raised into a client-visible code, all in the
thread, and hands back an :class:`Outcome`:

* :class:`~offload.exceptions.Rejected` -> its code and reason;
* any other exception -> ``internal_error`` with a generic reason, the
  traceback logged (logger ``offload.handlers``), never sent;
* a value that is not JSON-serializable -> ``internal_error``, logged.

Database connections are treated as around a request: connections past
``CONN_MAX_AGE`` (by default: all) are closed before and after each call.
The waiting side (per-connection limits, the timeout, replies) is
:mod:`offload.transports.calls`.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, transaction
from django.utils.module_loading import autodiscover_modules

from .backend.publishing import publish_json
from .core.protocol import encode_data, is_method_name
from .exceptions import BackendUnavailable, OutcomeUnknown, RefusedError, Rejected
from .policies import Identity

__all__ = ["Method", "Outcome", "autodiscover", "method", "rpc", "run_hook", "run_method", "unregister"]

log = logging.getLogger("offload.handlers")

Method = Callable[[Identity, Any], Any]
"""An RPC method: ``fn(identity, data) -> JSON-serializable value``."""

F = TypeVar("F", bound=Method)

_methods: dict[str, Method] = {}


# -- the registry --------------------------------------------------------------------


@overload
def rpc(name: F) -> F: ...


@overload
def rpc(name: str | None = None) -> Callable[[F], F]: ...


def rpc(name: str | F | None = None) -> F | Callable[[F], F]:
    """Register an RPC method: ``@offload.rpc("orders.cancel")``, or ``@offload.rpc()``
    (or plain ``@offload.rpc``) to use the function's ``__name__``.

    Raises:
        ValueError: the name is not 1 to 64 characters of ``[A-Za-z0-9_.:-]``.
        TypeError: the function cannot be called as ``fn(identity, data)``.
        django.core.exceptions.ImproperlyConfigured: another function has that name already.
    """
    if callable(name):
        return _register(name.__name__, name)

    def register(fn: F) -> F:
        return _register(fn.__name__ if name is None else name, fn)

    return register


def _register(name: str, fn: F) -> F:
    if not is_method_name(name):
        raise ValueError(f"an RPC method name is 1 to 64 characters of [A-Za-z0-9_.:-], not {name!r}")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise TypeError(f"RPC method {name!r}: {fn!r} must take (identity, data)") from None
    except ValueError:  # no signature to inspect (some builtins): trust it
        pass
    existing = _methods.get(name)
    if existing is not None and _where(existing) != _where(fn):  # the same function imported again is fine
        raise ImproperlyConfigured(f"RPC method {name!r} is registered twice: {_where(existing)} and {_where(fn)}")
    _methods[name] = fn
    return fn


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def method(name: str) -> Method | None:
    """The function registered as ``name``, or None."""
    return _methods.get(name)


def unregister(name: str) -> None:
    """Forget method ``name`` (tests)."""
    _methods.pop(name, None)


def autodiscover() -> None:
    """Import every installed app's ``rpc`` module, registering its methods."""
    autodiscover_modules("rpc")


# -- the thread's side ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler call came to: its result as JSON text, or an error for the client."""

    text: str | None = None
    code: str | None = None
    reason: str = ""


INTERNAL_ERROR = Outcome(code="internal_error", reason="internal error (the server log has the details)")


def run_method(name: str, fn: Method, identity: Identity, data: Any) -> Outcome:
    """Call RPC method ``fn`` (in a handler thread): its return value as JSON text, or the error."""
    close_old_connections()
    try:
        return Outcome(encode_data(fn(identity, data)))
    except Exception as exc:
        return _failed(exc, f"RPC method {name!r}")
    finally:
        close_old_connections()


def run_hook(
    hook: Callable[[Identity, str, Any], Any],
    identity: Identity,
    channel: str,
    data_json: str,
    max_bytes: int,
    cancelled: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Run a publish hook and publish what it returns (in a handler thread): the message id, or the error.

    The hook gets the client's data decoded; what it returns is encoded and
    checked against ``max_bytes`` again (``message_too_large``). The hook and
    the publish share one database transaction: what the hook stored is rolled
    back when the message cannot go out (Redis down, or the call timed out
    before the publish: ``cancelled()``), so the client's error never hides a
    stored message. Only when Redis timed out mid-publish (``outcome_unknown``:
    the message may be out) is the hook's work kept.
    """
    close_old_connections()
    try:
        with transaction.atomic():
            try:
                text = encode_data(hook(identity, channel, json.loads(data_json)))
            except Exception as exc:
                raise _Undo(_failed(exc, f"publish hook of {channel}")) from exc
            if len(text.encode()) > max_bytes:
                reason = f"the data to publish is larger than {max_bytes} bytes"
                raise _Undo(Outcome(code="message_too_large", reason=reason))
            if cancelled():
                raise _Undo(Outcome(code="rpc_timeout", reason="timed out before the message was published"))
            try:
                message_id = publish_json(channel, text)
            except OutcomeUnknown as exc:  # it may be out: keep what the hook stored
                return Outcome(code=exc.code, reason=exc.reason)
            except (RefusedError, BackendUnavailable) as exc:
                raise _Undo(Outcome(code=exc.code, reason=exc.reason)) from exc
            return Outcome(message_id)
    except _Undo as undo:
        return undo.outcome
    finally:
        close_old_connections()


class _Undo(Exception):
    """Roll the hook's transaction back and answer ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def _failed(exc: Exception, what: str) -> Outcome:
    if isinstance(exc, Rejected):
        return Outcome(code=exc.code, reason=exc.reason)
    log.error("%s failed", what, exc_info=exc)
    return INTERNAL_ERROR
