"""The WSGI entry point: Django's handler, made safe for upgraded requests.

A websocket view runs for the socket's whole life and returns only when it
closes. Django's ``WSGIHandler`` then calls ``start_response`` for the view's
response, but uWSGI already sent the 101 headers during the handshake and
raises ``OSError: headers already sent``. The exception escapes before the
response is returned, so the server never calls ``response.close()`` and
``request_finished`` never fires (database connections stay open).

:class:`OffloadWSGIHandler` passes Django a ``start_response`` that does
nothing once the request was upgraded, so the (empty) response is returned
normally and ``request_finished`` runs as for any request (``request_started``
runs at the start as usual).

It also takes the websocket out of the request: the view only authenticates
and performs the handshake; once Django returned, the connection duplicates
the client fd (:meth:`offload.connection.WebSocket.detach`) and runs on a
fresh greenlet, and the uWSGI request ends, freeing its async core. An open
socket then costs only its Python objects (measured here: 49 KB per idle
socket inside a request greenlet, far less detached; see docs/performance.md).
"""

from __future__ import annotations

import gevent
from django.core.handlers.wsgi import WSGIHandler

from .views import DEFERRED_RUN, UPGRADED

__all__ = ["OffloadWSGIHandler", "get_wsgi_application"]


def _discard(data: bytes) -> None:
    """The ``write`` callable returned for upgraded requests."""


class OffloadWSGIHandler(WSGIHandler):
    def __call__(self, environ, start_response):
        def guarded_start_response(status, headers, exc_info=None):
            if environ.get(UPGRADED):
                return _discard
            return start_response(status, headers, exc_info)

        environ[DEFERRED_RUN] = False
        response = super().__call__(environ, guarded_start_response)
        deferred = environ.pop(DEFERRED_RUN, None)
        if not deferred:
            return response
        # Django is done with this request: finish it now (request_finished
        # closes database connections) and free the request and response
        # objects before the socket's long life begins.
        response.close()
        del response
        ws, endpoint = deferred
        # The socket leaves uWSGI: its own greenlet serves it from now on and
        # this request (and its async core) ends at once.
        ws.detach()
        gevent.spawn(ws.run, endpoint)
        return []


def get_wsgi_application() -> OffloadWSGIHandler:
    """Like ``django.core.wsgi.get_wsgi_application``, with upgrade support."""
    import django

    django.setup(set_prefix=False)
    return OffloadWSGIHandler()
