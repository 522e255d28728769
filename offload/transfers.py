"""Transfers that leave the Python cores: protected downloads and slow upstreams.

Django decides *whether* a transfer may happen (login, permissions, quotas);
uWSGI's offload threads move the bytes. The view returns a response that
carries only headers, and response routes in ``uwsgi.ini`` act on them:

* ``X-Sendfile: /abs/path`` — the ``static`` routing action sends the file
  through an offload thread (with Range and If-Modified-Since support). Only
  canonical paths of regular files under ``var/files`` (``OFFLOAD_FILES_ROOT``)
  are honoured: anything else is a 403 (or 404 for a missing file).
* ``X-Offload-Upstream: http://host:port/path?query`` — the ``http`` routing
  action hands the client's socket to an offload thread, which relays it to
  the *upstream gate* (below), a small process that makes the upstream request
  and streams the answer back. ``uwsgi.route("http", ...)`` from Python would
  be the direct way, but in uWSGI 2.0.31 it dereferences an unset routing
  buffer and segfaults the worker, so the header hand-off is used instead.

With ``OFFLOAD_INLINE = True`` (benchmarks only: "offloading disabled") the
same helpers stream the file or the upstream body from Python instead.

The upstream gate itself (the process the ``http`` action relays to) is
:mod:`offload.upstream_gate`.
"""

from __future__ import annotations

import mimetypes
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header

from . import conf
from .upstream_gate import FORWARDED_REQUEST_HEADERS, REASONS, UPSTREAM_SECURITY_HEADERS, upstream_timeout

__all__ = [
    "FORWARDED_REQUEST_HEADERS",
    "UPSTREAM_SECURITY_HEADERS",
    "proxy_upstream",
    "resolve_under",
    "send_file",
]

_CHUNK = 64 * 1024
# host[:port] of an upstream: a name or IPv4 address, or a bracketed IPv6 address (no user:password@).
_NETLOC = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# Characters allowed unescaped in the upstream request-target (RFC 3986 path and query).
_TARGET_SAFE = "/?&=%:@!$'()*+,;~"


def resolve_under(root: str | os.PathLike, name: str) -> Path:
    """Return the real path of ``name`` inside ``root``, or raise ``Http404``.

    Refuses absolute names, ``..`` segments, NUL bytes and symlinks that
    lead outside ``root`` (path traversal), and anything that is not a
    regular file.
    """
    if not name or "\x00" in name or name.startswith(("/", "\\")):
        raise Http404("no such file")
    root_real = Path(os.path.realpath(root))
    parts = Path(name).parts
    if any(part in ("..", "") for part in parts):
        raise Http404("no such file")
    candidate = Path(os.path.realpath(root_real.joinpath(*parts)))
    if candidate == root_real or root_real not in candidate.parents or not candidate.is_file():
        raise Http404("no such file")
    return candidate


def send_file(
    path: str | os.PathLike,
    *,
    filename: str | None = None,
    as_attachment: bool = True,
    content_type: str | None = None,
) -> HttpResponse:
    """Respond with a file that uWSGI's offload threads send.

    Call it after your own permission checks, with a path you resolved with
    :func:`resolve_under`. The file must lie under ``OFFLOAD_FILES_ROOT``
    (uwsgi.ini refuses X-Sendfile paths outside it, and any path that is not
    the file's real path).

    Raises:
        Http404: the file does not exist.
    """
    real = Path(os.path.realpath(path))
    root = conf.get("OFFLOAD_FILES_ROOT")
    if root is not None and Path(os.path.realpath(root)) not in real.parents:
        raise ValueError(f"{real} is outside OFFLOAD_FILES_ROOT")
    if not real.is_file():
        raise Http404("no such file")
    filename = filename or real.name
    disposition = content_disposition_header(as_attachment, filename)
    content_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if conf.get("OFFLOAD_INLINE"):
        response = StreamingHttpResponse(_read_chunks(real), content_type=content_type)
        response["Content-Length"] = str(real.stat().st_size)
    else:
        response = HttpResponse(content_type=content_type)
        response["X-Sendfile"] = str(real)
    response["Content-Disposition"] = disposition
    response["Cache-Control"] = "private, no-store"
    return response


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def proxy_upstream(url: str) -> HttpResponse:
    """Hand a (slow) upstream GET or HEAD to uWSGI's offload threads.

    The upstream receives the path and query of ``url``, its own ``Host``,
    ``X-Forwarded-For`` (the client's address) and only the client's
    :data:`FORWARDED_REQUEST_HEADERS`: never its cookies or credentials. Its
    status, headers and body reach the client without ``Set-Cookie`` or
    hop-by-hop headers and with :data:`UPSTREAM_SECURITY_HEADERS`; an upstream
    that cannot be reached is a 502, one that does not answer in time a 504.
    Only plain ``http://`` upstreams are supported (no TLS); characters that
    are not allowed in a request-target are percent-encoded.

    Raises:
        ValueError: ``url`` is not an ``http://host[:port]/...`` URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not _NETLOC.fullmatch(parts.netloc) or parts.port == 0:
        raise ValueError(f"upstream must be an http://host[:port]/ URL, got {url!r}")
    target = urllib.parse.quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe=_TARGET_SAFE)
    if conf.get("OFFLOAD_INLINE"):
        return _proxy_inline(f"http://{parts.netloc}{target}")
    response = HttpResponse(status=200)
    response["X-Offload-Upstream"] = f"http://{parts.netloc}{target}"
    return response


def _proxy_inline(url: str) -> HttpResponse:
    try:
        upstream = urllib.request.urlopen(url, timeout=upstream_timeout())
    except urllib.error.HTTPError as exc:  # the upstream answered 4xx/5xx: relay it
        upstream = exc
    except urllib.error.URLError as exc:  # refused, unreachable, or no connection in time
        return _inline_error(504 if isinstance(exc.reason, TimeoutError) else 502)
    except TimeoutError:  # connected, but no response head in time
        return _inline_error(504)
    except OSError:
        return _inline_error(502)

    def body() -> Iterator[bytes]:
        with upstream:
            while chunk := upstream.read(_CHUNK):
                yield chunk

    response = StreamingHttpResponse(body(), status=upstream.status)
    for header in ("Content-Type", "Content-Length", "Content-Disposition"):
        if upstream.headers.get(header):
            response[header] = upstream.headers[header]
    return response


def _inline_error(status: int) -> HttpResponse:
    return HttpResponse(REASONS[status], status=status, content_type="text/plain; charset=utf-8")
