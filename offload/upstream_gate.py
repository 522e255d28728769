"""The upstream gate (``python -m offload.upstream_gate SOCKET``, started
by uwsgi.ini) exists because uWSGI's ``http`` action alone is not safe to point at
an upstream: it forwards every request header (the session cookie and
``Authorization`` included), sends its ``host`` argument untranslated (the
upstream received a literal ``${...}``), relays the upstream's bytes verbatim
(``Set-Cookie`` included) and, when the upstream is down, closes the client's
connection without an answer. Its offload thread only moves bytes between two
sockets, so the gate is that other socket: it forwards an allow-list of
request headers with the upstream's real ``Host``, drops ``Set-Cookie`` and
hop-by-hop headers from the answer, adds the security headers, and answers
502 (unreachable, refused, garbage) or 504 (no response head within
``OFFLOAD_UPSTREAM_TIMEOUT`` seconds) itself. It is one asyncio process per
instance: the bytes never pass through a worker.

It imports no Django: it runs as a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import socket
import sys
import urllib.parse
from functools import partial
from pathlib import Path

from .core.forwarded import Network, parse_networks, rightmost_untrusted

__all__ = [
    "DEFAULT_UPSTREAM_TIMEOUT",
    "FORWARDED_REQUEST_HEADERS",
    "REASONS",
    "UPSTREAM_SECURITY_HEADERS",
    "GateError",
    "filter_upstream_response",
    "serve_gate",
    "trusted_proxies",
    "upstream_request",
    "upstream_timeout",
]

_CHUNK = 64 * 1024

#: Seconds the upstream gate waits for the upstream to connect and send its
#: response head (then 504), and the longest silence it tolerates inside the
#: body (then the connection is closed). Environment: OFFLOAD_UPSTREAM_TIMEOUT.
DEFAULT_UPSTREAM_TIMEOUT = 60.0

#: Request headers the upstream receives; everything else the client sent
#: (Cookie, Authorization, X-Forwarded-*, ...) stays with Django.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "user-agent",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
    }
)

#: Response headers the client never receives from an upstream: cookies would
#: be set on *our* origin, hop-by-hop headers describe the gate's connection,
#: and the security headers are replaced by ours.
_STRIPPED_RESPONSE_HEADERS = frozenset(
    {
        "set-cookie",
        "set-cookie2",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authentication-info",
        "upgrade",
        "trailer",
        "x-frame-options",
        "x-content-type-options",
        "content-security-policy",
        "content-security-policy-report-only",
    }
)

#: Added to every response the gate sends. The CSP sandboxes whatever the
#: upstream returned: shown from our origin, it must not run as our origin.
UPSTREAM_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; sandbox"),
)

# Statuses the gate (or inline mode) answers itself.
REASONS = {405: "Method Not Allowed", 502: "Bad Gateway", 504: "Gateway Timeout"}
# A request or response head larger than this is refused (the gate's memory per connection).
_HEAD_LIMIT = 64 * 1024
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_VISIBLE = re.compile(rb"[\x21-\x7e]+")


def upstream_timeout() -> float:
    """``OFFLOAD_UPSTREAM_TIMEOUT`` from the environment (seconds, default 60)."""
    return float(os.environ.get("OFFLOAD_UPSTREAM_TIMEOUT") or DEFAULT_UPSTREAM_TIMEOUT)


@functools.cache
def trusted_proxies() -> tuple[Network, ...]:
    """``OFFLOAD_TRUSTED_PROXIES`` from the environment (comma-separated): the gate has no Django settings."""
    return parse_networks(os.environ.get("OFFLOAD_TRUSTED_PROXIES", "").split(","))


# --- the gate ---------------------------------------------------------------
#
# Theory: the offload thread connects to the gate's unix socket, writes the request head
# uWSGI built (request-target = the X-Offload-Upstream URL, then the client's headers,
# then uWSGI's own Host, Connection and X-Forwarded-For) and relays bytes both ways
# until either side closes. The gate parses that head, connects to the upstream, sends
# a fresh HTTP/1.0 request, reads the upstream's response head, rewrites it and then
# copies the body. Everything before the first byte to the client can still become a
# 502/504; after it, a failure can only close the connection.


class GateError(Exception):
    """A request the gate answers itself (``status``: 405, 502 or 504)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {REASONS[status]}: {detail}")
        self.status = status


def _head_lines(head: bytes) -> list[bytes]:
    return head.rstrip(b"\r\n").split(b"\r\n")


def _header_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # no obs-fold, no junk
            raise GateError(502, f"malformed header line {line[:80]!r}")
        fields.append((name, value.strip(b" \t")))
    return fields


def upstream_request(head: bytes, trusted: tuple[Network, ...] = ()) -> tuple[str, int, bytes]:
    """Turn the request head uWSGI sent to the gate into the upstream's request.

    ``trusted``: our load balancers (:func:`trusted_proxies`); the client's
    address is found in ``X-Forwarded-For`` as :mod:`offload.addresses` finds
    it for every per-client limit, so the upstream sees the same client.

    Returns:
        ``(host, port, request_bytes)`` where the request carries only the
        allowed headers, the upstream's own ``Host``, the client's address in
        ``X-Forwarded-For`` and ``Connection: close``.

    Raises:
        GateError: 405 for a method other than GET or HEAD, 502 for a head
            that does not carry an ``http://`` URL.
    """
    lines = _head_lines(head)
    try:
        method, target, _version = lines[0].split(b" ")
    except ValueError:
        raise GateError(502, f"malformed request line {lines[0][:80]!r}") from None
    if method not in (b"GET", b"HEAD"):
        raise GateError(405, f"{method[:20]!r} is not forwarded")
    if not _VISIBLE.fullmatch(target):
        raise GateError(502, f"request-target is not printable ASCII: {target[:200]!r}")
    parts = urllib.parse.urlsplit(target.decode("ascii", "replace"))
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        raise GateError(502, f"not an http:// upstream: {target[:200]!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out = [b"%s %s HTTP/1.0" % (method, path.encode("ascii")), b"Host: " + parts.netloc.encode("ascii")]
    forwarded_for = b""
    for name, value in _header_fields(lines[1:]):
        lowered = name.lower()
        if lowered.decode() in FORWARDED_REQUEST_HEADERS:
            out.append(name + b": " + value)
        elif lowered == b"x-forwarded-for":
            forwarded_for = value
    # uWSGI appends REMOTE_ADDR (the peer) to what the peer sent: the peer's own claims
    # count only when it is one of our trusted proxies.
    *claimed, peer = forwarded_for.decode("latin-1").split(",")
    client_addr = rightmost_untrusted(peer.strip(), ",".join(claimed), trusted)
    if client_addr:
        out.append(b"X-Forwarded-For: " + client_addr.encode("latin-1"))
    out.append(b"Connection: close")
    return parts.hostname, port, b"\r\n".join(out) + b"\r\n\r\n"


def filter_upstream_response(head: bytes) -> tuple[int, bytes]:
    """Rewrite the upstream's response head for the client.

    Returns:
        ``(status, head_bytes)``: the upstream's status and reason, its
        headers without ``Set-Cookie``, hop-by-hop headers (and those its
        ``Connection`` header names) or security headers, then
        :data:`UPSTREAM_SECURITY_HEADERS` and ``Connection: close``.

    Raises:
        GateError: 502 for a head that is not an HTTP/1.x final response.
    """
    lines = _head_lines(head)
    match = _STATUS_LINE.fullmatch(lines[0])
    if not match or match[1] < b"200":
        raise GateError(502, f"bad status line {lines[0][:80]!r}")
    fields = _header_fields(lines[1:])
    dropped = set(_STRIPPED_RESPONSE_HEADERS)
    for name, value in fields:
        if name.lower() == b"connection":
            dropped.update(token.strip().lower().decode("ascii", "replace") for token in value.split(b","))
    if any(name.lower() == b"transfer-encoding" for name, _ in fields):
        dropped.add("content-length")  # RFC 9112 6.3: Transfer-Encoding wins
    out = [b"HTTP/1.1 %s %s" % (match[1], (match[2] or b"").strip())]
    out += [name + b": " + value for name, value in fields if name.lower().decode() not in dropped]
    out += [f"{name}: {value}".encode() for name, value in UPSTREAM_SECURITY_HEADERS]
    out.append(b"Connection: close")
    return int(match[1]), b"\r\n".join(out) + b"\r\n\r\n"


def _error_response(status: int) -> bytes:
    body = f"{REASONS[status]}\n".encode()
    head = [f"HTTP/1.1 {status} {REASONS[status]}", "Content-Type: text/plain; charset=utf-8"]
    head += [f"Content-Length: {len(body)}", *(f"{n}: {v}" for n, v in UPSTREAM_SECURITY_HEADERS), "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise GateError(502, f"head larger than {_HEAD_LIMIT} bytes") from None
    except asyncio.IncompleteReadError:
        raise GateError(502, "connection closed before the end of the head") from None


async def _gate_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float) -> None:
    """Serve one connection from an offload thread (see the theory above)."""
    try:
        request = await asyncio.wait_for(_read_head(reader), timeout)
        relay = asyncio.create_task(_relay(request, writer, timeout))
        # The offload thread closes our socket when the client goes away: then
        # stop waiting for the upstream.
        client_gone = asyncio.create_task(_until_closed(reader))
        await asyncio.wait({relay, client_gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (relay, client_gone):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
    except (GateError, TimeoutError, OSError) as exc:
        _log(f"no request from uWSGI: {exc!r}")
    finally:
        writer.close()


async def _until_closed(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):  # a reset is a close too
        while await reader.read(_CHUNK):
            pass  # bytes after the request head (a body, a pipelined request) are not forwarded


async def _relay(request: bytes, writer: asyncio.StreamWriter, timeout: float) -> None:
    target = request.split(b" ", 2)[1][:200].decode("ascii", "replace") if request.count(b" ") >= 2 else "?"
    upstream_writer = None
    try:
        failure = None
        try:
            async with asyncio.timeout(timeout):
                host, port, upstream_head = upstream_request(request, trusted_proxies())
                try:
                    upstream_reader, upstream_writer = await asyncio.open_connection(host, port, limit=_HEAD_LIMIT)
                except OSError as exc:  # refused, unreachable, unknown host
                    raise GateError(502, f"cannot connect: {exc!r}") from None
                upstream_writer.write(upstream_head)
                await upstream_writer.drain()
                status, head = filter_upstream_response(await _read_head(upstream_reader))
        except GateError as exc:
            failure = exc
        except TimeoutError:
            failure = GateError(504, f"no response head within {timeout:g} s")
        except OSError as exc:  # the upstream reset the connection before its head was complete
            failure = GateError(502, repr(exc))
        if failure is not None:
            _log(f"{failure} for {target}")
            writer.write(_error_response(failure.status))
            await writer.drain()
            return
        writer.write(head)
        await writer.drain()
        if upstream_head.startswith(b"HEAD ") or status in (204, 304):
            return
        # From here a failure can only cut the body: a stalled upstream (no byte for
        # `timeout` seconds) or a client that left closes both connections.
        while chunk := await asyncio.wait_for(upstream_reader.read(_CHUNK), timeout):
            writer.write(chunk)
            await writer.drain()
    except (TimeoutError, OSError) as exc:
        _log(f"body from {target} cut: {exc!r}")
    finally:
        if upstream_writer is not None:
            upstream_writer.close()


def _log(message: str) -> None:
    print(f"offload upstream gate [{os.getpid()}]: {message}", file=sys.stderr, flush=True)


async def serve_gate(
    path: str, *, timeout: float, pidfile: str | None = None, master_pidfile: str | None = None
) -> None:
    """Run the upstream gate on the unix socket ``path`` until SIGTERM/SIGINT.

    Args:
        timeout: seconds for the upstream's response head (then 504), and
            the longest silence inside a body.
        pidfile: written once the socket listens (uWSGI supervises the gate
            through it; its appearance means "ready").
        master_pidfile: the gate also stops when that uWSGI master is gone,
            so a killed uWSGI never leaves a gate behind.

    SIGHUP (uWSGI's notice of a graceful reload) is ignored: the gate keeps
    serving across reloads.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    master = int(Path(master_pidfile).read_text().strip()) if master_pidfile else None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a gate that was killed
    server = await asyncio.start_unix_server(
        partial(_gate_connection, timeout=timeout), path=path, limit=_HEAD_LIMIT, backlog=socket.SOMAXCONN
    )
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
    if pidfile:
        Path(pidfile).write_text(f"{os.getpid()}\n")
    _log(f"listening on {path} (upstream timeout {timeout:g} s)")
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if master is not None and not _alive(master):
                _log(f"uWSGI master {master} is gone")
                break
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode:  # not a socket a newer gate bound meanwhile
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> None:
    """The upstream gate's command line (uwsgi.ini runs it as a daemon)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m offload.upstream_gate", description="offload's upstream gate")
    parser.add_argument("socket", help="unix socket the `http` routing action connects to")
    parser.add_argument("--timeout", type=float, default=upstream_timeout(), help="seconds (OFFLOAD_UPSTREAM_TIMEOUT)")
    parser.add_argument("--pidfile", help="written once the socket listens")
    parser.add_argument("--master-pidfile", help="stop when this uWSGI master is gone")
    args = parser.parse_args(argv)
    try:
        trusted_proxies()
    except ValueError as exc:
        parser.error(f"OFFLOAD_TRUSTED_PROXIES: {exc}")
    # Lead a process group of our own: uWSGI signals a supervised daemon's group.
    with contextlib.suppress(PermissionError):  # already a group leader
        os.setsid()
    asyncio.run(serve_gate(args.socket, timeout=args.timeout, pidfile=args.pidfile, master_pidfile=args.master_pidfile))


if __name__ == "__main__":
    main(sys.argv[1:])
