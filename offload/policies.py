"""Namespace policies: who may subscribe to and publish on a channel.

A namespace declares its rules in ``settings.OFFLOAD_NAMESPACES``::

    "room":  {"subscribe": "authenticated", "publish": False}
    "user":  {"subscribe": "user"}              # user:<id> for user <id> only
    "staff": {"subscribe": "group:staff", "publish": True}
    "x":     {"subscribe": "myapp.rules.can_see"}   # custom callable
    "private": {"subscribe": "token"}           # a subscription token per channel

A rule is ``"public"``, ``"authenticated"``, ``"user"``, ``"group:<name>"``, a
callable ``rule(identity, channel) -> bool`` or a dotted path to one.
``"token"`` (subscribe only) requires a subscription token naming the channel
(:func:`offload.tokens.subscription_token`): the view that mints it decided.
``publish`` is ``False`` (server only), ``True`` (whoever may subscribe) or a
rule. Custom callables may touch the database, so the connection runs them in
a thread (``Rule.blocking``); the built-in rules only look at the
:class:`Identity` resolved once at connect time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from . import conf
from .core.protocol import split_channel
from .exceptions import ChannelError, PermissionDenied
from .tokens import ConnectionClaim, check_subscription, user_for

__all__ = [
    "ANONYMOUS",
    "Identity",
    "Rule",
    "check_publish",
    "check_subscribe",
    "compile_rule",
    "namespace_of",
    "token_identity",
]


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a websocket, resolved once at connect."""

    user_id: int | None = None
    username: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    #: Unix time at which the connection token expires (None: a session cookie, or anonymous).
    expires: float | None = field(default=None, compare=False)

    @property
    def is_authenticated(self) -> bool:
        return self.user_id is not None

    @classmethod
    def of_user(cls, user: Any, *, expires: float | None = None) -> Identity:
        """The identity of a Django user (reads their groups: a database query)."""
        if not user.is_authenticated:
            return cls()
        groups = frozenset(user.groups.values_list("name", flat=True))
        return cls(user.pk, user.get_username(), groups, expires)


ANONYMOUS = Identity()


@dataclass(frozen=True)
class Rule:
    check: Callable[[Identity, str], bool]
    blocking: bool = False
    """True for custom callables: run them off the event loop."""
    token: bool = False
    """True for ``"token"``: a subscription token decides, not ``check``."""


def _public(identity: Identity, channel: str) -> bool:
    return True


def _nobody(identity: Identity, channel: str) -> bool:
    return False


def _authenticated(identity: Identity, channel: str) -> bool:
    return identity.is_authenticated


def _same_user(identity: Identity, channel: str) -> bool:
    return identity.is_authenticated and split_channel(channel)[1] == str(identity.user_id)


def compile_rule(spec: Any) -> Rule:
    """Turn a rule from the settings into a :class:`Rule`.

    Raises:
        django.core.exceptions.ImproperlyConfigured: unknown rule.
    """
    if spec is False or spec is None:
        return Rule(_nobody)
    if callable(spec):
        return Rule(spec, blocking=True)
    if spec == "public":
        return Rule(_public)
    if spec == "authenticated":
        return Rule(_authenticated)
    if spec == "user":
        return Rule(_same_user)
    if spec == "token":
        return Rule(_nobody, token=True)
    if isinstance(spec, str) and spec.startswith("group:") and len(spec) > 6:
        group = spec[6:]
        return Rule(lambda identity, channel: group in identity.groups)
    if isinstance(spec, str) and "." in spec:
        return Rule(_import(spec, "policy"), blocking=True)
    raise ImproperlyConfigured(f"unknown policy rule {spec!r}")


def compile_hook(spec: Any, what: str = "publish_hook") -> Callable | None:
    """A namespace's ``publish_hook`` or ``presence_info`` (a callable or a dotted path to one) as a callable.

    Raises:
        django.core.exceptions.ImproperlyConfigured: not importable, or not callable.
    """
    if spec is None:
        return None
    hook = _import(spec, what) if isinstance(spec, str) else spec
    if not callable(hook):
        raise ImproperlyConfigured(f"{what} {spec!r} is not callable")
    return hook


def _import(spec: str, what: str) -> Any:
    try:
        return import_string(spec)
    except ImportError as exc:
        raise ImproperlyConfigured(f"{what} {spec!r} cannot be imported: {exc}") from exc


@dataclass(frozen=True)
class CompiledNamespace:
    namespace: conf.Namespace
    subscribe: Rule
    publish: Rule
    #: hook(identity, channel, data) -> data for client publishes (None: publish as sent).
    publish_hook: Callable[[Identity, str, Any], Any] | None = None
    #: presence_info(identity) -> dict shown with each member (None: id and name only).
    presence_info: Callable[[Identity], Any] | None = None


@cache
def _compiled() -> dict[str, CompiledNamespace]:
    result = {}
    for name, ns in conf.namespaces().items():
        sub = compile_rule(ns.subscribe)
        pub = sub if ns.publish is True else compile_rule(ns.publish)
        if pub.token:
            raise ImproperlyConfigured(
                f"OFFLOAD_NAMESPACES[{name!r}]: a subscription token gates subscribing only;"
                " set publish to False or to another rule"
            )
        result[name] = CompiledNamespace(
            ns, sub, pub, compile_hook(ns.publish_hook), compile_hook(ns.presence_info, "presence_info")
        )
    return result


def reset_cache() -> None:
    """Forget compiled policies (tests that override settings call this)."""
    _compiled.cache_clear()


def namespace_of(channel: str) -> CompiledNamespace:
    """Return the declared namespace of ``channel``.

    Raises:
        ChannelError: invalid name (``invalid_channel``) or undeclared
            namespace (``unknown_namespace``).
    """
    namespace, _ = split_channel(channel)
    try:
        return _compiled()[namespace]
    except KeyError:
        raise ChannelError(f"namespace {namespace!r} is not declared", code="unknown_namespace") from None


def check_subscribe(
    identity: Identity,
    channel: str,
    run_blocking: Callable | None = None,
    *,
    token: str | None = None,
    now: float | None = None,
) -> CompiledNamespace:
    """Raise :class:`PermissionDenied` unless ``identity`` may subscribe.

    Args:
        token: the subscription token sent with the subscribe (only a
            ``"token"`` namespace reads it).
        now: unix time the token's expiry is checked against (default: now).

    Raises:
        PermissionDenied: ``forbidden``, or for a ``"token"`` namespace
            ``token_invalid`` / ``token_expired``.
    """
    ns = namespace_of(channel)
    if ns.subscribe.token:
        if token is None:
            raise PermissionDenied(f"subscribing to {channel} needs a subscription token")
        check_subscription(token, channel, identity.user_id, now=time.time() if now is None else now)
    elif not _allowed(ns.subscribe, identity, channel, run_blocking):
        raise PermissionDenied(f"not allowed to subscribe to {channel}")
    return ns


def check_publish(identity: Identity, channel: str, run_blocking: Callable | None = None) -> CompiledNamespace:
    """Raise :class:`PermissionDenied` unless ``identity`` may publish."""
    ns = namespace_of(channel)
    if not _allowed(ns.publish, identity, channel, run_blocking):
        raise PermissionDenied(f"clients may not publish to {channel}", code="publish_forbidden")
    return ns


def _allowed(rule: Rule, identity: Identity, channel: str, run_blocking: Callable | None) -> bool:
    if rule.blocking and run_blocking is not None:
        return bool(run_blocking(rule.check, identity, channel))
    return bool(rule.check(identity, channel))


def token_identity(claim: ConnectionClaim) -> Identity:
    """The identity a verified connection token names, its expiry included.

    Reads the database (the user, their groups): call it off the event loop.

    Raises:
        PermissionDenied: ``token_invalid`` (the user is gone, deactivated, or changed their password).
    """
    return Identity.of_user(user_for(claim), expires=claim.expires)
