"""The envelope and command rules of docs/protocol.md, without I/O."""

import json

import pytest

from offload.core.protocol import (
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_data,
    error_text,
    parse_ascii_int,
    parse_command,
    parse_stream_id,
    reply,
    split_channel,
)
from offload.exceptions import ChannelError, ProtocolError


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"type":"ping"}', Ping()),
        ('{"type":"ping","ref":7}', Ping(ref=7)),
        ('{"type":"subscribe","channel":"room:a"}', Subscribe("room:a")),
        ('{"type":"subscribe","channel":"room:a","since":"12-3"}', Subscribe("room:a", (12, 3))),
        ('{"type":"subscribe","channel":"room:a","since":null}', Subscribe("room:a")),
        ('{"type":"unsubscribe","channel":"room:a","ref":"x"}', Unsubscribe("room:a", "x")),
        ('{"type":"publish","channel":"room:a","data":{"b": [1, 2]}}', Publish("room:a", '{"b":[1,2]}')),
        ('{"type":"publish","channel":"room:a","data":null}', Publish("room:a", "null")),
    ],
)
def test_valid_commands(text, expected):
    assert parse_command(text) == expected


@pytest.mark.parametrize(
    "text, code",
    [
        ("not json", "bad_json"),
        ("", "bad_json"),
        ("[1,2]", "bad_message"),
        ('"ping"', "bad_message"),
        ('{"channel":"room:a"}', "bad_message"),
        ('{"type":5}', "bad_message"),
        ('{"type":"dance"}', "unknown_type"),
        ('{"type":"subscribe"}', "bad_message"),
        ('{"type":"subscribe","channel":"nocolon"}', "invalid_channel"),
        ('{"type":"subscribe","channel":7}', "invalid_channel"),
        ('{"type":"subscribe","channel":"room:a","since":"yesterday"}', "invalid_since"),
        ('{"type":"subscribe","channel":"room:a","since":12}', "invalid_since"),
        ('{"type":"publish","channel":"room:a"}', "bad_message"),
        ('{"type":"publish","channel":"room:a","data":NaN}', "bad_message"),
        ('{"type":"ping","ref":{"a":1}}', "bad_message"),
        ('{"type":"ping","ref":true}', "bad_message"),
        ("[" * 100000, "bad_json"),
        ('{"type":"subscribe","channel":"room:a","since":"18446744073709551616-0"}', "invalid_since"),
        ('{"type":"subscribe","channel":"room:a","since":"1-18446744073709551616"}', "invalid_since"),
    ],
)
def test_invalid_commands_have_stable_codes(text, code):
    with pytest.raises((ProtocolError, ChannelError)) as info:
        parse_command(text)
    assert info.value.code == code
    assert info.value.reason


def test_publish_data_size_limit_counts_utf8_bytes():
    parse_command('{"type":"publish","channel":"room:a","data":"ééé"}', max_data_bytes=8)
    with pytest.raises(ProtocolError) as info:
        parse_command('{"type":"publish","channel":"room:a","data":"éééé"}', max_data_bytes=8)
    assert info.value.code == "message_too_large"


@pytest.mark.parametrize("channel", ["room:general", "user:42", "a:b", "x_y-z:a.b@c=d", "n" * 32 + ":" + "m" * 128])
def test_valid_channel_names(channel):
    namespace, name = split_channel(channel)
    assert f"{namespace}:{name}" == channel


@pytest.mark.parametrize(
    "channel",
    ["", "room", ":a", "room:", "ro om:a", "room:a b", "room:a:b", "n" * 33 + ":a", "a:" + "m" * 129, "é:a", None],
)
def test_invalid_channel_names(channel):
    with pytest.raises(ChannelError):
        split_channel(channel)


def test_stream_ids_compare_numerically_not_as_strings():
    assert parse_stream_id("10-0") > parse_stream_id("9-5")
    assert parse_stream_id("5-10") > parse_stream_id("5-9")
    for bad in ("10", "a-b", "1-2-3", "-1-0", " 1-0", "1-0 "):
        with pytest.raises(ProtocolError):
            parse_stream_id(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "\u0661\u0662\u0663-0",  # Arabic-Indic digits: \d matches them and int() reads 123
        "1-\u0660",
        "\uff11\uff12-0",  # fullwidth digits
        "²-0",  # '²'.isdigit() is True, int('²') raises
        "1-³",
        "+1-0",
        "1_0-0",  # int() takes underscores
        "1-0\n",
    ],
)
def test_stream_ids_are_ascii_digits_only(bad):
    with pytest.raises(ProtocolError) as info:
        parse_stream_id(bad)
    assert info.value.code == "invalid_since"
    with pytest.raises(ProtocolError):
        parse_command(json.dumps({"type": "subscribe", "channel": "room:a", "since": bad}))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("10485760", 10485760),
        ("007", 7),
        ("9" * 20, int("9" * 20)),
        ("9" * 21, None),  # longer than max_digits
        ("", None),
        ("²", None),
        ("\u0661\u0662", None),
        ("\uff11\uff12", None),
        (" 12", None),
        ("12 ", None),
        ("+12", None),
        ("-1", None),
        ("1_000", None),
        ("0x10", None),
        ("1e3", None),
        (12, None),  # only text is parsed
        (None, None),
    ],
)
def test_parse_ascii_int_takes_ascii_digits_and_nothing_else(text, expected):
    assert parse_ascii_int(text) == expected


def test_parse_ascii_int_bounds_the_digits():
    assert parse_ascii_int("123", max_digits=3) == 123
    assert parse_ascii_int("1234", max_digits=3) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","ref":NaN}',
        '{"type":"ping","ref":Infinity}',
        '{"type":"ping","ref":-Infinity}',
        '{"type":"ping","ref":1e999}',  # overflows to infinity
        '{"type":"publish","channel":"room:a","data":[1e999]}',
    ],
)
def test_non_finite_numbers_are_refused_so_no_reply_carries_them(text):
    """json.loads takes NaN, Infinity and 1e999 (as inf); a ref echoed back as
    NaN made the client's JSON.parse throw."""
    with pytest.raises(ProtocolError) as info:
        parse_command(text)
    assert info.value.code == "bad_message"


def test_finite_floats_still_parse():
    assert parse_command('{"type":"ping","ref":1.5e3}') == Ping(ref=1500.0)


def test_message_envelopes_splice_preencoded_json():
    from offload.core.cursor import make_entry

    entry = make_entry(json.dumps("room:a").encode(), b"5-1", '{"x":"é"}'.encode())
    assert entry.id == (5, 1)
    assert json.loads(entry.text) == {"type": "message", "channel": "room:a", "id": "5-1", "data": {"x": "é"}}


def test_entries_are_framed_once_with_the_right_length_encoding():
    from offload.core.cursor import make_entry

    for size in (10, 200, 70000):
        data = json.dumps("x" * size).encode()
        sid, text, frame = make_entry(b'"room:a"', b"7-2", data)
        assert sid == (7, 2) and json.loads(text)["data"] == "x" * size
        assert frame.endswith(text) and frame[0] == 0x81
        header = frame[: len(frame) - len(text)]
        assert len(header) == (2 if len(text) < 126 else 4 if len(text) < 65536 else 10)


def test_replies_carry_ref_only_when_given():
    assert json.loads(reply("pong")) == {"type": "pong"}
    assert json.loads(reply("pong", "r1")) == {"type": "pong", "ref": "r1"}
    err = json.loads(error_text("forbidden", "no", 3, "user:1"))
    assert err == {"type": "error", "code": "forbidden", "reason": "no", "ref": 3, "channel": "user:1"}


def test_encode_data_is_compact_and_refuses_non_json():
    assert encode_data({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for bad in (object(), float("nan"), {1j: 2}, deep):
        with pytest.raises(ProtocolError):
            encode_data(bad)
