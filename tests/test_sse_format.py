"""The SSE wire format, byte for byte: events, the resume id, and a stream's output (no I/O)."""

import subprocess
import sys

import pytest

from offload.core.cursor import Entry
from offload.core.sse_format import PING, RETRY, format_event, format_resume_id, parse_resume_id, resume_positions
from offload.exceptions import ProtocolError

ENVELOPE = '{"type":"message","channel":"public:a","id":"1732-0","data":{"n":1}}'


def test_a_message_event_is_id_event_and_one_data_line():
    assert format_event(ENVELOPE.encode(), event="message", event_id="public:a=1732-0") == (
        b"id: public:a=1732-0\n"
        b"event: message\n"
        b'data: {"type":"message","channel":"public:a","id":"1732-0","data":{"n":1}}\n'
        b"\n"
    )


def test_fields_are_optional_and_constants_are_exact():
    assert format_event("x") == format_event(b"x") == b"data: x\n\n"
    assert format_event("", event="ping") == b"event: ping\ndata: \n\n"
    assert RETRY == b"retry: 2000\n\n"
    assert PING == b": ping\n\n"


def test_only_cr_and_lf_split_data_lines():
    assert format_event("a\nb\r\nc\rd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    # JSON with ensure_ascii=False may carry these raw; they are not SSE line breaks.
    odd = '"a\u2028b\u2029c\x85d\x0be"'
    assert format_event(odd) == b"data: " + odd.encode() + b"\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_an_id_or_event_with_a_line_break_or_nul_is_refused(bad):
    with pytest.raises(ValueError):
        format_event("x", event_id=bad)
    with pytest.raises(ValueError):
        format_event("x", event=bad)


def test_resume_id_lists_every_positioned_channel():
    assert format_resume_id([("public:a", (1732, 0)), ("room:b", (1733, 5))]) == "public:a=1732-0,room:b=1733-5"
    assert format_resume_id([]) == ""


@pytest.mark.parametrize(
    "value, expected",
    [
        ("public:a=1732-0,room:b=1733-5", {"public:a": (1732, 0), "room:b": (1733, 5)}),
        ("room:x=y=5-1", {"room:x=y": (5, 1)}),  # '=' is legal in names, never in ids
        ("  public:a=0-0  ", {"public:a": (0, 0)}),
        ("", {}),
        ("   ", {}),
    ],
)
def test_parse_resume_id(value, expected):
    assert parse_resume_id(value) == expected


@pytest.mark.parametrize(
    "value",
    ["1732-0", "public:a", "public:a=", "public:a=later", "public:a=1-0,", "bad name=1-0", "public:a=1-0;room:b=2-0"],
)
def test_a_malformed_resume_id_is_invalid_since(value):
    with pytest.raises(ProtocolError) as info:
        parse_resume_id(value)
    assert info.value.code == "invalid_since"


@pytest.mark.parametrize(
    "value",
    [
        "public:a=\u0661\u0662\u0663-0",  # Arabic-Indic digits read as 123 through \d and int()
        "public:a=1-²",
        "public:a=\uff11-0",
        "\xa0public:a=1-0",  # NBSP (Latin-1 header byte A0): str.strip() took it
        "public:a=1-0\x85",  # NEL, the same
    ],
)
def test_a_resume_id_takes_only_ascii_digits_and_http_blanks(value):
    with pytest.raises(ProtocolError) as info:
        parse_resume_id(value)
    assert info.value.code == "invalid_since"


@pytest.mark.parametrize("since", ["\u0661\u0662\u0663-0", "²-0", "1-\u0663", "+1-0"])
def test_since_takes_only_ascii_digits(since):
    with pytest.raises(ProtocolError) as info:
        resume_positions(["public:a"], since=since)
    assert info.value.code == "invalid_since"


def test_resume_id_round_trips():
    positions = {"public:a": (1, 2), "room:x=y": (3, 4), "user:7": (5, 0)}
    assert parse_resume_id(format_resume_id(positions.items())) == positions


def test_last_event_id_beats_since_channel_by_channel():
    channels = ["public:a", "public:b", "public:c"]
    assert resume_positions(channels) == {}
    assert resume_positions(channels, since="9-0") == dict.fromkeys(channels, (9, 0))
    assert resume_positions(channels, since="9-0", last_event_id="public:a=12-0,other:z=1-0") == {
        "public:a": (12, 0),
        "public:b": (9, 0),
        "public:c": (9, 0),
    }
    assert resume_positions(channels, last_event_id="public:b=3-1") == {"public:b": (3, 1)}


@pytest.mark.parametrize("since, last", [("zz", None), (None, "public:a=zz"), ("", None)])
def test_malformed_positions_are_invalid_since(since, last):
    with pytest.raises(ProtocolError) as info:
        resume_positions(["public:a"], since=since, last_event_id=last)
    assert info.value.code == "invalid_since"


def test_the_wire_format_imports_no_gevent_uwsgi_redis_or_django():
    code = (
        "import sys, offload.core.sse_format; "
        "print(sorted(m for m in ('gevent', 'redis', 'django', 'uwsgi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- a stream's output, with a recording hub (no Redis, no uWSGI) ----------------


class RecordingHub:
    def __init__(self):
        self.subscribed = []

    def subscribe(self, subscriber, channel):
        self.subscribed.append(channel)

    def unsubscribe(self, subscriber, channel):
        self.subscribed.remove(channel)


@pytest.fixture
def stream(settings):
    from offload.transports.sse import SseStream

    settings.OFFLOAD_MAX_QUEUED_BYTES = 36  # three of the 12-byte events below
    stream = SseStream(["public:a", "room:b"], {"room:b": (5, 0)}, RecordingHub())
    stream.start(now=0.0)
    return stream


def live(stream, channel, *ms):
    """The hub delivers a batch of messages (cursor made LIVE first)."""
    stream.cursors[channel].history([], None)
    entries = [Entry((n, 0), b'{"id":"%d-0"}' % n, b"<websocket frame>") for n in ms]
    stream.session.deliver(channel, entries, b"".join(entry.frame for entry in entries))


def test_each_event_carries_the_positions_written_so_far(stream):
    live(stream, "public:a", 7)
    live(stream, "room:b", 6)
    live(stream, "public:a", 8)
    assert stream._drain() == (
        b'id: public:a=7-0,room:b=5-0\nevent: message\ndata: {"id":"7-0"}\n\n'
        b'id: public:a=7-0,room:b=6-0\nevent: message\ndata: {"id":"6-0"}\n\n'
        b'id: public:a=8-0,room:b=6-0\nevent: message\ndata: {"id":"8-0"}\n\n'
    )
    assert stream._drain() == b""


def test_duplicates_are_dropped_and_overflow_ends_the_stream(stream):
    live(stream, "public:a", 7)
    live(stream, "public:a", 6, 7, 8)  # a batch that overlaps: only 8 is new
    live(stream, "public:a", 9)
    assert [item[1] for item in stream._outbox] == [(7, 0), (8, 0), (9, 0)]  # the limit: 36 bytes queued
    assert stream.ended is None
    live(stream, "public:a", 10)
    assert stream.ended == "slow consumer" and stream._drain() == b""


def test_close_ends_the_stream_once(stream):
    stream.close("server restart")
    stream.close("later")
    assert stream.ended == "server restart"
