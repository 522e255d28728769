"""The websocket protocol state machine, with the time passed in: no socket, no clock."""

from __future__ import annotations

import struct

from offload.core.frames import FrameReader, TextReceived
from offload.core.rates import TokenBucket
from offload.core.websocket_protocol import CLOSE_GRACE, TRANSITIONS, Dropped, RateLimited, State, WebSocketProtocol
from tests.test_frames import frame

INTERVAL, TIMEOUT = 20.0, 10.0


def protocol(now=0.0, first_ping_in=INTERVAL, rate=(50, 100), control=(5, 10)):
    clock = [now]
    buckets = (
        TokenBucket(*rate, clock=lambda: clock[0]),
        TokenBucket(*control, clock=lambda: clock[0]),
    )
    p = WebSocketProtocol(
        FrameReader(1000), buckets, ping_interval=INTERVAL, ping_timeout=TIMEOUT, now=now, first_ping_in=first_ping_in
    )
    return p, clock


def close_code(data: bytes) -> int:
    assert data[0] == 0x88
    return struct.unpack("!H", data[2:4])[0]


def test_pings_at_the_interval_and_a_silent_peer_is_dropped_after_the_timeout():
    p, _ = protocol(first_ping_in=12.0)
    assert p.next_deadline(None) == 12.0
    assert p.tick(11.9, None) is False and p.data_to_send() == []
    assert p.tick(12.0, None) is True
    assert p.data_to_send()[0][0] == 0x89, "a ping"
    assert p.next_deadline(None) == 12.0 + TIMEOUT, "one ping at a time: wait for its answer"
    dropped = p.tick(12.0 + TIMEOUT, None)
    assert isinstance(dropped, Dropped) and "did not answer a ping" in dropped.why
    assert p.state is State.CLOSED and p.data_to_send() == [], "a dead peer gets no close frame"


def test_any_bytes_from_the_peer_count_as_an_answer():
    p, _ = protocol(first_ping_in=1.0)
    p.tick(1.0, None)
    list(p.receive(frame(10, b""), 5.0))  # a pong (any frame would do)
    assert p.tick(1.0 + TIMEOUT, None) is False and p.state is State.OPEN
    assert p.next_deadline(None) == 1.0 + INTERVAL


def test_a_peer_whose_queue_stays_stuck_is_dropped():
    p, _ = protocol()
    assert p.next_deadline(3.0) == 3.0 + TIMEOUT
    dropped = p.tick(3.0 + TIMEOUT, 3.0)
    assert isinstance(dropped, Dropped) and "stopped reading" in dropped.why


def test_our_close_waits_for_the_peers_answer_for_the_grace_period():
    p, _ = protocol()
    p.close(1001, "bye", now=5.0)
    assert p.state is State.CLOSING and close_code(p.data_to_send()[0]) == 1001
    assert p.next_deadline(None) == 5.0 + CLOSE_GRACE
    p.tick(5.0 + CLOSE_GRACE - 0.1, None)
    assert p.state is State.CLOSING
    p.tick(5.0 + CLOSE_GRACE, None)
    assert p.state is State.CLOSED


def test_the_peers_close_is_echoed_and_ends_the_connection():
    p, _ = protocol()
    assert list(p.receive(frame(8, struct.pack("!H", 1000)), 1.0)) == []
    assert p.state is State.CLOSED and close_code(p.data_to_send()[0]) == 1000


def test_messages_go_to_the_endpoint_and_pings_are_answered_in_order():
    p, _ = protocol()
    events = list(p.receive(frame(1, b"a") + frame(9, b"x") + frame(1, b"b"), 1.0))
    assert events == [TextReceived("a"), TextReceived("b")]
    assert p.data_to_send() == [b"\x8a\x01x"]


def test_every_frame_counts_and_a_flooder_is_closed_then_dropped():
    p, clock = protocol(rate=(50, 100), control=(5, 10))
    events = list(p.receive(b"".join(frame(9, b"") for _ in range(1000)), clock[0]))
    assert events == [RateLimited()]
    sent = p.data_to_send()
    assert len(sent) == 11 and close_code(sent[-1]) == 1008, "ten pongs, then the close"
    assert p.state is State.CLOSING
    assert list(p.receive(frame(9, b""), clock[0])) == []
    assert p.state is State.CLOSED, "still flooding after our close frame: dropped"


def test_fragments_count_against_the_bucket_like_whole_messages():
    p, clock = protocol(rate=(50, 5))
    data = frame(1, b"a", fin=False) + b"".join(frame(0, b"a", fin=False) for _ in range(10))
    assert list(p.receive(data, clock[0])) == [RateLimited()]
    clock[0] += 1.0  # the bucket refills over time, and the protocol does not read the clock itself
    assert p.state is State.CLOSING


def test_a_protocol_error_closes_with_its_code_then_a_fin():
    p, _ = protocol()
    assert list(p.receive(frame(1, b"\xff"), 1.0)) == []
    assert p.state is State.CLOSING and close_code(p.data_to_send()[0]) == 1007 and p.send_fin


def test_the_transition_table_is_what_the_states_follow():
    assert TRANSITIONS[(State.OPEN, "close")] is State.CLOSING
    assert all(after is State.CLOSED for (before, _), after in TRANSITIONS.items() if before is State.CLOSING)
    assert not any(before is State.CLOSED for before, _ in TRANSITIONS), "CLOSED is final"
