"""``offload.publish()``: the synchronous way to send a message to a channel.

Usable from any Django view, signal handler, management command, spooler task
or plain script. One Lua script appends the message to the channel's history
stream and publishes it, atomically, and returns the id both carry.

Inside ``transaction.atomic()`` a publish waits for the commit (the default):
a message that announces a database change must not reach a browser before
that change is visible, nor at all if it is rolled back (docs/publishing.md).
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import Any

import redis
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from .. import conf, metrics
from ..core.protocol import encode_data
from ..exceptions import BackendUnavailable, LimitExceeded, OffloadError, OutcomeUnknown
from ..policies import namespace_of
from .redis_client import REDIS_ERRORS, get_client, history_key, publish_token_key, pubsub_channel, script, topology

__all__ = ["publish", "publish_json"]

log = logging.getLogger("offload.publish")


def publish(channel: str, data: Any, *, on_commit: bool = True, using: str | None = None) -> str | None:
    """Publish ``data`` (any JSON-serializable value) on ``channel``.

    Outside a transaction the message goes out at once. Inside
    ``transaction.atomic()`` (on the ``using`` database) and with ``on_commit``
    (the default), everything is checked at once, so a bad channel or an
    oversized message raises here, in the caller, but the message goes out only
    after the outermost block commits (``transaction.on_commit``), and never if
    it (or the savepoint the call was made in) is rolled back. Why the default:
    a message nearly always announces a change the receivers will then read
    (a page reloads, a client fetches the new row); published before the
    commit it would announce a row that is not visible yet, or never will be.

    After the commit the caller's transaction is done and cannot be undone, so
    a Redis failure there is not raised: it is logged at error level (logger
    ``offload.publish``, with the channel) and the message is lost; other
    ``on_commit`` callbacks still run. Use ``on_commit=False`` to publish at
    once even inside a transaction (the call then raises as outside one, e.g.
    to roll the transaction back when the message could not be sent).

    Mind Django's ``ATOMIC_REQUESTS`` (every view is a transaction, so every
    publish in a view is deferred and returns None) and ``TestCase`` (its
    transaction is never committed: wrap the code in
    ``self.captureOnCommitCallbacks(execute=True)``, or use
    ``TransactionTestCase``).

    Args:
        channel: ``namespace:name``, in a namespace of ``OFFLOAD_NAMESPACES``.
        data: the message, any JSON-serializable value.
        on_commit: inside a transaction, wait for its commit (default True).
        using: the database alias whose transaction counts (default: ``default``).

    Returns:
        The message id, e.g. ``"1732460000000-0"``; None when the publish was
        deferred to the commit.

    Raises:
        ChannelError: invalid channel name or undeclared namespace.
        ProtocolError: ``data`` is not JSON-serializable.
        LimitExceeded: the JSON is larger than ``OFFLOAD_MAX_MESSAGE_BYTES``.
        BackendUnavailable: Redis is down; nothing was published (not raised
            when deferred).
        OutcomeUnknown: Redis timed out; the message may have been published
            (not raised when deferred).
    """
    data_json = encode_data(data)
    ns = _check(channel, data_json)
    if on_commit and connections[using or DEFAULT_DB_ALIAS].in_atomic_block:
        # robust: an unexpected error in the callback must not turn the
        # committed request into a 500 nor skip the project's other callbacks.
        transaction.on_commit(functools.partial(_publish_committed, channel, data_json, ns), using=using, robust=True)
        return None
    return _send(channel, data_json, ns, "python")


def publish_json(channel: str, data_json: str, *, source: str = "client") -> str:
    """Publish data that is already compact JSON text (no re-encoding), at once.

    Never deferred to a commit: its callers (the client ``publish`` command,
    the HTTP publish API) answer with the message id, and their request makes
    no database change the message would have to wait for.

    Args:
        source: who publishes, for the metrics: ``"client"`` (a socket's ``publish``
            command, a hook) or ``"api"`` (the HTTP publish API).

    Raises: as :func:`publish`.
    """
    return _send(channel, data_json, _check(channel, data_json), source)


def _check(channel: str, data_json: str) -> conf.Namespace:
    """The channel's namespace, once the channel and the size are known to be fine."""
    ns = namespace_of(channel).namespace
    limit = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
    if len(data_json) > limit or len(data_json.encode()) > limit:
        raise LimitExceeded(f"data is larger than {limit} bytes", code="message_too_large")
    return ns


def _send(channel: str, data_json: str, ns: conf.Namespace, source: str) -> str:
    """Run the publish script: append to the history stream and publish, atomically."""
    token_key = publish_token_key(channel, uuid.uuid4().hex)
    sharded = 1 if topology() == "cluster" else 0  # SPUBLISH: the message goes to its shard only
    keys = [history_key(channel), token_key]
    args = [pubsub_channel(channel), data_json, ns.history_size, ns.history_ttl, sharded]
    replicas = conf.get("OFFLOAD_REDIS_WAIT_REPLICAS")
    try:
        if replicas:
            message_id = _publish_and_wait(channel, keys, args, replicas)
        else:
            message_id = script("publish")(keys=keys, args=args)
    except redis.TimeoutError as exc:
        metrics.redis_failed("publish", True)
        # Redis may have run the script after all: say so, never "not published".
        raise OutcomeUnknown(f"Redis did not answer in time; the message may have been published: {exc}") from exc
    except REDIS_ERRORS as exc:
        metrics.redis_failed("publish", False)
        raise BackendUnavailable(f"Redis is unavailable: {exc}") from exc
    metrics.published(source)
    return message_id.decode() if isinstance(message_id, bytes) else message_id


def _publish_and_wait(channel: str, keys: list[str], args: list, replicas: int) -> bytes | str:
    """Run the publish script, then WAIT on the same connection until ``replicas`` replicas have it.

    WAIT counts the writes of the connection it is sent on, so both go in one
    pipeline to the master holding the channel (in a Cluster: the node of its
    slot). Fewer replicas in time is logged, not raised: the message is
    published and cannot be taken back; it may be lost if the master dies now.
    """
    timeout_ms = int(conf.get("OFFLOAD_REDIS_WAIT_TIMEOUT") * 1000)
    for attempt in (1, 2):
        client = get_client()
        if isinstance(client, redis.RedisCluster):
            client = client.get_redis_connection(client.get_node_from_key(keys[0]))
        pipe = client.pipeline(transaction=False)
        script("publish")(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        try:
            message_id, acknowledged = pipe.execute()
            break
        except redis.exceptions.AskError:  # MOVED too: the slot moved, nothing ran; learn the new map once
            if attempt == 2:
                raise BackendUnavailable("the channel's slot kept moving") from None
            get_client().nodes_manager.initialize()
    if acknowledged < replicas:
        log.warning("message on %s reached %d of %d replicas in time", channel, acknowledged, replicas)
    return message_id


def _publish_committed(channel: str, data_json: str, ns: conf.Namespace) -> None:
    """The deferred half of :func:`publish`: the transaction is committed, so log, never raise."""
    try:
        _send(channel, data_json, ns, "python")
    except OffloadError as exc:
        log.error("message on %s not published after the commit: %s (%s)", channel, exc.code, exc.reason)
