"""One server websocket's protocol state, sans-I/O: bytes in, bytes out, time passed in.

Theory of operation
-------------------
:class:`WebSocketProtocol` knows the RFC 6455 rules the server applies after
the handshake and the library's limits; it does no I/O and reads no clock.
The connection (:mod:`offload.transports.connection`) feeds it what the socket read
(:meth:`~WebSocketProtocol.receive`, with ``now``), hands the messages it
yields to the endpoint, writes what :meth:`~WebSocketProtocol.data_to_send`
returns, and calls :meth:`~WebSocketProtocol.tick` when
:meth:`~WebSocketProtocol.next_deadline` comes. Client frames are parsed by
:class:`offload.core.frames.FrameReader` (wsproto), lazily: once a client is over
its rate limit the rest of its bytes are not even parsed.

Every client frame takes a token from the connection's bucket (data frames,
each fragment of a message, pings, pongs); pings and pongs also take one from
a smaller bucket of their own.

Transitions (the ``TRANSITIONS`` table below is what the code follows)::

    state     event                                   next      what is sent
    --------  --------------------------------------  --------  ----------------------------
    OPEN      peer close frame                        CLOSED    the close frame echoed
    OPEN      close(code) by the server               CLOSING   a close frame
    OPEN      protocol error (1002/1007/1009)         CLOSING   a close frame, then FIN
    OPEN      frames over the rate limit              CLOSING   close 1008 "rate limit exceeded"
    OPEN      no answer to a ping within the timeout  CLOSED    nothing (the peer is dead)
    OPEN      queued bytes stuck for the timeout      CLOSED    nothing (the peer does not read)
    CLOSING   peer close frame or end of stream       CLOSED    -
    CLOSING   close grace (2 s) over                  CLOSED    -
    CLOSING   frames over the rate limit              CLOSED    - (still flooding)
    any       end of stream                           CLOSED    -
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from .closes import Disconnect
from .frames import (
    BinaryReceived,
    CloseReceived,
    FrameReader,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    TextReceived,
)
from .rates import TokenBucket

__all__ = ["CLOSE_GRACE", "TRANSITIONS", "Dropped", "RateLimited", "State", "WebSocketProtocol"]

CLOSE_GRACE = 2.0  # seconds to wait for the peer's close frame


class State(enum.IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


#: (state, event) -> next state. Events not listed leave the state as it is.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.OPEN, "peer_close"): State.CLOSED,
    (State.OPEN, "close"): State.CLOSING,
    (State.OPEN, "protocol_error"): State.CLOSING,
    (State.OPEN, "over_rate"): State.CLOSING,
    (State.OPEN, "ping_unanswered"): State.CLOSED,
    (State.OPEN, "stuck"): State.CLOSED,
    (State.CLOSING, "peer_close"): State.CLOSED,
    (State.CLOSING, "grace_over"): State.CLOSED,
    (State.CLOSING, "over_rate"): State.CLOSED,
    (State.CLOSING, "stuck"): State.CLOSED,
    (State.OPEN, "eof"): State.CLOSED,
    (State.CLOSING, "eof"): State.CLOSED,
}


@dataclass(frozen=True)
class RateLimited:
    """Yielded when the client went over its rate limit (the connection logs
    it and cools the address down); the close frame is already queued."""


@dataclass(frozen=True)
class Dropped:
    """:meth:`WebSocketProtocol.tick` ended the connection without a close frame."""

    why: str


_RATE_LIMITED = RateLimited()


class WebSocketProtocol:
    """The server side of one websocket after the handshake.

    Args:
        reader: the client-frame parser.
        buckets: ``(every frame, pings and pongs)`` rate limits.
        ping_interval, ping_timeout: seconds between server pings, and how long
            a peer may stay silent after one.
        now: the time the connection opened.
        first_ping_in: seconds to the first ping (spread it: sockets that
            connected together must not all ping together).
    """

    __slots__ = (
        "_bucket",
        "_closing_since",
        "_control_bucket",
        "_next_ping",
        "_outgoing",
        "_ping_interval",
        "_ping_sent",
        "_ping_timeout",
        "_reader",
        "close_code",
        "send_fin",
        "state",
    )

    def __init__(
        self,
        reader: FrameReader,
        buckets: tuple[TokenBucket, TokenBucket],
        *,
        ping_interval: float,
        ping_timeout: float,
        now: float,
        first_ping_in: float,
    ) -> None:
        self.state = State.OPEN
        #: The code of the close frame sent or received (None: none yet).
        self.close_code: int | None = None
        #: A FIN should follow what is queued (after a protocol error's close frame).
        self.send_fin = False
        self._reader = reader
        self._bucket, self._control_bucket = buckets
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._outgoing: list[bytes] | None = None  # made when a frame is queued
        self._closing_since = 0.0
        self._next_ping = now + first_ping_in
        self._ping_sent: float | None = None

    def _to(self, event: str) -> None:
        self.state = TRANSITIONS.get((self.state, event), self.state)

    # -- input ------------------------------------------------------------------------

    def receive(self, data: bytes | None, now: float) -> Iterator[TextReceived | BinaryReceived | RateLimited]:
        """Bytes the client sent (None: end of stream). Yields its messages for
        the endpoint; control frames are answered in :meth:`data_to_send`.
        Stops parsing when the connection closes or the client is over its rate."""
        if self.state is State.CLOSED:
            return
        self._ping_sent = None  # any byte from the peer is a sign of life
        if self.state is State.CLOSING and now - self._closing_since >= CLOSE_GRACE:
            self._to("grace_over")  # a client that keeps sending after our close
            return
        for event in self._reader.events(data):
            if not isinstance(event, (CloseReceived, ProtocolFailure)) and not self._allowed(event):
                if self.state is State.OPEN:
                    self._send_close(Disconnect.RATE_LIMIT.code, Disconnect.RATE_LIMIT.reason, now)
                    self._to("over_rate")
                    yield _RATE_LIMITED
                else:
                    self._to("over_rate")  # still flooding after our close frame: drop it
                return
            if isinstance(event, (TextReceived, BinaryReceived)):
                if self.state is State.OPEN:
                    yield event
            elif isinstance(event, PingReceived):
                self._queue(self._reader.pong(event.payload))
            elif isinstance(event, CloseReceived):
                self.close_code = event.code
                self._queue(self._reader.close(event.code))
                self._to("peer_close")
                return
            elif isinstance(event, ProtocolFailure):
                # The close frame, then a FIN; keep reading (and discarding) until the
                # client closes or the grace ends: closing with its bytes unread would
                # make the kernel reset the connection and drop the close frame.
                if self.state is State.OPEN:
                    self._send_close(event.code, event.reason, now)
                    self._to("protocol_error")
                    self.send_fin = True
            # PongReceived, FragmentReceived: counted; nothing else to do
        if data is None:
            self._to("eof")

    def _allowed(self, event: object) -> bool:
        if not self._bucket.allow():
            return False
        return not isinstance(event, (PingReceived, PongReceived)) or self._control_bucket.allow()

    # -- the server's side --------------------------------------------------------

    def close(self, code: int, reason: str, now: float) -> None:
        """Start the closing handshake with ``code`` (no-op unless OPEN)."""
        if self.state is State.OPEN:
            self._send_close(code, reason, now)
            self._to("close")

    def _send_close(self, code: int, reason: str, now: float) -> None:
        self.close_code = code
        self._queue(self._reader.close(code, reason))
        self._closing_since = now

    def tick(self, now: float, stuck_since: float | None) -> Dropped | bool:
        """Run the timers. ``stuck_since``: since when queued bytes wait for a
        peer that does not read (None: nothing queued).

        Returns:
            a :class:`Dropped` when the connection ended without a close frame,
            True when a ping was queued (the caller refreshes its heartbeats),
            else False.
        """
        if self.state is State.CLOSING and now - self._closing_since >= CLOSE_GRACE:
            self._to("grace_over")
        elif stuck_since is not None and now - stuck_since >= self._ping_timeout:
            self._to("stuck")
            return Dropped(f"websocket peer stopped reading for {self._ping_timeout:.0f} s: dropping it")
        elif self._ping_sent is not None and now - self._ping_sent >= self._ping_timeout:
            self._to("ping_unanswered")  # a dead peer cannot receive a close frame
            return Dropped(f"websocket peer did not answer a ping for {self._ping_timeout:.0f} s: dropping it")
        elif self.state is State.OPEN and self._ping_sent is None and now >= self._next_ping:
            self._queue(self._reader.ping(b"%d" % int(now * 1000)))
            self._ping_sent = now
            self._next_ping = now + self._ping_interval
            return True
        return False

    def next_deadline(self, stuck_since: float | None) -> float:
        """When :meth:`tick` must run next."""
        if self._ping_sent is not None:  # one ping at a time: wait for its answer
            deadline = self._ping_sent + self._ping_timeout
        else:
            deadline = self._next_ping
        if self.state is State.CLOSING:
            deadline = min(deadline, self._closing_since + CLOSE_GRACE)
        if stuck_since is not None:
            deadline = min(deadline, stuck_since + self._ping_timeout)
        return deadline

    def connection_lost(self) -> None:
        """The transport failed or ended (EPIPE, ECONNRESET, our own shutdown)."""
        self.state = State.CLOSED

    def data_to_send(self) -> list[bytes]:
        """Control frames to write, in order (pongs, pings, close frames)."""
        out, self._outgoing = self._outgoing, None
        return out or []

    def _queue(self, data: bytes) -> None:
        """Queue a control frame (b"": the reader had none to send, the connection closing)."""
        if not data:
            return
        if self._outgoing is None:
            self._outgoing = [data]
        else:
            self._outgoing.append(data)
