"""Client frames in, complete messages out: a thin adapter over wsproto.

uWSGI's own receive path is unsafe (a stray continuation frame crashes the
worker, fragments of different sockets share one buffer, UTF-8 is not
checked), so client bytes read from ``uwsgi.connection_fd()`` go through
wsproto's strict sans-I/O parser instead. This adapter adds what wsproto
leaves to its user: reassembling fragments into whole messages and enforcing
the message size limit while the message is still arriving. It does no I/O:
bytes in through :meth:`FrameReader.feed`, events out, control-frame bytes
(pong, close) from the helper methods.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from .closes import CloseCode

__all__ = [
    "BinaryReceived",
    "CloseReceived",
    "FragmentReceived",
    "FrameEvent",
    "FrameReader",
    "PingReceived",
    "PongReceived",
    "ProtocolFailure",
    "TextReceived",
]


def _header(first_byte: int, length: int) -> bytes:
    if length < 126:
        return bytes((first_byte, length))
    if length < 65536:
        return struct.pack("!BBH", first_byte, 126, length)
    return struct.pack("!BBQ", first_byte, 127, length)


def frame_text(payload: bytes) -> bytes:
    """A complete server text frame (FIN, unmasked) around UTF-8 ``payload``.

    Built once per published message by the hub; the same bytes are written
    to every subscribed socket.
    """
    return _header(0x81, len(payload)) + payload


def frame_binary(payload: bytes) -> bytes:
    """A complete server binary frame (FIN, unmasked)."""
    return _header(0x82, len(payload)) + payload


@dataclass(frozen=True)
class TextReceived:
    text: str


@dataclass(frozen=True)
class BinaryReceived:
    data: bytes


@dataclass(frozen=True)
class FragmentReceived:
    """A non-final frame of a data message arrived (the message goes on).

    Carries nothing: it exists so that every client frame, not only every
    whole message, can be counted against the connection's rate limit.
    """


@dataclass(frozen=True)
class PingReceived:
    payload: bytes


@dataclass(frozen=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True)
class CloseReceived:
    """The peer sent a close frame (or the TCP stream ended: code 1006)."""

    code: int
    reason: str


@dataclass(frozen=True)
class ProtocolFailure:
    """The peer broke the protocol; close with ``code`` and drop the socket."""

    code: int
    reason: str


FrameEvent = (
    TextReceived | BinaryReceived | FragmentReceived | PingReceived | PongReceived | CloseReceived | ProtocolFailure
)


_FRAGMENT = FragmentReceived()


def _at_rest(conn: Connection) -> bool:
    """wsproto holds nothing between two messages of an open connection: no
    event, no byte of a partial frame, no fragmented message. (Its internals:
    another wsproto version without them is never considered at rest.)"""
    try:
        proto = conn._proto
        decoder = proto._frame_decoder
        return (
            conn.state is ConnectionState.OPEN
            and not conn._events
            and decoder.header is None
            and not decoder.buffer.buffer
            and proto._message_decoder.opcode is None
        )
    except AttributeError:
        return False


class FrameReader:
    """Parses a client's byte stream into whole messages and control events.

    One per socket, and most sockets only send pongs: the wsproto connection
    (about 1.5 KB) is made when client bytes arrive (or a close frame is
    sent), and dropped again when they were parsed to a message boundary
    with nothing held (no partial frame, no fragmented message): a new one is
    then the same. Server pings while there is none are framed here (the
    same bytes wsproto would write).
    """

    __slots__ = ("_conn", "_max", "_parts", "_size", "failed")

    def __init__(self, max_message_bytes: int) -> None:
        self._conn: Connection | None = None
        self._max = max_message_bytes
        self._parts: list | None = None  # the pieces of a fragmented message so far
        self._size = 0
        self.failed = False

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(ConnectionType.SERVER)
        return self._conn

    @property
    def closing(self) -> bool:
        """True once a close frame was sent or received."""
        return self._conn is not None and self._conn.state is not ConnectionState.OPEN

    def feed(self, data: bytes | None) -> list[FrameEvent]:
        """Parse received bytes (``None`` at end of stream) into events."""
        return list(self.events(data))

    def events(self, data: bytes | None) -> Iterator[FrameEvent]:
        """Like :meth:`feed`, parsing lazily: frames are parsed only as the
        caller takes events, so a caller that stops (a flooder was closed)
        leaves the rest of the bytes unparsed instead of paying for them."""
        conn = self._connection()
        if self.failed or conn.state is ConnectionState.CLOSED:
            return
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                piece = event.data
                self._size += len(piece.encode()) if isinstance(piece, str) else len(piece)
                if self._size > self._max:
                    self.failed = True
                    yield ProtocolFailure(CloseCode.TOO_BIG, f"message larger than {self._max} bytes")
                    return
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, None, 0
                    if parts is not None:  # the last piece of a fragmented message
                        parts.append(piece)
                        piece = "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
                    if isinstance(event, TextMessage):
                        yield TextReceived(piece)
                    else:
                        yield BinaryReceived(piece)
                    continue
                if self._parts is None:
                    self._parts = []
                self._parts.append(piece)
                if event.frame_finished:
                    yield _FRAGMENT
            elif isinstance(event, Ping):
                yield PingReceived(bytes(event.payload))
            elif isinstance(event, Pong):
                yield PongReceived(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                if self._conn.state is ConnectionState.OPEN:
                    # wsproto reports a parse failure as a close it did not receive.
                    self.failed = True
                    yield ProtocolFailure(int(event.code), event.reason or "")
                    return
                yield CloseReceived(int(event.code), event.reason or "")
        if self._parts is None and _at_rest(conn):
            self._conn = None

    def pong(self, payload: bytes) -> bytes:
        """Bytes of a pong echoing ``payload`` (RFC 6455 5.5.3)."""
        conn = self._connection()
        if conn.state is not ConnectionState.OPEN:
            return b""
        return conn.send(Pong(payload=payload))

    def ping(self, payload: bytes = b"") -> bytes:
        """Bytes of a ping (at most 125 bytes of payload), or b"" once closing."""
        if self._conn is None:  # nothing received yet: the connection is open
            return _header(0x89, len(payload)) + payload
        if self._conn.state is not ConnectionState.OPEN:
            return b""
        return self._conn.send(Ping(payload=payload))

    def close(self, code: int, reason: str = "") -> bytes:
        """Bytes of our close frame, or b"" if one was already sent.

        Answers a peer's close too (echoing a valid code, as RFC 6455 asks).
        """
        conn = self._connection()
        if conn.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return b""
        if code in (CloseReason.NO_STATUS_RCVD, CloseReason.ABNORMAL_CLOSURE):
            code = CloseCode.NORMAL
        return conn.send(CloseConnection(code=code, reason=reason[:120]))
