"""``offload.publish()``: the synchronous way to send a message to a channel.

Usable from any Django view, signal handler, management command, spooler task
or plain script. One Lua script appends the message to the channel's history
stream and publishes it, atomically, and returns the id both carry.
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from .. import conf
from ..core.protocol import encode_data
from ..exceptions import BackendUnavailable, LimitExceeded, OutcomeUnknown
from ..policies import namespace_of
from .redis_client import REDIS_ERRORS, history_key, pubsub_channel, script

__all__ = ["publish", "publish_json"]


def publish(channel: str, data: Any) -> str:
    """Publish ``data`` (any JSON-serializable value) on ``channel``.

    Returns:
        The message id, e.g. ``"1732460000000-0"``.

    Raises:
        ChannelError: invalid channel name or undeclared namespace.
        ProtocolError: ``data`` is not JSON-serializable.
        LimitExceeded: the JSON is larger than ``OFFLOAD_MAX_MESSAGE_BYTES``.
        BackendUnavailable: Redis is down; nothing was published.
        OutcomeUnknown: Redis timed out; the message may have been published.
    """
    return publish_json(channel, encode_data(data))


def publish_json(channel: str, data_json: str) -> str:
    """Publish data that is already compact JSON text (no re-encoding)."""
    ns = namespace_of(channel).namespace
    limit = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
    if len(data_json) > limit or len(data_json.encode()) > limit:
        raise LimitExceeded(f"data is larger than {limit} bytes", code="message_too_large")
    token_key = f"{conf.get('OFFLOAD_REDIS_PREFIX')}pub:{uuid.uuid4().hex}"
    try:
        message_id = script("publish")(
            keys=[history_key(channel), token_key],
            args=[pubsub_channel(channel), data_json, ns.history_size, ns.history_ttl],
        )
    except redis.TimeoutError as exc:
        # Redis may have run the script after all: say so, never "not published".
        raise OutcomeUnknown(f"Redis did not answer in time; the message may have been published: {exc}") from exc
    except REDIS_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    return message_id.decode() if isinstance(message_id, bytes) else message_id
