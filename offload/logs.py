"""Structured logs: JSON lines, and the connection fields of websocket and SSE lines.

``OFFLOAD_LOG_FORMAT = "json"`` (env ``OFFLOAD_LOG_FORMAT=json`` in the demo
project) makes every line a JSON object (:class:`JsonFormatter`): time, level,
logger, process, message, and whatever the call passed in ``extra``. A line
about one websocket or event stream carries its ``connection_id`` and
``user_id`` (None: anonymous), so one client's story can be followed across
lines and workers: ``grep '"connection_id": "<id>"'``.

Nothing is kept per connection for this (thousands of sockets per worker): a
log site passes ``extra=connection_fields(conn)``, a dict built only when a
line is written; :func:`log_connection` does the same for levels that are
usually off (DEBUG), building nothing unless the line is written.

A leaf module (the standard library, Django's exceptions and :mod:`offload.conf`),
so every layer may use it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from . import conf

__all__ = ["JsonFormatter", "configure", "connection_fields", "log_connection"]

#: Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def connection_fields(conn: Any) -> dict[str, Any]:
    """The ``extra`` of a log line about ``conn`` (a websocket or an event stream).

    Args:
        conn: anything with ``connection_id`` and ``identity`` (an
            ``offload.policies.Identity`` or None).
    """
    # getattr: a log line must never fail, whatever object a caller (or a test's fake) passes.
    identity = getattr(conn, "identity", None)
    return {
        "connection_id": getattr(conn, "connection_id", None),
        "user_id": getattr(identity, "user_id", None),
    }


def log_connection(logger: logging.Logger, level: int, conn: Any, msg: str, *args: Any) -> None:
    """``logger.log(level, msg, *args)`` with ``conn``'s fields, built only if the line is written."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, *args, extra=connection_fields(conn))


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys: ``ts`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``pid``,
    ``msg`` (the formatted message), then every ``extra`` field of the call
    (``connection_id``, ``user_id``, ...), and ``exc`` (the traceback) when
    there is one. Values JSON cannot hold are written as their ``str()``.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure() -> None:
    """Apply ``OFFLOAD_LOG_FORMAT``: with ``"json"``, every handler of the root,
    ``django`` and ``offload`` loggers formats with :class:`JsonFormatter` (the project's
    ``LOGGING`` still decides where lines go and which levels pass).

    Raises:
        django.core.exceptions.ImproperlyConfigured: neither ``"text"`` nor ``"json"``.
    """
    form = conf.get("OFFLOAD_LOG_FORMAT")
    if form not in ("text", "json"):
        raise ImproperlyConfigured(f'OFFLOAD_LOG_FORMAT must be "text" or "json", not {form!r}')
    if form == "json":
        formatter = JsonFormatter()
        for logger in (logging.getLogger(), logging.getLogger("django"), logging.getLogger("offload")):
            for handler in logger.handlers:
                handler.setFormatter(formatter)
