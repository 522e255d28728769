"""The message envelope: client commands in, server messages out (sans-I/O).

This module imports no socket, gevent, uwsgi, redis or django, so every rule of
the public contract in ``docs/protocol.md`` is unit-tested without I/O.

Client commands parse into small frozen dataclasses (one class per command) so
that the connection dispatches with one handler per class. Server messages are
built as JSON text. A published message's ``data`` is carried as the JSON text
it was published with and spliced in verbatim, so fan-out never re-encodes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ..exceptions import ChannelError, ProtocolError, RefusedError

__all__ = [
    "Command",
    "Members",
    "Ping",
    "Publish",
    "Refresh",
    "Rpc",
    "StreamId",
    "Subscribe",
    "Unsubscribe",
    "command_from_object",
    "error_text",
    "is_method_name",
    "parse_ascii_int",
    "parse_command",
    "parse_stream_id",
    "reply",
    "rpc_reply",
    "split_channel",
    "validate_channel",
]

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.@=-]{1,128}")
# [0-9], never \d: \d and int() also take other scripts' digits ('١٢٣' is 123).
_STREAM_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_ASCII_DIGITS_RE = re.compile(r"[0-9]+")
# RPC method names: ASCII, dotted like Python names ("chat.typing", "orders.cancel_v2").
_METHOD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")

_U64_MAX = 2**64 - 1  # both parts of a Redis Stream id are unsigned 64-bit

StreamId = tuple[int, int]
"""A Redis Stream id as ``(milliseconds, sequence)``; compares correctly."""


@dataclass(frozen=True)
class Subscribe:
    channel: str
    since: StreamId | None = None
    ref: Any = None
    token: str | None = None
    """A subscription token (namespaces whose ``subscribe`` rule is ``"token"``)."""


@dataclass(frozen=True)
class Unsubscribe:
    channel: str
    ref: Any = None


@dataclass(frozen=True)
class Publish:
    channel: str
    data_json: str
    """The ``data`` value re-encoded compactly as JSON text."""
    ref: Any = None


@dataclass(frozen=True)
class Ping:
    ref: Any = None


@dataclass(frozen=True)
class Refresh:
    """A fresh connection token for a connection opened with one (before the old one expires)."""

    token: str
    ref: Any = None


@dataclass(frozen=True)
class Rpc:
    """A call of a server-side method (``offload.rpc``); answered by ``reply`` or ``error``."""

    method: str
    data: Any = None
    """The ``data`` value as decoded from the message (any JSON value)."""
    ref: Any = None


@dataclass(frozen=True)
class Members:
    """A query of a presence channel's members: a page after ``after`` (a member id), and the count."""

    channel: str
    after: str | None = None
    limit: int | None = None
    ref: Any = None


Command = Subscribe | Unsubscribe | Publish | Ping | Refresh | Rpc | Members

_MEMBER_RE = re.compile(r"[A-Za-z0-9_.:@=-]{1,80}")


def split_channel(channel: Any) -> tuple[str, str]:
    """Return ``(namespace, name)`` of a valid channel name.

    Raises:
        ChannelError: ``channel`` is not a string of the form ``namespace:name``
            within the documented charset and length.
    """
    if not isinstance(channel, str):
        raise ChannelError("channel must be a string")
    namespace, sep, name = channel.partition(":")
    if not sep or not _NAMESPACE_RE.fullmatch(namespace) or not _NAME_RE.fullmatch(name):
        raise ChannelError("channel must be 'namespace:name' ([A-Za-z0-9_-]{1,32} ':' [A-Za-z0-9_.@=-]{1,128})")
    return namespace, name


def validate_channel(channel: Any) -> str:
    """Return ``channel`` if valid, else raise :class:`ChannelError`."""
    split_channel(channel)
    return channel


def parse_ascii_int(value: Any, max_digits: int = 20) -> int | None:
    """The value of a string of ASCII digits ``0-9``, or None if it is anything else.

    ``int()`` and ``str.isdigit()`` are too lenient for client input: ``int``
    takes ``' 12 '``, ``'+12'``, ``'1_2'`` and other scripts' digits
    (``'١٢٣'`` is 123), and ``'²'.isdigit()`` is True although ``int('²')``
    raises. Use this for every number a client sends as text (stream ids,
    ``Content-Length``), so that all layers agree on what it means.

    Args:
        value: the text (anything that is not a ``str`` gives None).
        max_digits: longer strings give None (bounds the work; 20 digits hold
            any unsigned 64-bit value).
    """
    if not isinstance(value, str) or not 0 < len(value) <= max_digits or not _ASCII_DIGITS_RE.fullmatch(value):
        return None
    return int(value)


def parse_stream_id(value: Any) -> StreamId:
    """Parse ``"<ms>-<seq>"`` into a comparable tuple.

    Raises:
        ProtocolError: with code ``invalid_since`` if it is not a stream id.
    """
    match = _STREAM_ID_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) > _U64_MAX or int(match.group(2)) > _U64_MAX:
        raise ProtocolError("since must be a message id like '1732460000000-0'", code="invalid_since")
    return int(match.group(1)), int(match.group(2))


def format_stream_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def _ref(obj: dict) -> Any:
    ref = obj.get("ref")
    if (ref is not None and not isinstance(ref, (str, int, float))) or isinstance(ref, bool):
        raise ProtocolError("ref must be a string or a number")
    return ref


def parse_command(text: str, *, max_data_bytes: int | None = None) -> Command:
    """Parse one client text message into a command.

    Raises:
        ProtocolError: ``bad_json``, ``bad_message``, ``unknown_type``,
            ``invalid_since`` or ``message_too_large``.
        ChannelError: ``invalid_channel``.
    """
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ProtocolError("message is not valid JSON", code="bad_json") from None
    return command_from_object(obj, max_data_bytes=max_data_bytes)


def _refuse_constant(name: str) -> float:
    """``json.loads`` takes ``NaN`` and ``Infinity``, which are not JSON: a ``ref``
    echoed back would make the client's ``JSON.parse`` fail."""
    raise ProtocolError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to infinity
        raise ProtocolError(f"number {text[:40]} is out of range")
    return value


def command_from_object(obj: Any, *, max_data_bytes: int | None = None) -> Command:
    """Like :func:`parse_command` for a message already decoded from JSON
    (the subscriptions of a websocket URL's query string)."""
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    ref = _ref(obj)
    try:
        return _command(obj, ref, max_data_bytes)
    except RefusedError as exc:
        # Replies carry the command's ref (and channel) even when it was refused.
        exc.ref = ref
        channel = obj.get("channel")
        exc.channel = channel if isinstance(channel, str) and len(channel) <= 200 else None
        raise


def _command(obj: dict, ref: Any, max_data_bytes: int | None) -> Command:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message needs a string 'type'")
    if kind == "ping":
        return Ping(ref=ref)
    if kind == "refresh":
        return Refresh(_token(obj, required=True), ref)
    if kind == "rpc":
        return _rpc(obj, ref, max_data_bytes)
    if kind not in ("subscribe", "unsubscribe", "publish", "members"):
        raise ProtocolError(f"unknown message type {kind[:40]!r}", code="unknown_type")
    if "channel" not in obj:
        raise ProtocolError(f"'{kind}' needs a 'channel'")
    channel = validate_channel(obj["channel"])
    if kind == "subscribe":
        since = obj.get("since")
        return Subscribe(channel, None if since is None else parse_stream_id(since), ref, _token(obj))
    if kind == "unsubscribe":
        return Unsubscribe(channel, ref)
    if kind == "members":
        return _members(obj, channel, ref)
    if "data" not in obj:
        raise ProtocolError("'publish' needs 'data'")
    data_json = encode_data(obj["data"])
    if max_data_bytes is not None and len(data_json.encode()) > max_data_bytes:
        raise ProtocolError(f"data is larger than {max_data_bytes} bytes", code="message_too_large")
    return Publish(channel, data_json, ref)


def is_method_name(name: Any) -> bool:
    """Is ``name`` a valid RPC method name (1 to 64 ASCII characters, dotted)?"""
    return isinstance(name, str) and _METHOD_RE.fullmatch(name) is not None


def _rpc(obj: dict, ref: Any, max_data_bytes: int | None) -> Rpc:
    method = obj.get("method")
    if not is_method_name(method):
        raise ProtocolError("'rpc' needs a 'method': 1 to 64 characters of [A-Za-z0-9_.:-], not starting with a digit")
    data = obj.get("data")
    if max_data_bytes is not None and len(encode_data(data).encode()) > max_data_bytes:
        raise ProtocolError(f"data is larger than {max_data_bytes} bytes", code="message_too_large")
    return Rpc(method, data, ref)


#: Longest token a client may send (offload.tokens mints them shorter: about 330
#: characters for a subscription token with the longest channel name).
MAX_TOKEN_LENGTH = 1024


def _token(obj: dict, *, required: bool = False) -> str | None:
    token = obj.get("token")
    if token is None and not required:
        return None
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
        raise ProtocolError(f"token must be a string of 1 to {MAX_TOKEN_LENGTH} characters")
    return token


def _members(obj: dict, channel: str, ref: Any) -> Members:
    after, limit = obj.get("after"), obj.get("limit")
    if after is not None and not (isinstance(after, str) and _MEMBER_RE.fullmatch(after)):
        raise ProtocolError("after must be a member id from a previous page")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 100_000):
        raise ProtocolError("limit must be an integer from 0")
    return Members(channel, after, limit, ref)


#: ``json.dumps`` with any option but the defaults builds a new encoder on every call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_DATA = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_data(data: Any) -> str:
    """Encode published data as compact JSON text (the form stored and sent).

    Raises:
        ProtocolError: ``bad_message`` if ``data`` is not JSON-serializable
            (NaN and infinities included: browsers cannot parse them).
    """
    try:
        return _DATA.encode(data)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"data is not JSON-serializable: {exc}") from None
    except RecursionError:
        raise ProtocolError("data is nested too deeply") from None


def reply(kind: str, ref: Any = None, **fields: Any) -> str:
    """Build a server reply (``subscribed``, ``published``, ``pong`` ...)."""
    obj = {"type": kind, **fields}
    if ref is not None:
        obj["ref"] = ref
    return _COMPACT.encode(obj)


def rpc_reply(ref: Any, data_json: str) -> str:
    """Build the ``reply`` to an ``rpc`` call, splicing in its data's JSON text (encoded once, off the loop)."""
    ref_part = "" if ref is None else f',"ref":{json.dumps(ref)}'
    return f'{{"type":"reply"{ref_part},"data":{data_json}}}'


def error_text(code: str, reason: str, ref: Any = None, channel: str | None = None) -> str:
    """Build an ``error`` reply with a stable machine-readable ``code``."""
    fields: dict[str, Any] = {"code": code, "reason": reason}
    if channel is not None:
        fields["channel"] = channel
    return reply("error", ref, **fields)
