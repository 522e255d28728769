"""Signed, expiring tokens for clients without the session cookie.

Mobile apps, pages on other origins and server-rendered links cannot (or
should not) carry Django's session cookie. A view of yours mints a token with
a Python call; the client passes it to the websocket or the event stream:

* a **connection token** (:func:`connection_token`) names a user and replaces
  the session cookie: ``/ws/?token=T``, ``/sse/?token=T`` or
  ``Authorization: Bearer T``;
* a **subscription token** (:func:`subscription_token`) names one channel (and
  optionally the one user it is for) of a namespace whose ``subscribe`` rule is
  ``"token"``: ``{"type":"subscribe","channel":C,"token":T}``, or
  ``sub_token=T`` in the websocket or event-stream URL.

Why ``django.core.signing`` and not JWT: it is already a dependency, it signs
with ``SECRET_KEY`` and verifies with ``SECRET_KEY_FALLBACKS`` too (the key
rotation a Django project already does), and the salt per token kind makes a
subscription token useless as a connection token and the other way round. JWT
would add a dependency and its pitfalls (``alg`` negotiation, ``none``) for
interoperability nobody needs here: only this server verifies these tokens.

A token is ``<payload>.<signature>``, both base64url without padding, so it
needs no escaping in a URL. The payload is readable JSON, so a client (offload.js)
can read the expiry ``exp`` (unix seconds, whole, rounded up) and refresh in
time; nothing secret is in it. The expiry is inside the signed payload; every
check takes ``now`` (pure, unit-tested without the wall clock). Payloads:

* connection: ``{"u": <user pk>, "exp": <unix s>, "h": <16 hex digits>}``. ``h``
  binds the token to the user's password hash (an HMAC of it under its own
  salt, like Django's session auth hash): a password change revokes every
  token minted before it, as it ends sessions. The user is loaded again at
  connect (off the event loop), so a deactivated user cannot connect with an
  old token either.
* subscription: ``{"c": <channel>, "exp": <unix s>}``, plus ``"u": <user pk>``
  when minted for one user (then only that user's connection may use it).

Refusals are :class:`~offload.exceptions.PermissionDenied` with the codes
``token_invalid`` (malformed, tampered with, wrong kind, wrong key, user gone,
deactivated or password changed) and ``token_expired``; a subscription token
for another channel or user is ``forbidden``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.core.exceptions import ValidationError
from django.utils.crypto import constant_time_compare, salted_hmac

from . import conf
from .core.protocol import MAX_TOKEN_LENGTH, validate_channel
from .exceptions import PermissionDenied

__all__ = [
    "ConnectionClaim",
    "SubscriptionClaim",
    "check_subscription",
    "check_user",
    "connection_token",
    "expiry_deadline",
    "mint_connection_token",
    "mint_subscription_token",
    "password_binding",
    "query_subscriptions",
    "subscription_token",
    "token_channel",
    "user_for",
    "verify_connection_token",
    "verify_subscription_token",
]

#: One salt per kind: a token of one kind never verifies as the other.
CONNECTION_SALT = "offload.tokens.connection"
SUBSCRIPTION_SALT = "offload.tokens.subscription"
_BINDING_SALT = "offload.tokens.password-binding"
_BINDING_LENGTH = 16  # hex digits of the password binding (64 bits)
_SEP = "."
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ConnectionClaim:
    """What a valid connection token says."""

    user_id: Any
    expires: int
    binding: str


@dataclass(frozen=True)
class SubscriptionClaim:
    """What a valid subscription token says."""

    channel: str
    expires: int
    user_id: Any = None


# -- minting -------------------------------------------------------------------------


def connection_token(user: Any, *, ttl: float | None = None) -> str:
    """A token that connects as ``user`` without the session cookie.

    Args:
        user: a Django user, or a user's primary key (the user is loaded).
        ttl: seconds it is valid (default ``OFFLOAD_CONNECTION_TOKEN_TTL``).

    Raises:
        ValueError: ``ttl`` is not positive.
        django.core.exceptions.ObjectDoesNotExist: no user with that key.
    """
    if not hasattr(user, "pk"):
        user = get_user_model()._default_manager.get(pk=user)
    ttl = conf.get("OFFLOAD_CONNECTION_TOKEN_TTL") if ttl is None else ttl
    return mint_connection_token(user.pk, password_binding(user), now=time.time(), ttl=ttl)


def subscription_token(channel: str, *, user: Any = None, ttl: float | None = None) -> str:
    """A token that lets a connection subscribe to ``channel`` (a ``"token"`` namespace).

    Args:
        channel: the one channel it opens.
        user: None (any connection holding it), or a Django user or a user's
            primary key: only that user's connection may use it.
        ttl: seconds it is valid for subscribing (default ``OFFLOAD_SUBSCRIPTION_TOKEN_TTL``).

    Raises:
        ValueError: ``ttl`` is not positive.
        offload.ChannelError: ``channel`` is not a valid channel name.
    """
    user_id = getattr(user, "pk", user)
    ttl = conf.get("OFFLOAD_SUBSCRIPTION_TOKEN_TTL") if ttl is None else ttl
    return mint_subscription_token(channel, user_id, now=time.time(), ttl=ttl)


def mint_connection_token(user_id: Any, binding: str, *, now: float, ttl: float) -> str:
    """The connection token of :func:`connection_token`, at time ``now`` (pure)."""
    if user_id is None:
        raise ValueError("a connection token names a saved user")
    return _sign(CONNECTION_SALT, {"u": _json_pk(user_id), "exp": _expiry(now, ttl), "h": binding})


def mint_subscription_token(channel: str, user_id: Any = None, *, now: float, ttl: float) -> str:
    """The subscription token of :func:`subscription_token`, at time ``now`` (pure)."""
    payload: dict[str, Any] = {"c": validate_channel(channel), "exp": _expiry(now, ttl)}
    if user_id is not None:
        payload["u"] = _json_pk(user_id)
    return _sign(SUBSCRIPTION_SALT, payload)


def password_binding(user: Any, secret: str | bytes | None = None) -> str:
    """A short HMAC of the user's password hash: it changes when the password does."""
    password = getattr(user, "password", None) or ""
    return salted_hmac(_BINDING_SALT, password, secret, algorithm="sha256").hexdigest()[:_BINDING_LENGTH]


def _expiry(now: float, ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"a token's ttl must be positive seconds, not {ttl!r}")
    return math.ceil(now + ttl)


def _json_pk(pk: Any) -> int | str:
    return pk if isinstance(pk, int) and not isinstance(pk, bool) else str(pk)


def _sign(salt: str, payload: dict) -> str:
    return signing.Signer(salt=salt, sep=_SEP).sign_object(payload)


# -- verifying (pure: the time is passed in) ----------------------------------------


def verify_connection_token(token: Any, *, now: float) -> ConnectionClaim:
    """Check a connection token's signature and expiry.

    Raises:
        PermissionDenied: ``token_invalid`` or ``token_expired``.
    """
    payload = _unsign(CONNECTION_SALT, token, "connection")
    user_id, binding = payload.get("u"), payload.get("h")
    if not isinstance(user_id, (int, str)) or isinstance(user_id, bool) or not isinstance(binding, str):
        raise _invalid("the connection token's payload is malformed")
    return ConnectionClaim(user_id, _unexpired(payload, now), binding)


def verify_subscription_token(token: Any, *, now: float) -> SubscriptionClaim:
    """Check a subscription token's signature and expiry.

    Raises:
        PermissionDenied: ``token_invalid`` or ``token_expired``.
    """
    payload = _unsign(SUBSCRIPTION_SALT, token, "subscription")
    channel, user_id = payload.get("c"), payload.get("u")
    if not isinstance(channel, str) or not isinstance(user_id, (int, str, type(None))) or isinstance(user_id, bool):
        raise _invalid("the subscription token's payload is malformed")
    return SubscriptionClaim(channel, _unexpired(payload, now), user_id)


def check_subscription(token: Any, channel: str, user_id: Any, *, now: float) -> SubscriptionClaim:
    """May the connection of ``user_id`` (None: anonymous) subscribe to ``channel`` with ``token``?

    Raises:
        PermissionDenied: ``token_invalid``, ``token_expired``, or ``forbidden``
            (a token for another channel, or minted for another user).
    """
    claim = verify_subscription_token(token, now=now)
    if claim.channel != channel:
        raise PermissionDenied(f"the subscription token is for another channel, not {channel}")
    if claim.user_id is not None and (user_id is None or str(user_id) != str(claim.user_id)):
        raise PermissionDenied(f"the subscription token for {channel} was minted for another user")
    return claim


def token_channel(token: Any) -> str | None:
    """The channel a subscription token names, read without verifying it (None: unreadable).

    For routing a ``sub_token=`` URL parameter to its channel only: the
    subscription itself verifies the token (:func:`check_subscription`).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
        return None
    encoded = token.partition(_SEP)[0]
    try:
        payload = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, binascii.Error):
        return None
    channel = payload.get("c") if isinstance(payload, dict) else None
    return channel if isinstance(channel, str) else None


def expiry_deadline(expires: float | None, wall: float, monotonic: float) -> float | None:
    """When a connection whose token expires at ``expires`` (unix time) must end, on the monotonic clock.

    Connections time everything on the monotonic clock; the expiry is wall-clock
    time (minted by any process). ``wall`` and ``monotonic`` are both clocks' now.
    None in, None out (a connection without a token never expires).
    """
    return None if expires is None else monotonic + (expires - wall)


def query_subscriptions(channels: list[str], sub_tokens: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """The subscriptions a websocket or event-stream URL asks for.

    ``channel=C`` names a channel; ``sub_token=T`` names the channel inside
    its token and carries that token (no ``channel=`` needed for it).

    Returns:
        ``({channel: its token or None}, [sub_tokens whose channel cannot be read])``,
        the ``channel=`` ones first, each channel once.
    """
    subscriptions: dict[str, str | None] = dict.fromkeys(channels)
    unreadable = []
    for token in sub_tokens:
        channel = token_channel(token)
        if channel is None:
            unreadable.append(token)
        else:
            subscriptions[channel] = token
    return subscriptions, unreadable


def _unsign(salt: str, token: Any, kind: str) -> dict:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
        raise _invalid(f"not a {kind} token")
    try:
        payload = signing.Signer(salt=salt, sep=_SEP).unsign_object(token)
    except (signing.BadSignature, ValueError):  # ValueError: a signed payload that is not JSON
        raise _invalid(f"not a valid {kind} token (tampered with, another kind, or another key)") from None
    if not isinstance(payload, dict):
        raise _invalid(f"the {kind} token's payload is malformed")
    return payload


def _unexpired(payload: dict, now: float) -> int:
    expires = payload.get("exp")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise _invalid("the token has no expiry")
    if now >= expires:
        raise PermissionDenied("the token has expired", code="token_expired")
    return expires


def _invalid(reason: str) -> PermissionDenied:
    return PermissionDenied(reason, code="token_invalid")


# -- the user behind a connection token (database: call it off the event loop) ------


def check_user(claim: ConnectionClaim, user: Any) -> None:
    """Is ``user`` (loaded for ``claim``) still allowed to connect with it?

    The password binding is checked under ``SECRET_KEY`` and each of
    ``SECRET_KEY_FALLBACKS``, as the signature is.

    Raises:
        PermissionDenied: ``token_invalid`` (deactivated, or the password changed).
    """
    if not getattr(user, "is_active", True):
        raise _invalid("the token's user is deactivated")
    secrets = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    if not any(constant_time_compare(claim.binding, password_binding(user, secret)) for secret in secrets):
        raise _invalid("the token's user changed their password since it was minted")


def user_for(claim: ConnectionClaim) -> Any:
    """Load the user a connection token names and check it may still connect (a database read).

    Raises:
        PermissionDenied: ``token_invalid`` (no such user, deactivated, password changed).
    """
    model = get_user_model()
    try:
        user = model._default_manager.get(pk=claim.user_id)
    except (model.DoesNotExist, ValidationError, ValueError, TypeError):
        raise _invalid("the token's user does not exist") from None
    check_user(claim, user)
    return user
