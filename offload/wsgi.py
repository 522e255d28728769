"""The WSGI entry point: Django's handler, made safe and fast for websocket upgrades.

A websocket view performs uWSGI's handshake, so uWSGI has already sent the
101 headers when Django's ``WSGIHandler`` calls ``start_response`` for the
view's response: uWSGI raises ``OSError: headers already sent``, the
exception escapes before the response is returned, the server never calls
``response.close()`` and ``request_finished`` never fires (database
connections stay open). :class:`OffloadWSGIHandler` handles upgrades in one
of two ways:

* **Direct (default).** A websocket upgrade to a URL whose view was made by
  :func:`offload.views.websocket_view` skips Django's middleware stack, as
  Django Channels does for websockets: the handler builds the request,
  validates the Host header (``ALLOWED_HOSTS``), resolves the URL and calls
  the view, which checks the Origin, the limits and the session user itself.
  Middleware costs most of a handshake's CPU (measured: a 5,000-socket
  connect storm took about 1.2 ms of worker CPU per socket through the
  stack); ``request_started``/``request_finished`` are not sent, and nothing
  in the handshake keeps a database connection (``offload.blocking`` closes
  the thread's connections).
* **Through the middleware** (``OFFLOAD_WEBSOCKET_MIDDLEWARE = True``, or a
  websocket view that is not a direct match): Django runs as for any request,
  with a ``start_response`` that does nothing once the request was upgraded,
  so the (empty) response is returned normally and ``request_finished`` runs.

The HTTP publish API (``POST /api/publish/<channel>``, a machine endpoint
with a bearer key, no session, no CSRF, no database) takes the same direct
path unless ``OFFLOAD_API_MIDDLEWARE`` is set: the middleware stack and the
request signals were about half of the worker's Python time per publish.
Its responses carry ``X-Content-Type-Options: nosniff`` as
``SecurityMiddleware`` would add.

Either way the websocket then leaves the request: once Django is done, the
connection duplicates the client fd (:meth:`offload.transports.connection.WebSocket.detach`),
takes its first turn on the request's greenlet (``subscribed`` follows the
101 at once) and parks, and the uWSGI request ends, freeing its async core.
An open socket then costs only its Python objects (docs/performance.md has
the measured figure).
"""

from __future__ import annotations

import logging
from math import ceil

import gevent
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIHandler, WSGIRequest, get_path_info
from django.http import HttpResponse, HttpResponseBadRequest, HttpResponseServerError, JsonResponse
from django.urls import Resolver404, ResolverMatch, get_resolver

from . import conf, metrics
from .addresses import client_address
from .core.protocol import parse_ascii_int
from .core.rates import cooldowns
from .views import DIRECT_API_VIEWS, UPGRADED, Upgraded, WebSocketView, preload_identity_modules
from .watchdog import install as install_watchdog
from .watchdog import reached_app

__all__ = ["OffloadWSGIHandler", "get_wsgi_application", "tune_gc", "untrack_greenlet_tree"]

log = logging.getLogger("offload.wsgi")

_ROUTE_CACHE_SIZE = 256  # distinct upgrade paths remembered (a site has a handful)
_DRAIN_LIMIT = 1 << 20  # bytes of a refused request's body read before answering
_NOSNIFF = [("X-Content-Type-Options", "nosniff")]
_PLAIN = [("Content-Type", "text/plain; charset=utf-8"), *_NOSNIFF]
_BAD_LENGTH = b'{"error":"bad_content_length","reason":"Content-Length must be a number in ASCII digits"}\n'


_WEBSOCKET_REFUSALS = {
    400: lambda: HttpResponseBadRequest("invalid Host header\n"),
    500: lambda: HttpResponseServerError("internal error\n"),
}
_API_REFUSALS = {
    400: lambda: JsonResponse({"error": "bad_request", "reason": "invalid Host header"}, status=400),
    500: lambda: JsonResponse({"error": "internal", "reason": "internal error"}, status=500),
}


def _discard(data: bytes) -> None:
    """The ``write`` callable returned for upgraded requests."""


class OffloadWSGIHandler(WSGIHandler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._routes: dict[str, ResolverMatch | None] = {}
        self._hosts: dict[tuple, bool] = conf.cache()  # Host headers that passed ALLOWED_HOSTS

    def __call__(self, environ, start_response):
        reached_app()  # the headers are in: the header timeout (offload.watchdog) no longer applies
        length = environ.get("CONTENT_LENGTH")
        if length and parse_ascii_int(length) is None:
            # Django would run int() on it while reading the body: '²', '5, 5'
            # (two headers, joined by uWSGI) or ' 5' raised, or meant a
            # different length than uWSGI's. One refusal for every view.
            start_response("400 Bad Request", [("Content-Type", "application/json"), *_NOSNIFF])
            return [_BAD_LENGTH]
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            cooldown = cooldowns.remaining(client_address(environ))
            if cooldown:  # this address flooded a socket moments ago: refuse it before any work
                metrics.handshake_refused("websocket", "abuse_cooldown")
                start_response("429 Too Many Requests", [("Retry-After", str(ceil(cooldown))), *_PLAIN])
                return [b"too many frames from this address: wait before reconnecting\n"]
            if not conf.get("OFFLOAD_WEBSOCKET_MIDDLEWARE"):
                match = self._route(environ)
                if match is not None and isinstance(match.func, WebSocketView):
                    return self._upgrade_directly(WSGIRequest(environ), match, start_response)
        elif environ.get("REQUEST_METHOD") == "POST" and not conf.get("OFFLOAD_API_MIDDLEWARE"):
            match = self._route(environ)
            if match is not None and match.func in DIRECT_API_VIEWS:
                return self._call_api_directly(WSGIRequest(environ), match, start_response)

        def guarded_start_response(status, headers, exc_info=None):
            if environ.get(UPGRADED):
                return _discard
            return start_response(status, headers, exc_info)

        response = super().__call__(environ, guarded_start_response)
        if not isinstance(response, Upgraded):
            return response
        # Django is done with this request: finish it now (request_finished
        # closes database connections) before the socket's long life begins.
        response.close()
        return _run_detached(response)

    def _route(self, environ: dict) -> ResolverMatch | None:
        """The URL match of the request's path (None: no view), remembered.

        The path is read without building a ``WSGIRequest``: Django's
        constructor writes the decoded path back into the environ, and a second
        one (Django's own, when we fall through) could then not re-encode it
        (``POST /%D9%A1`` raised UnicodeEncodeError and got no answer).
        """
        path = get_path_info(environ) or "/"
        try:
            return self._routes[path]
        except KeyError:
            pass
        try:
            match = get_resolver().resolve(path)
        except Resolver404:
            match = None
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[path] = match
        return match

    def _upgrade_directly(self, request: WSGIRequest, match: ResolverMatch, start_response):
        response = self._call_view(request, match, "websocket handshake", _WEBSOCKET_REFUSALS)
        if isinstance(response, Upgraded):
            return _run_detached(response)
        if request.environ.get(UPGRADED):  # upgraded, then failed: nothing more can be sent
            return []
        return _send(response, start_response)

    def _check_host(self, request: WSGIRequest) -> None:
        """``request.get_host()`` (ALLOWED_HOSTS, as CommonMiddleware would
        check it), remembered per Host header.

        Raises:
            DisallowedHost: the host is not allowed.
        """
        env = request.environ
        key = (env.get("HTTP_HOST"), env.get("HTTP_X_FORWARDED_HOST"), env.get("SERVER_NAME"), env.get("SERVER_PORT"))
        if key not in self._hosts:
            request.get_host()  # raises: nothing remembered
            if len(self._hosts) >= _ROUTE_CACHE_SIZE:
                self._hosts.clear()
            self._hosts[key] = True

    def _call_view(self, request: WSGIRequest, match: ResolverMatch, what: str, refusals: dict) -> HttpResponse:
        """Call the matched view as Django would behind its middleware, the
        Host checked; a disallowed Host or an exception becomes the refusal
        ``refusals[400]()`` or ``refusals[500]()``."""
        try:
            self._check_host(request)
            request.resolver_match = match
            return match.func(request, *match.args, **match.kwargs)
        except DisallowedHost as exc:
            log.warning("%s refused: %s", what, exc)
            return refusals[400]()
        except Exception:
            log.exception("%s failed: %s", what, request.path)
            return refusals[500]()

    def _call_api_directly(self, request: WSGIRequest, match: ResolverMatch, start_response) -> list[bytes]:
        response = self._call_view(request, match, "API request", _API_REFUSALS)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.status_code >= 400:
            _drain_body(request)
        return _send(response, start_response)


def _run_detached(upgraded: Upgraded) -> list:
    """The socket leaves uWSGI: its first turn runs here, then it parks and
    this request (and its async core) ends. An idle socket keeps no greenlet
    at all (:mod:`offload.transports.connection`); the first turn on a greenlet
    of its own cost one more greenlet (a fresh 16 KiB frame stack, mapped and
    unmapped) and two switches per connect."""
    ws = upgraded.websocket
    ws.detach()
    ws.run(upgraded.endpoint)
    return []


def _drain_body(request: WSGIRequest) -> None:
    """Read (and drop) the rest of a refused request's body, up to a bound.

    A refusal (413: body too large, 401...) is answered before the body was
    read. Closing the connection with unread bytes makes the kernel send a
    reset, which can destroy our response in the client's buffers before the
    client, still busy sending, reads it. A body over ``_DRAIN_LIMIT`` is
    not read: such a client gets the reset.
    """
    length = parse_ascii_int(request.environ.get("CONTENT_LENGTH") or "0")
    if length is None or not 0 < length <= _DRAIN_LIMIT:  # not a plain number: nothing sane to wait for
        return
    try:
        while request.read(65536):
            pass
    except OSError:  # the client went away (Django's UnreadablePostError is one)
        pass


def _send(response: HttpResponse, start_response) -> list[bytes]:
    """Start a response of the direct paths the way Django's handler does.

    The body goes out as bytes, not as the response object: uWSGI would call
    its ``close()``, which sends ``request_finished`` for a request that never
    sent ``request_started``.
    """
    status = f"{response.status_code} {response.reason_phrase}"
    headers = [*response.items(), *(("Set-Cookie", c.output(header="")) for c in response.cookies.values())]
    start_response(status, headers)
    return [response.content]


def get_wsgi_application() -> OffloadWSGIHandler:
    """Like ``django.core.wsgi.get_wsgi_application``, with upgrade support
    and the garbage collector tuned for many long-lived sockets."""
    import django

    django.setup(set_prefix=False)
    handler = OffloadWSGIHandler()
    preload_identity_modules()  # before the fork: no worker imports them in its thread pool
    install_watchdog(conf.get("OFFLOAD_HEADER_TIMEOUT"))  # before the fork: uWSGI's gevent loop starts after
    tune_gc()
    untrack_greenlet_tree()
    return handler


def untrack_greenlet_tree() -> None:
    """Greenlets stop recording who spawned them (gevent's ``track_greenlet_tree``).

    By default every greenlet keeps a reference to its spawner and a copy of
    the spawner's last ten stack frames, for ``gevent.util``'s debugging dumps
    (unused here). A websocket costs a spawn to open (uWSGI's request) and
    one per busy turn after: the frames were about 5 % of a connect storm's
    worker CPU.
    """
    gevent.config.track_greenlet_tree = False


def tune_gc() -> None:
    """Make garbage collection pauses small with many open sockets.

    Each open socket is a few dozen long-lived container objects. Python's
    default young-generation threshold (700 allocations) promotes them to the
    oldest generation within moments, and a full collection runs whenever it
    grew by a quarter: a 10,000-socket connect storm ran six, of 37 to 264 ms
    each, stalling every socket of the worker. A larger threshold
    (``OFFLOAD_GC_THRESHOLD``) collects young objects less often, so a storm
    ends before any full collection. Everything loaded so far (Django, the
    URLconf, this code) is frozen: never scanned again, and shared with the
    forked workers instead of copied by the collector's writes.
    """
    import gc

    threshold = conf.get("OFFLOAD_GC_THRESHOLD")
    if not threshold:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
