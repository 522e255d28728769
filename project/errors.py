"""Error pages and log filters for requests a client got wrong.

Django's default 400/403/404 handlers are ``requires_csrf_token``: for a POST
with a CSRF cookie they run the CSRF check, which parses the body, so a
malformed multipart body sent to a missing page became a 500 inside the 404
handler (found by the HTTP fuzzer). These handlers answer with plain text and
touch nothing of the request.

Django also logs a whole traceback for each DisallowedHost, TooManyFieldsSent
or malformed multipart body: any client could fill the log with them, one per
request. :class:`ClientErrorsWithoutTraceback` keeps the one-line message.
"""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse


def _plain(status: int, text: str) -> HttpResponse:
    return HttpResponse(text + "\n", status=status, content_type="text/plain; charset=utf-8")


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _plain(400, "bad request")


def permission_denied(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _plain(403, "forbidden")


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return _plain(404, "not found")


class ClientErrorsWithoutTraceback(logging.Filter):
    """A client's mistake (status below 500, or a ``django.security`` warning)
    logs its message but not the traceback of the exception Django raised about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("django.security") or getattr(record, "status_code", 500) < 500:
            record.exc_info = None
            record.exc_text = None
        return True
