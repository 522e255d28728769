"""Transfers that leave the Python cores: protected downloads and slow upstreams.

Django decides *whether* a transfer may happen (login, permissions, quotas);
uWSGI's offload threads move the bytes. The view returns a response that
carries only headers, and response routes in ``uwsgi.ini`` act on them:

* ``X-Sendfile: /abs/path`` — the ``static`` routing action sends the file
  through an offload thread (with Range and If-Modified-Since support). Only
  paths under ``var/files`` (``OFFLOAD_FILES_ROOT``) are honoured; anything
  else is a 403.
* ``X-Offload-Upstream: host:port`` (+ ``X-Offload-Upstream-Path``) — the
  ``http`` routing action proxies the request to a slow upstream through an
  offload thread, and the upstream's own status, headers and body reach the
  client. ``uwsgi.route("http", ...)`` from Python would be the direct way, but
  in uWSGI 2.0.31 it dereferences an unset routing buffer and segfaults the
  worker, so the header hand-off is used instead.

With ``OFFLOAD_INLINE = True`` (benchmarks only: "offloading disabled") the
same helpers stream the file or the upstream body from Python instead.
"""

from __future__ import annotations

import mimetypes
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from django.http import Http404, HttpResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header

from . import conf

__all__ = ["proxy_upstream", "resolve_under", "send_file"]

_CHUNK = 64 * 1024


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
    (uwsgi.ini refuses X-Sendfile paths outside it).

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
    """Hand a (slow) upstream GET to uWSGI's offload threads.

    The upstream receives this request's method and headers (cookies
    included: use trusted upstreams only) with the path and query of ``url``,
    and its response goes to the client unchanged. Only plain ``http://``
    upstreams are supported (the uWSGI ``http`` router has no TLS).

    Raises:
        ValueError: ``url`` is not an ``http://host:port/...`` URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"upstream must be an http:// URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if conf.get("OFFLOAD_INLINE"):
        return _proxy_inline(url)
    response = HttpResponse(status=200)
    response["X-Offload-Upstream"] = f"{parts.hostname}:{parts.port or 80}"
    response["X-Offload-Upstream-Host"] = parts.netloc
    response["X-Offload-Upstream-Path"] = path
    return response


def _proxy_inline(url: str) -> StreamingHttpResponse:
    upstream = urllib.request.urlopen(url, timeout=300)

    def body() -> Iterator[bytes]:
        with upstream:
            while chunk := upstream.read(_CHUNK):
                yield chunk

    response = StreamingHttpResponse(body(), status=upstream.status)
    for header in ("Content-Type", "Content-Length", "Content-Disposition"):
        if upstream.headers.get(header):
            response[header] = upstream.headers[header]
    return response
