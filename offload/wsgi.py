"""The WSGI entry point: Django's handler, made safe for upgraded requests.

A websocket view runs for the socket's whole life and returns only when it
closes. Django's ``WSGIHandler`` then calls ``start_response`` for the view's
response, but uWSGI already sent the 101 headers during the handshake and
raises ``OSError: headers already sent``. The exception escapes before the
response is returned, so the server never calls ``response.close()`` and
``request_finished`` never fires (database connections stay open).

:class:`OffloadWSGIHandler` passes Django a ``start_response`` that does
nothing once the request was upgraded, so the (empty) response is returned
normally, uWSGI writes nothing, calls ``close()``, and ``request_finished``
runs as for any request. ``request_started`` runs at the start as usual.
"""

from __future__ import annotations

from django.core.handlers.wsgi import WSGIHandler

from .views import UPGRADED

__all__ = ["OffloadWSGIHandler", "get_wsgi_application"]


def _discard(data: bytes) -> None:
    """The ``write`` callable returned for upgraded requests."""


class OffloadWSGIHandler(WSGIHandler):
    def __call__(self, environ, start_response):
        def guarded_start_response(status, headers, exc_info=None):
            if environ.get(UPGRADED):
                return _discard
            return start_response(status, headers, exc_info)

        return super().__call__(environ, guarded_start_response)


def get_wsgi_application() -> OffloadWSGIHandler:
    """Like ``django.core.wsgi.get_wsgi_application``, with upgrade support."""
    import django

    django.setup(set_prefix=False)
    return OffloadWSGIHandler()
