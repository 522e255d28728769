"""Settings of the offload library, read through ``django.conf.settings``.

Every setting has a documented default here, so a project only sets what it
changes. Deployment values (Redis URL, API key) normally come from the
environment in the project's settings module (12-factor); this module only reads
``django.conf.settings``. The list is documented in ``docs/settings.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

#: Namespace used when a project declares none: anything in it is public,
#: server-published only, with a small history.
DEFAULT_NAMESPACE = {
    "subscribe": "public",
    "publish": False,
    "history_size": 100,
    "history_ttl": 3600,
    # Dotted path of (or a callable) hook(identity, channel, data) -> data run on
    # every client publish before it goes out (offload.handlers); None: none.
    "publish_hook": None,
    # Presence (docs/presence.md): keep the channel's members (one per user,
    # every tab included), with join/leave events to its subscribers, and a
    # payload per member from presence_info(identity) -> dict (a dotted path or
    # a callable, run in a handler thread; None: the user id and name only).
    "presence": False,
    "join_leave": True,
    "presence_info": None,
}

DEFAULTS: dict[str, Any] = {
    # Redis server for publish, history and the per-worker hub.
    "OFFLOAD_REDIS_URL": "redis://127.0.0.1:6379/0",
    # Prefix of every Redis key and pub/sub channel this library uses.
    "OFFLOAD_REDIS_PREFIX": "offload:",
    # Max pooled Redis connections per process for publish/history calls.
    # Callers beyond it wait (a blocking pool) instead of failing.
    "OFFLOAD_REDIS_POOL_SIZE": 50,
    # Seconds to connect to / wait for Redis before failing fast.
    "OFFLOAD_REDIS_TIMEOUT": 2.0,
    # Durability: after each publish, wait (Redis WAIT) until this many
    # replicas have it, at most OFFLOAD_REDIS_WAIT_TIMEOUT seconds. 0: never wait
    # (a failover may then lose the last acknowledged messages).
    "OFFLOAD_REDIS_WAIT_REPLICAS": 0,
    "OFFLOAD_REDIS_WAIT_TIMEOUT": 0.5,
    # namespace -> policy dict (keys: subscribe, publish, history_size, history_ttl).
    "OFFLOAD_NAMESPACES": {"public": DEFAULT_NAMESPACE},
    # Origins allowed to open a websocket. None: derived from ALLOWED_HOSTS.
    "OFFLOAD_ALLOWED_ORIGINS": None,
    # Bearer key of POST /api/publish/<channel>. None/empty: API disabled.
    "OFFLOAD_API_KEY": None,
    # Largest client message (bytes) and largest published data (bytes of JSON).
    "OFFLOAD_MAX_MESSAGE_BYTES": 64 * 1024,
    # Messages per second a client may send on one connection (token bucket
    # refilled at this rate, holding OFFLOAD_MESSAGE_BURST); beyond: close 1008.
    "OFFLOAD_MAX_MESSAGES_PER_SECOND": 50.0,
    "OFFLOAD_MESSAGE_BURST": 100,
    # Every client frame counts against that bucket: data frames, each
    # fragment of a message, pings and pongs. Pings and pongs also take from a
    # smaller bucket of their own (a client answers our pings and may send a
    # keep-alive now and then): a ping flood is closed within a few frames.
    "OFFLOAD_MAX_CONTROL_FRAMES_PER_SECOND": 5.0,
    "OFFLOAD_CONTROL_FRAME_BURST": 10,
    # Seconds an address whose socket was closed for breaking a rate limit may
    # not open new websockets (429, before the handshake). 0: no cooldown.
    "OFFLOAD_ABUSE_COOLDOWN": 10.0,
    # Open websockets per client IP, across all workers (counted in Redis).
    "OFFLOAD_MAX_CONNECTIONS_PER_IP": 200,
    # Load balancers whose X-Forwarded-For is believed (addresses or CIDRs, a
    # list or a comma-separated string). Empty: the client is REMOTE_ADDR.
    # Otherwise the client is the right-most untrusted X-Forwarded-For entry
    # (offload.addresses): every per-address limit counts against it.
    "OFFLOAD_TRUSTED_PROXIES": (),
    # A file an operator touches to drain this instance before a restart: every
    # worker started before its modification time answers /readyz with 503
    # "draining" (workers started later are ready). None: no drain file.
    "OFFLOAD_DRAIN_FILE": None,
    # Run websocket handshakes through Django's whole middleware stack. False
    # (default): like Django Channels, the upgrade skips MIDDLEWARE (a connect
    # storm costs a fraction of the CPU); the Host header, the Origin, the
    # session user and the limits are still checked (docs/security.md).
    "OFFLOAD_WEBSOCKET_MIDDLEWARE": False,
    # Run POST /api/publish/<channel> through Django's middleware stack and
    # request signals. False (default): offload.wsgi calls the view directly
    # (bearer key, no session or CSRF), checking the Host header.
    "OFFLOAD_API_MIDDLEWARE": False,
    # Seconds the upgrade may take on our side (user lookup, limits) before 503.
    # Reading the request headers is bounded by OFFLOAD_HEADER_TIMEOUT.
    "OFFLOAD_HANDSHAKE_TIMEOUT": 10.0,
    # Seconds a client may take to send its whole request headers (slowloris:
    # uWSGI's socket-timeout bounds each read, not the total). Beyond it the
    # connection is shut down and its async core freed (offload.watchdog,
    # docs/security.md). 0 or None: no bound. Enforced only under
    # uWSGI's gevent loop with offload-threads (static files leave the core).
    "OFFLOAD_HEADER_TIMEOUT": 10.0,
    # Allocations between young-generation garbage collections (Python's
    # default is 700), set when the WSGI application loads; 0 keeps Python's.
    # Thousands of sockets are hundreds of thousands of long-lived objects:
    # with the default, a connect storm ran a full collection at every 25 %
    # growth (pauses up to 260 ms each). See docs/performance.md.
    "OFFLOAD_GC_THRESHOLD": 10_000,
    # Channels one connection may subscribe to.
    "OFFLOAD_MAX_SUBSCRIPTIONS": 100,
    # Bytes queued for one client (websocket frames, or SSE events) beyond
    # what its kernel socket buffer took, before it is closed as a slow
    # consumer (1008). Bytes, not messages: 1,000 queued messages of 64 KiB
    # were 64 MiB per socket. A history replay waits for the queue to drain
    # before its next page, so it never trips this limit by itself.
    "OFFLOAD_MAX_QUEUED_BYTES": 1024 * 1024,
    # Target size of one page of a history replay (resume with ``since``):
    # history is read and sent page by page, each after the client took the
    # previous one, so a replay holds about one page in memory per socket.
    "OFFLOAD_HISTORY_PAGE_BYTES": 256 * 1024,
    # Seconds between server pings, and how long a peer may stay silent
    # after a ping before it is considered dead.
    "OFFLOAD_PING_INTERVAL": 20.0,
    "OFFLOAD_PING_TIMEOUT": 20.0,
    # Seconds a subscribe may wait for the hub's Redis subscription.
    "OFFLOAD_SUBSCRIBE_TIMEOUT": 5.0,
    # Seconds between per-worker stats messages on STATS_CHANNEL (0: off).
    "OFFLOAD_STATS_INTERVAL": 2.0,
    "OFFLOAD_STATS_CHANNEL": "stats:workers",
    # The operator page (offload.operator, docs/operator.md): every STATS_INTERVAL
    # each worker publishes its figures (sockets, RSS, CPU, hot channels, Redis,
    # recent drops) on this channel. Its namespace is declared by the library,
    # subscribable only with a subscription token that the staff-only page
    # mints, unless OFFLOAD_NAMESPACES declares it. None: not published.
    "OFFLOAD_OPERATOR_CHANNEL": "offload-operator:workers",
    # Channels each worker names on it: this many with the most local
    # subscribers, and as many with the highest message rate.
    "OFFLOAD_OPERATOR_TOP_CHANNELS": 10,
    # "json": log lines are JSON objects (offload.logs.JsonFormatter), each
    # websocket and SSE line with its connection_id and user_id; "text": as the
    # project's LOGGING says. Applied to the handlers of the root, "django"
    # and "offload" loggers when the app loads (docs/operator.md).
    "OFFLOAD_LOG_FORMAT": "text",
    # Benchmarks only: True streams downloads/upstreams from Python and runs
    # tasks inline in the view ("offloading disabled"), for side-by-side runs.
    "OFFLOAD_INLINE": False,
    # send_file() refuses paths outside this directory (uwsgi.ini honours
    # X-Sendfile only below it too). None: no check in Python.
    "OFFLOAD_FILES_ROOT": None,
    # Websocket subprotocols the server speaks, in its order of preference. A
    # handshake answers with the first one the client offered; with none in
    # common (or this empty) no Sec-WebSocket-Protocol header is sent (RFC 6455).
    "OFFLOAD_SUBPROTOCOLS": (),
    # Seconds a connection token (offload.connection_token) is valid. A live
    # websocket must refresh before then (offload.js does) or is closed with 4003;
    # an event stream ends with an error event token_expired.
    "OFFLOAD_CONNECTION_TOKEN_TTL": 900.0,
    # Seconds a subscription token (offload.subscription_token) may be used to
    # subscribe; a live subscription outlasts it (docs/security.md).
    "OFFLOAD_SUBSCRIPTION_TOKEN_TTL": 3600.0,
    # Server-side handlers (offload.handlers): RPC methods, publish hooks and
    # lifecycle signal receivers run in a thread pool of their own, this many
    # threads per worker, apart from gevent's pool that resolves the users of
    # handshakes: slow handlers never delay a connect (docs/settings.md).
    "OFFLOAD_HANDLER_THREADS": 10,
    # Seconds an RPC call or a publish hook may take, waiting for a thread
    # included; beyond, the client gets rpc_timeout (the thread cannot be
    # stopped: the function may still finish, its result is dropped).
    "OFFLOAD_RPC_TIMEOUT": 10.0,
    # Handler calls (RPC and hooked publishes) running at once per connection;
    # beyond: too_many_calls.
    "OFFLOAD_RPC_MAX_IN_FLIGHT": 8,
    # Handler calls per second per connection (token bucket refilled at this
    # rate, holding OFFLOAD_RPC_BURST); beyond: rate_limited (the socket stays open).
    "OFFLOAD_RPC_CALLS_PER_SECOND": 10.0,
    "OFFLOAD_RPC_BURST": 20,
    # Lifecycle events (offload.signals) waiting for their receivers, per
    # worker; beyond, new events are dropped (counted and logged), never waited for.
    "OFFLOAD_SIGNAL_QUEUE_SIZE": 10_000,
    # Presence (namespaces with "presence": True; docs/presence.md). Each worker
    # renews its hold on its members every HEARTBEAT seconds; a hold not renewed
    # for LEASE_TTL seconds (a worker SIGKILLed, an instance gone) is released.
    # A member whose last connection went stays GRACE seconds more (a reconnect
    # within it makes no leave/join). A member leaves at most LEASE_TTL + GRACE
    # + HEARTBEAT seconds after its worker died.
    "OFFLOAD_PRESENCE_HEARTBEAT": 10.0,
    "OFFLOAD_PRESENCE_LEASE_TTL": 30.0,
    "OFFLOAD_PRESENCE_GRACE": 10.0,
    # Joins and leaves of a channel are gathered for this many seconds and sent
    # as one event; a window with more than MAX_LISTED changes becomes one
    # "reset" event (clients ask for the members again): storms stay small.
    "OFFLOAD_PRESENCE_COALESCE": 0.5,
    "OFFLOAD_PRESENCE_MAX_LISTED": 50,
    # Members per page of a presence query at most.
    "OFFLOAD_PRESENCE_PAGE_SIZE": 1000,
    # Seconds a spooler task may run (@task(timeout=...) overrides it). Beyond
    # it the task is stopped inside the spooler and retried or failed like any
    # error. Keep it well below uwsgi.ini's spooler-harakiri (600 s), which
    # kills the whole spooler process instead.
    "OFFLOAD_TASK_TIMEOUT": 300.0,
    # Prometheus metrics (offload.metrics, docs/metrics.md). False: every
    # recording call returns at once and /metrics answers 404.
    "OFFLOAD_METRICS": True,
    # Bearer key that lets a non-loopback scraper read /metrics. None: only a
    # loopback peer that no proxy forwarded may (never public by default).
    "OFFLOAD_METRICS_KEY": None,
}


@dataclass(frozen=True)
class Namespace:
    """One namespace's policy, normalised from the settings dict."""

    name: str
    subscribe: Any
    publish: Any
    history_size: int
    history_ttl: int
    publish_hook: Any = None
    presence: bool = False
    join_leave: bool = True
    presence_info: Any = None


_values: dict[str, Any] = {}


def get(name: str) -> Any:
    """Return setting ``name`` from Django settings, or its default.

    Read once, then kept: a handshake reads about fifteen settings, and each
    read of a setting a project leaves at its default went through
    ``LazySettings`` and a caught ``AttributeError`` (measured: a sixth of a
    handshake's Python time in a connect storm). :func:`reset` forgets them.
    """
    try:
        return _values[name]
    except KeyError:
        value = _values[name] = getattr(django_settings, name, DEFAULTS[name])
        return value


_caches: list[dict] = [_values]


def cache() -> dict:
    """A dict for values derived from settings (e.g. which Origins are
    allowed), emptied by :func:`reset` with the settings themselves."""
    derived: dict = {}
    _caches.append(derived)
    return derived


def reset(**_signal_kwargs: Any) -> None:
    """Forget the values read so far: call it after changing settings at run
    time (tests). ``override_settings`` triggers it through ``setting_changed``."""
    for values in _caches:
        values.clear()


setting_changed.connect(reset, dispatch_uid="offload.conf.reset")


def namespaces() -> dict[str, Namespace]:
    """The declared namespaces, validated.

    Raises:
        django.core.exceptions.ImproperlyConfigured: a policy is malformed.
    """
    from django.core.exceptions import ImproperlyConfigured

    result = {}
    for name, spec in get("OFFLOAD_NAMESPACES").items():
        unknown = set(spec) - set(DEFAULT_NAMESPACE)
        if unknown:
            raise ImproperlyConfigured(f"OFFLOAD_NAMESPACES[{name!r}]: unknown keys {sorted(unknown)}")
        merged = {**DEFAULT_NAMESPACE, **spec}
        size, ttl = merged["history_size"], merged["history_ttl"]
        if not isinstance(size, int) or size < 0 or not isinstance(ttl, int) or ttl <= 0:
            raise ImproperlyConfigured(
                f"OFFLOAD_NAMESPACES[{name!r}]: history_size must be an int >= 0 and history_ttl an int > 0"
            )
        if not isinstance(merged["presence"], bool) or not isinstance(merged["join_leave"], bool):
            raise ImproperlyConfigured(f"OFFLOAD_NAMESPACES[{name!r}]: presence and join_leave must be True or False")
        result[name] = Namespace(
            name,
            merged["subscribe"],
            merged["publish"],
            size,
            ttl,
            publish_hook=merged["publish_hook"],
            presence=merged["presence"],
            join_leave=merged["join_leave"],
            presence_info=merged["presence_info"],
        )
    operator = get("OFFLOAD_OPERATOR_CHANNEL")
    if operator:
        name = operator.partition(":")[0]
        if name not in result:  # the operator page's channel: only with a token its staff-only view mints
            result[name] = Namespace(name, "token", False, 1, 60)
    return result
