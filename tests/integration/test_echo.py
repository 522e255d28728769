"""/ws/echo and the strict receive path, with frames crafted by hand."""

from __future__ import annotations

import select
import struct
import time

import pytest

from tests.integration.rawws import RawWebSocket

pytestmark = pytest.mark.timeout(60)


def test_echo_keeps_text_and_binary_apart(offload_server):
    ws = offload_server.websocket("/ws/echo")
    ws.send("héllo")
    assert ws.recv() == "héllo"
    ws.send_binary(b"\x00\xffbin")
    assert ws.recv() == b"\x00\xffbin"
    ws.close()


def test_fragmented_messages_on_two_sockets_at_once_do_not_mix(offload_server):
    a, b = RawWebSocket(offload_server.port), RawWebSocket(offload_server.port)
    a.send_frame(1, b"aa", fin=False)
    b.send_frame(2, b"bb", fin=False)
    a.send_frame(0, b"AA", fin=False)
    b.send_frame(0, b"BB")
    a.send_frame(0, b"!")
    assert a.read_frame() == (1, b"aaAA!")
    assert b.read_frame() == (2, b"bbBB")
    a.close()
    b.close()


def test_ping_payload_is_echoed_in_the_pong(offload_server):
    ws = RawWebSocket(offload_server.port)
    ws.send_frame(9, b"are you there")
    while True:  # the server may send its own ping first
        opcode, payload = ws.read_frame()
        if opcode == 10:
            break
    assert payload == b"are you there"
    ws.close()


@pytest.mark.parametrize(
    "frames, code",
    [
        ([(0, b"stray", True)], 1002),
        ([(1, b"\xff\xfe", True)], 1007),
        ([(1, b"\xc3", False), (0, b"\x28", True)], 1007),
        ([(3, b"", True)], 1002),
        ([(2, b"x" * (64 * 1024 + 1), True)], 1009),
    ],
)
def test_bad_frames_close_with_the_right_code_and_the_worker_survives(offload_server, frames, code):
    pids = offload_server.worker_pids()
    bystander = offload_server.websocket("/ws/echo")
    ws = RawWebSocket(offload_server.port)
    for opcode, payload, fin in frames:
        ws.send_frame(opcode, payload, fin)
    assert ws.read_until_close() == code
    assert ws.at_eof(5)
    bystander.send("still here")
    assert bystander.recv() == "still here"
    assert offload_server.worker_pids() == pids
    bystander.close()


def test_unmasked_client_frame_is_a_protocol_error(offload_server):
    ws = RawWebSocket(offload_server.port)
    ws.send_frame(1, b"hi", mask=False)
    assert ws.read_until_close() == 1002


def test_close_handshake_echoes_the_code(offload_server):
    ws = RawWebSocket(offload_server.port)
    ws.send_frame(8, struct.pack("!H", 1000) + b"bye")
    assert ws.read_until_close() == 1000
    assert ws.at_eof(5)


def test_dead_peer_is_dropped_after_the_ping_timeout(offload_server):
    # The test server pings every 1 s and allows 2 s for an answer.
    ws = RawWebSocket(offload_server.port)
    started = time.monotonic()
    assert ws.at_eof(10)  # never answers: reads only, so the pings go unanswered
    assert 2 <= time.monotonic() - started < 8


def test_a_client_that_answers_pings_stays_connected(offload_server):
    ws = RawWebSocket(offload_server.port)
    pings = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not ws.buffer and not select.select([ws.sock], [], [], 0.2)[0]:
            continue
        opcode, payload = ws.read_frame()
        assert opcode == 9
        pings += 1
        ws.send_frame(10, payload)
    assert pings >= 3
    ws.send_frame(1, b"alive")
    assert ws.read_frame() == (1, b"alive")
    ws.close()
