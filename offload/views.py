"""Django views: the websocket upgrade, the event stream, the publish API, health.

Websocket endpoints are ordinary Django views, so URL routing, middleware
(sessions, authentication) and decorators work as usual. The view checks the
handshake, the Origin and the limits, resolves the user off the event loop,
performs uWSGI's native handshake and returns :class:`Upgraded`, which
:mod:`offload.wsgi` runs once Django is done with the request. The event
stream view checks the same things before its first byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from importlib import import_module
from urllib.parse import parse_qs, urlsplit

import gevent
from django.conf import settings
from django.contrib.auth import get_backends, get_user
from django.db import connections
from django.db.utils import load_backend
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.http.request import validate_host
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from . import conf, metrics, worker
from .addresses import client_address
from .backend.health import ping_redis, redis_health
from .backend.publishing import publish_json
from .backend.slots import ConnectionSlots
from .blocking import run_blocking
from .core.protocol import encode_data, parse_ascii_int
from .core.sse_format import resume_positions
from .exceptions import (
    BackendUnavailable,
    ChannelError,
    LimitExceeded,
    OutcomeUnknown,
    PermissionDenied,
    ProtocolError,
    RefusedError,
)
from .policies import ANONYMOUS, Identity, check_subscribe, token_identity
from .tokens import ConnectionClaim, query_subscriptions, verify_connection_token
from .transports.connection import Endpoint, WebSocket
from .transports.endpoints import ChannelsEndpoint, EchoEndpoint
from .transports.lifecycle import new_connection_id
from .transports.sockets import cork, no_delay
from .transports.sse import SseStream, response_body
from .worker import install_signal_handlers

try:
    import uwsgi
except ImportError:  # management commands and unit tests: Django without uWSGI, no upgrades there
    uwsgi = None

__all__ = [
    "DIRECT_API_VIEWS",
    "UPGRADED",
    "Upgraded",
    "WebSocketView",
    "api_publish",
    "channels_socket",
    "connection_claim",
    "echo_socket",
    "healthz",
    "origin_allowed",
    "preload_identity_modules",
    "readyz",
    "resolve_identity",
    "stream_view",
    "websocket_view",
]

log = logging.getLogger("offload.views")

#: environ key set once uWSGI sent the 101 (offload.wsgi then sends nothing more).
UPGRADED = "offload.upgraded"
_ORIGIN_CACHE_SIZE = 256  # distinct Origin headers remembered (a site sees a handful)
_origins: dict[str, bool] = conf.cache()  # Origin -> allowed, forgotten when settings change


def origin_allowed(origin: str | None) -> bool:
    """Is a websocket from this ``Origin`` allowed (cross-site hijacking check)?

    No Origin header means a non-browser client, which cannot carry a victim's
    cookies cross-site, so it is allowed. ``null`` and anything not in the
    allow-list are refused. The default allow-list is the hosts of
    ``ALLOWED_HOSTS`` (any scheme and port).
    """
    if origin is None:
        return True
    known = _origins.get(origin)
    if known is None:
        if len(_origins) >= _ORIGIN_CACHE_SIZE:
            _origins.clear()
        known = _origins[origin] = _origin_allowed(origin)
    return known


def _origin_allowed(origin: str) -> bool:
    allowed = conf.get("OFFLOAD_ALLOWED_ORIGINS")
    if allowed is not None:
        return "*" in allowed or origin in allowed
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return validate_host(parts.hostname, hosts)


def _identity_of(request: HttpRequest) -> Identity:
    user = getattr(request, "user", None)
    if user is None:  # the handshake skipped the middleware stack (offload.wsgi)
        engine = import_module(settings.SESSION_ENGINE)
        request.session = engine.SessionStore(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
        user = get_user(request)
    return Identity.of_user(user)


def preload_identity_modules() -> None:
    """Import, at application load, what resolving a user would otherwise import on first use.

    The first session lookups of a fresh worker ran in several of gevent's
    native threads at once, each importing Django's session serializer and SQL
    compiler modules for the first time, under import locks that gevent's
    monkey-patching made green: native threads should not contend for them.
    Loaded once in uWSGI's master, before the fork, every worker starts with
    them (shared pages, nothing imported in a thread). Nothing here opens a
    database connection or a cache.
    """
    import_module(settings.SESSION_ENGINE)
    import_string(settings.SESSION_SERIALIZER)
    get_backends()
    for alias in connections:
        backend = load_backend(connections.settings[alias]["ENGINE"])
        import_module(backend.DatabaseWrapper.ops_class.compiler_module)


def resolve_identity(request: HttpRequest, claim: ConnectionClaim | None = None) -> Identity:
    """The user behind a websocket or event stream, without blocking the loop.

    With a connection token (``claim``, verified already) the token's user is
    loaded and checked again, whatever the session cookie says. Without a
    token or a session cookie the client is anonymous and nothing needs the
    database (a connect storm of anonymous clients never queues on the thread
    pool); otherwise the session and user are loaded in a thread.

    Raises:
        PermissionDenied: ``token_invalid``: the token's user is gone, deactivated or changed their password.
    """
    # Idempotent reads: rather inline than a handshake stuck behind a stranded pool task.
    inline_after = conf.get("OFFLOAD_HANDSHAKE_TIMEOUT") / 4
    if claim is not None:
        return run_blocking(token_identity, claim, inline_after=inline_after)
    if settings.SESSION_COOKIE_NAME not in request.COOKIES:
        return ANONYMOUS
    return run_blocking(_identity_of, request, inline_after=inline_after)


def connection_claim(env: dict, tokens: list[str], now: float) -> ConnectionClaim | None:
    """The verified connection token of a websocket or event-stream request (None: it has none).

    The token comes from ``?token=`` (a browser's WebSocket and EventSource
    cannot set headers), else from ``Authorization: Bearer``.

    Raises:
        PermissionDenied: ``token_invalid`` or ``token_expired`` (answered with 401).
    """
    if len(tokens) > 1:
        raise PermissionDenied("one token= at most", code="token_invalid")
    if not tokens:
        scheme, _, value = env.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        tokens = [value.strip(_HTTP_BLANKS)]
    return verify_connection_token(tokens[0], now=now)


def _token_refusal(kind: str, exc: PermissionDenied) -> JsonResponse:
    log.info("%s refused: %s", kind, exc.reason)
    metrics.handshake_refused(kind, "token")
    return _error(401, exc.code, exc.reason, **{"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _query(env: dict) -> dict[str, list[str]]:
    """The query string as lists of values, decoded as Django would (UTF-8;
    WSGI hands it over as Latin-1). Cheaper than building ``request.GET``,
    and the socket wants only these lists. uWSGI's ``buffer-size`` bounds it."""
    raw = env.get("QUERY_STRING", "").encode("iso-8859-1", "replace").decode("utf-8", "replace")
    return parse_qs(raw, keep_blank_values=True)


# -- the opening handshake (RFC 6455 section 4.2) ---------------------------------

#: The only protocol version (RFC 6455); anything else gets 426 naming it.
WEBSOCKET_VERSION = "13"
# Sec-WebSocket-Key is the base64 of 16 random bytes: 22 characters, the last of
# which carries 2 bits (so one of A, Q, g, w), then "==".
_WEBSOCKET_KEY_RE = re.compile(r"[A-Za-z0-9+/]{21}[AQgw]==")
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HTTP_BLANKS = " \t"


def _header_tokens(value: str) -> list[str]:
    """The comma-separated tokens of a header value (blanks around each dropped)."""
    return [token for token in (part.strip(_HTTP_BLANKS) for part in value.split(",")) if token]


def _handshake_refusal(env: dict) -> HttpResponse | None:
    """The answer to an upgrade request that breaks RFC 6455, or None if it is sound.

    uWSGI's ``websocket_handshake()`` checks nothing: it answered 101 to
    version 8, to a garbage version or none, and to any key. A client that
    speaks another version must be told which one we speak (426 with
    ``Sec-WebSocket-Version: 13``, section 4.4); a missing or malformed key,
    a method other than GET or a ``Connection`` header without ``upgrade`` is
    a bad request (section 4.2.1).
    """
    if env.get("REQUEST_METHOD") != "GET":
        return HttpResponse("a websocket handshake is a GET\n", status=405, headers={"Allow": "GET"})
    if "upgrade" not in (token.lower() for token in _header_tokens(env.get("HTTP_CONNECTION", ""))):
        return HttpResponse("websocket handshake needs 'Connection: Upgrade'\n", status=400)
    if env.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip(_HTTP_BLANKS) != WEBSOCKET_VERSION:
        return HttpResponse(
            f"unsupported websocket version: this server speaks {WEBSOCKET_VERSION}\n",
            status=426,
            headers={"Sec-WebSocket-Version": WEBSOCKET_VERSION},
        )
    if not _WEBSOCKET_KEY_RE.fullmatch(env.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(_HTTP_BLANKS)):
        return HttpResponse("Sec-WebSocket-Key must be the base64 of 16 bytes\n", status=400)
    return None


def _choose_subprotocol(offered: str | None, supported: Sequence[str]) -> str | None:
    """The subprotocol to answer with: the first of ``supported`` (the server's
    order of preference) that the client offered, or None.

    Args:
        offered: the client's ``Sec-WebSocket-Protocol`` header (comma-separated).
        supported: ``OFFLOAD_SUBPROTOCOLS``. Tokens compare exactly (case included).
    """
    if not offered or not supported:
        return None
    if isinstance(supported, str):  # a single name set without the tuple
        supported = (supported,)
    tokens = set(_header_tokens(offered))
    return next((protocol for protocol in supported if protocol in tokens), None)


def _accept_without_subprotocol(uwsgi, key: str) -> None:
    """Answer 101 with no ``Sec-WebSocket-Protocol`` header.

    Needed when the client offered subprotocols and none is supported: given no
    protocol, ``uwsgi.websocket_handshake()`` echoes the client's whole list
    (core/websockets.c), and RFC 6455 says a server that picks none MUST NOT
    send the header. uWSGI's own ``start_response`` and write path send the
    headers instead (so its request log shows the 101 and waits on a slow
    client as for any response).

    Raises:
        OSError: the headers could not be sent (the client went away).
    """
    accept = base64.b64encode(hashlib.sha1(key.encode() + _WEBSOCKET_GUID).digest()).decode()
    write = uwsgi.start_response(
        "101 Switching Protocols",
        [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)],
    )
    write(b"")  # sends the headers now


class Upgraded(HttpResponse):
    """What a websocket view returns once uWSGI sent the 101.

    It carries the socket and its endpoint: :mod:`offload.wsgi` runs them once
    Django is done with the request (the socket then leaves the request, see
    :func:`offload.transports.sockets.detach`). Nothing of the response itself is sent.
    """

    def __init__(self, websocket: WebSocket, endpoint: Endpoint) -> None:
        super().__init__(status=101)
        self.websocket = websocket
        self.endpoint = endpoint


class WebSocketView:
    """A Django view that serves an endpoint over a websocket.

    ``make_endpoint(ws)`` builds the endpoint of each accepted socket.
    :mod:`offload.wsgi` recognises these views and upgrades to them without
    Django's middleware stack (unless ``OFFLOAD_WEBSOCKET_MIDDLEWARE``).
    """

    csrf_exempt = True  # a websocket carries no form: the Origin check stands in for CSRF

    def __init__(self, make_endpoint: Callable[[WebSocket], Endpoint]) -> None:
        self.make_endpoint = make_endpoint

    def __call__(self, request: HttpRequest) -> HttpResponse:
        env = request.META
        if env.get("HTTP_UPGRADE", "").lower() != "websocket":
            metrics.handshake_refused("websocket", "bad_request")
            return HttpResponse("websocket endpoint: upgrade required\n", status=426, headers={"Upgrade": "websocket"})
        refusal = _handshake_refusal(env)
        if refusal is not None:
            metrics.handshake_refused("websocket", "bad_request")
            return refusal
        offered = env.get("HTTP_SEC_WEBSOCKET_PROTOCOL")
        subprotocol = _choose_subprotocol(offered, conf.get("OFFLOAD_SUBPROTOCOLS"))
        if not origin_allowed(env.get("HTTP_ORIGIN")):
            log.warning("websocket refused: origin %r not allowed", env.get("HTTP_ORIGIN"))
            metrics.handshake_refused("websocket", "origin")
            return HttpResponseForbidden("origin not allowed\n")
        query = _query(env)
        try:
            claim = connection_claim(env, query.get("token", []), time.time())
        except PermissionDenied as exc:
            return _token_refusal("websocket", exc)
        connection_id = new_connection_id()
        slots = _slots(request, connection_id)
        timeout = conf.get("OFFLOAD_HANDSHAKE_TIMEOUT")
        waiting_for = "a connection slot (Redis)"
        try:
            with gevent.Timeout(timeout):
                if not slots.acquire():
                    log.warning("websocket refused: too many connections from %s", slots.ip)
                    metrics.handshake_refused("websocket", "too_many_connections")
                    return HttpResponse("too many connections from this address\n", status=429)
                waiting_for = "the session user (thread pool)"
                identity = resolve_identity(request, claim)
        except gevent.Timeout:
            log.warning("websocket refused: handshake timed out after %.1f s waiting for %s", timeout, waiting_for)
            slots.release()
            metrics.handshake_refused("websocket", "timeout")
            return HttpResponse("handshake timed out\n", status=503)
        except PermissionDenied as exc:  # the token's user may no longer connect
            slots.release()
            return _token_refusal("websocket", exc)
        key = env["HTTP_SEC_WEBSOCKET_KEY"].strip(_HTTP_BLANKS)
        fd = uwsgi.connection_fd()
        no_delay(fd)  # before the cork: setting it sends what a cork holds
        cork(fd, True)  # the 101 leaves with the first frame (the WebSocket uncorks: first write or first park)
        try:
            if subprotocol is None and offered:
                _accept_without_subprotocol(uwsgi, key)
            else:  # exactly the chosen protocol, or none ("" sends no header when none was offered)
                uwsgi.websocket_handshake(key, env.get("HTTP_ORIGIN", ""), subprotocol or "")
        except OSError as exc:
            slots.release()
            metrics.handshake_refused("websocket", "bad_request")
            return HttpResponse(f"bad websocket handshake: {exc}\n", status=400)
        env[UPGRADED] = True
        install_signal_handlers()
        ws = WebSocket(fd, identity, query, uwsgi.worker_id(), slots, corked=True, connection_id=connection_id)
        return Upgraded(ws, self.make_endpoint(ws))


def websocket_view(make_endpoint: Callable[[WebSocket], Endpoint]) -> WebSocketView:
    """Make a Django view that serves ``make_endpoint(ws)`` over a websocket."""
    return WebSocketView(make_endpoint)


def _slots(request: HttpRequest, connection_id: str) -> ConnectionSlots:
    """The per-address connection slot a websocket or an event stream must hold (its member: the connection's id)."""
    return ConnectionSlots(
        client_address(request.META),
        conf.get("OFFLOAD_MAX_CONNECTIONS_PER_IP"),
        stale_after=3 * conf.get("OFFLOAD_PING_INTERVAL"),
        member=connection_id,
    )


channels_socket = websocket_view(lambda ws: ChannelsEndpoint(ws, worker.hub(ws.worker_id)))
echo_socket = websocket_view(EchoEndpoint)


def _error(status: int, code: str, reason: str, **headers) -> JsonResponse:
    return JsonResponse({"error": code, "reason": reason}, status=status, headers=headers or None)


@csrf_exempt
@require_POST
def api_publish(request: HttpRequest, channel: str) -> JsonResponse:
    """``POST /api/publish/<channel>``: publish the JSON body as message data."""
    key = conf.get("OFFLOAD_API_KEY")
    if not key:
        return _error(403, "api_disabled", "OFFLOAD_API_KEY is not configured")
    scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return _error(401, "unauthorized", "missing or wrong bearer key", **{"WWW-Authenticate": "Bearer"})
    limit = conf.get("OFFLOAD_MAX_MESSAGE_BYTES")
    # ASCII digits only: '²'.isdigit() is True but int('²') raised (a 500).
    length = parse_ascii_int(request.META.get("CONTENT_LENGTH") or "0")
    if length is None:
        return _error(400, "bad_content_length", "Content-Length must be a number in ASCII digits")
    if length > limit:
        return _error(413, "message_too_large", f"body larger than {limit} bytes")
    try:
        body = request.body
    except OSError:  # Django's UnreadablePostError: the client sent less than it announced and left
        log.info("publish API: the client closed before sending its %d-byte body", length)
        return _error(400, "incomplete_body", "the body is shorter than its Content-Length")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return _error(400, "bad_json", "body is not valid JSON")
    try:
        message_id = publish_json(channel, encode_data(data), source="api")
    except (ChannelError, ProtocolError) as exc:
        return _error(400, exc.code, exc.reason)
    except LimitExceeded as exc:
        return _error(413, exc.code, exc.reason)
    except OutcomeUnknown as exc:
        return _error(504, exc.code, exc.reason)
    except BackendUnavailable as exc:
        return _error(503, exc.code, exc.reason)
    return JsonResponse({"id": message_id})


#: Views offload.wsgi calls without the middleware stack (unless ``OFFLOAD_API_MIDDLEWARE``):
#: machine endpoints with a bearer key, no session, no CSRF.
DIRECT_API_VIEWS = frozenset({api_publish})


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness plus Redis reachability (503 when Redis is down)."""
    unreachable, _down = ping_redis()
    if unreachable:
        return JsonResponse({"status": "degraded", "redis": "down", "reason": unreachable}, status=503)
    return JsonResponse({"status": "ok", "redis": "up"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness, for a load balancer's health checks: may this worker take new clients?

    200 only when the worker is not draining (:func:`offload.worker.draining`),
    Redis answers, and the worker's hub is connected with its control channel
    subscribed (so a socket accepted here would get its messages); in a
    Cluster, some master and some hub link suffice (:mod:`offload.backend.health`
    says why), and what is down is named in ``"degraded"``. 503 with
    ``{"status": "unready", "reason": ...}`` otherwise. ``/healthz`` stays the
    liveness check: a draining worker is alive.
    """
    why = worker.draining()
    health = None
    if why is None:
        health = redis_health(worker.hub(uwsgi.worker_id() if uwsgi is not None else 0))
        why = health.unready
    if why is not None:
        return JsonResponse({"status": "unready", "reason": why}, status=503, headers={"Cache-Control": "no-store"})
    body = {"status": "ready"} if health.degraded is None else {"status": "ready", "degraded": health.degraded}
    return JsonResponse(body, headers={"Cache-Control": "no-store"})


def stream_view(request: HttpRequest) -> HttpResponse:
    """``GET /sse/?channel=C[&channel=D][&sub_token=T][&since=ID][&token=T]``: the channels as an event stream.

    Everything is checked before the first byte: a refusal is a JSON
    ``{"error": code, "reason": ...}`` with 400 (bad request), 401 (the
    connection token) or 403 (origin or policy), never a stream that ends at once.
    """
    if request.method != "GET":
        metrics.handshake_refused("sse", "bad_request")
        return HttpResponseNotAllowed(["GET"])
    if not origin_allowed(request.META.get("HTTP_ORIGIN")):
        log.warning("sse refused: origin %r not allowed", request.META.get("HTTP_ORIGIN"))
        metrics.handshake_refused("sse", "origin")
        return _error(403, "forbidden", "origin not allowed")
    subscriptions, unreadable = query_subscriptions(request.GET.getlist("channel"), request.GET.getlist("sub_token"))
    if unreadable:
        metrics.handshake_refused("sse", "token")
        return _error(403, "token_invalid", "a sub_token= is not a subscription token")
    channels = list(subscriptions)
    if not channels:
        metrics.handshake_refused("sse", "bad_request")
        return _error(400, "bad_message", "at least one channel= (or sub_token=) is required")
    limit = conf.get("OFFLOAD_MAX_SUBSCRIPTIONS")
    if len(channels) > limit:
        metrics.handshake_refused("sse", "bad_request")
        return _error(400, "too_many_subscriptions", f"at most {limit} channels per stream")
    try:
        identity = resolve_identity(request, connection_claim(request.META, request.GET.getlist("token"), time.time()))
    except PermissionDenied as exc:
        return _token_refusal("sse", exc)
    try:
        last_event_id = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id")
        positions = resume_positions(channels, request.GET.get("since"), last_event_id)
        for channel, token in subscriptions.items():
            check_subscribe(identity, channel, run_blocking, token=token)
    except RefusedError as exc:
        metrics.handshake_refused("sse", "forbidden" if isinstance(exc, PermissionDenied) else "bad_request")
        return _error(403 if isinstance(exc, PermissionDenied) else 400, exc.code, exc.reason)
    connection_id = new_connection_id()
    slots = _slots(request, connection_id)
    if not slots.acquire():
        metrics.handshake_refused("sse", "too_many_connections")
        return _error(429, "too_many_connections", "too many connections from this address")
    install_signal_handlers()
    worker_id, fd = (uwsgi.worker_id(), uwsgi.connection_fd()) if uwsgi is not None else (0, None)
    stream = SseStream(channels, positions, worker.hub(worker_id), slots, identity, fd, connection_id)
    response = StreamingHttpResponse(response_body(stream), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through at once
    return response
