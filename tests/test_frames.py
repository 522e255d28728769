"""Client frames through wsproto, byte by byte (no sockets)."""

import struct

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import Ping

from offload.core.frames import (
    BinaryReceived,
    CloseReceived,
    FragmentReceived,
    FrameReader,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    TextReceived,
)
from offload.testing import frame  # a client frame, built by hand (any bytes, valid or not)


def feed_all(reader, data, step=None):
    out = []
    if step is None:
        return reader.feed(data)
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [None, 1, 3])
def test_fragmented_text_is_reassembled_even_byte_by_byte(step):
    data = frame(1, "hé".encode()[:2], fin=False) + frame(0, "hé".encode()[2:] + b"llo")
    # Each non-final frame is reported too: the connection counts every frame against its rate limit.
    assert feed_all(FrameReader(100), data, step) == [FragmentReceived(), TextReceived("héllo")]


def test_text_and_binary_are_kept_apart():
    out = FrameReader(100).feed(frame(1, b"a") + frame(2, b"\x00\xff"))
    assert out == [TextReceived("a"), BinaryReceived(b"\x00\xff")]


def test_ping_between_fragments_and_pong_echoes_payload():
    reader = FrameReader(100)
    out = reader.feed(frame(1, b"ab", fin=False) + frame(9, b"xyz") + frame(0, b"c"))
    assert out == [FragmentReceived(), PingReceived(b"xyz"), TextReceived("abc")]
    assert reader.pong(b"xyz") == b"\x8a\x03xyz"


@pytest.mark.parametrize(
    "data, code",
    [
        (frame(0, b"stray"), 1002),  # continuation with nothing to continue
        (frame(1, b"a", fin=False) + frame(1, b"b"), 1002),  # new message inside a fragmented one
        (frame(1, b"a", rsv=4), 1002),  # reserved bit without an extension
        (frame(3, b""), 1002),  # reserved opcode
        (frame(9, b"x" * 126), 1002),  # control frame too long
        (frame(9, b"x", fin=False), 1002),  # fragmented control frame
        (frame(1, b"a", mask=False), 1002),  # unmasked client frame
        (frame(1, b"\xff\xfe"), 1007),  # invalid UTF-8
        (frame(1, b"\xc3", fin=False) + frame(0, b"\x28"), 1007),  # invalid UTF-8 across fragments
        (frame(8, struct.pack("!H", 999)), 1002),  # invalid close code
        (frame(2, b"x" * 101), 1009),  # too big in one frame
        (frame(2, b"x" * 60, fin=False) + frame(0, b"x" * 60), 1009),  # too big across fragments
        (b"GET / HTTP/1.1\r\n\r\n", 1002),  # garbage
    ],
)
def test_protocol_violations_fail_with_the_right_close_code(data, code):
    reader = FrameReader(100)
    out = reader.feed(data)
    assert isinstance(out[-1], ProtocolFailure), out
    assert out[-1].code == code
    assert reader.failed and reader.feed(frame(1, b"more")) == []


def test_oversize_message_fails_before_it_is_complete():
    reader = FrameReader(100)
    header_and_part = frame(2, b"x" * 1000)[:200]  # the frame is far from complete
    assert reader.feed(header_and_part)[-1] == ProtocolFailure(1009, "message larger than 100 bytes")


def test_close_frame_is_answered_with_its_code():
    reader = FrameReader(100)
    assert reader.feed(frame(8, struct.pack("!H", 1001) + b"bye")) == [CloseReceived(1001, "bye")]
    assert reader.close(1001) == b"\x88\x02\x03\xe9"
    assert reader.close(1000) == b""  # only one close frame per connection


def test_end_of_stream_is_an_abnormal_close():
    assert FrameReader(100).feed(None) == [CloseReceived(1006, "")]


def test_truncated_frame_waits_for_more_bytes():
    reader = FrameReader(100)
    data = frame(1, b"hello")
    assert reader.feed(data[:-1]) == []
    assert reader.feed(data[-1:]) == [TextReceived("hello")]


def test_every_frame_is_an_event_and_parsing_stops_when_the_caller_does():
    reader = FrameReader(100)
    data = frame(1, b"a", fin=False) + frame(0, b"b", fin=False) + frame(0, b"c") + frame(10, b"") + frame(9, b"")
    kinds = [type(event).__name__ for event in reader.feed(data)]
    assert kinds == ["FragmentReceived", "FragmentReceived", "TextReceived", "PongReceived", "PingReceived"]
    flood = b"".join(frame(9, b"p") for _ in range(1000))
    events = reader.events(flood)
    taken = [next(events) for _ in range(3)]
    assert taken == [PingReceived(b"p")] * 3
    events.close()
    # The rest stayed unparsed in the buffer: the next read continues where the caller stopped.
    assert len(reader.feed(b"")) == 997


def test_the_parser_is_held_only_while_a_frame_or_message_is_incomplete():
    """Most sockets only send pongs: their wsproto connection exists while client bytes are being parsed,
    and the server's pings without it are the bytes wsproto writes."""
    reader = FrameReader(100)
    for payload in (b"", b"1712345678901", b"x" * 125):
        assert reader.ping(payload) == Connection(ConnectionType.SERVER).send(Ping(payload=payload))
    assert reader._conn is None and not reader.closing

    assert reader.feed(frame(10, b"1712345678901")) == [PongReceived(b"1712345678901")]
    assert reader._conn is None, "a whole frame parsed: nothing to keep"
    data = frame(1, b"hello")
    assert reader.feed(data[:3]) == [] and reader._conn is not None, "a partial frame keeps it"
    assert reader.feed(data[3:]) == [TextReceived("hello")] and reader._conn is None

    # A fragmented message, a ping between its fragments, its UTF-8 split across them.
    assert reader.feed(frame(1, "é".encode()[:1], fin=False) + frame(9, b"p")) == [
        FragmentReceived(),
        PingReceived(b"p"),
    ]
    assert reader._conn is not None, "a fragmented message keeps it"
    assert reader.pong(b"p") == b"\x8a\x01p"
    assert reader.feed(frame(0, "é".encode()[1:])) == [TextReceived("é")] and reader._conn is None


def test_a_fresh_parser_still_refuses_a_stray_continuation_and_bad_utf8():
    reader = FrameReader(100)
    assert reader.feed(frame(1, b"ok")) == [TextReceived("ok")] and reader._conn is None
    (failure,) = reader.feed(frame(0, b"stray"))
    assert isinstance(failure, ProtocolFailure) and failure.code == 1002
    reader = FrameReader(100)
    assert reader.feed(frame(1, b"ok")) == [TextReceived("ok")]
    (failure,) = reader.feed(frame(1, b"\xff"))
    assert isinstance(failure, ProtocolFailure) and failure.code == 1007


def test_a_close_before_any_client_byte_is_sent_once():
    reader = FrameReader(100)
    first = reader.close(1001, "going away")
    assert first[:4] == b"\x88\x0c\x03\xe9" and reader.closing
    assert reader.close(1001) == b"" and reader.ping() == b""


def test_a_whole_message_and_a_fragmented_one_alternate():
    reader = FrameReader(100)
    data = frame(1, b"one") + frame(2, b"a", fin=False) + frame(0, b"b") + frame(1, b"two")
    assert reader.feed(data) == [TextReceived("one"), FragmentReceived(), BinaryReceived(b"ab"), TextReceived("two")]
