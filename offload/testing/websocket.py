"""A blocking websocket client on wsproto for tests, and a builder of any client frame."""

from __future__ import annotations

import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

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
