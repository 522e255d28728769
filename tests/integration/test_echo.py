"""/ws/echo and the strict receive path, with frames crafted by hand."""

from __future__ import annotations

import struct
import time

import pytest
from wsproto.events import Pong

from offload.testing import RawFrame, frame

pytestmark = pytest.mark.timeout(60)


def test_echo_keeps_text_and_binary_apart(offload_server):
    ws = offload_server.ws_client("/ws/echo")
    ws.send_text("héllo")
    assert ws.recv() == "héllo"
    ws.send_bytes(b"\x00\xffbin")
    assert ws.recv() == b"\x00\xffbin"
    ws.close()


def test_fragmented_messages_on_two_sockets_at_once_do_not_mix(offload_server):
    a, b = offload_server.ws_client("/ws/echo"), offload_server.ws_client("/ws/echo")
    a.send_raw(frame(1, b"aa", fin=False))
    b.send_raw(frame(2, b"bb", fin=False))
    a.send_raw(frame(0, b"AA", fin=False))
    b.send_raw(frame(0, b"BB"))
    a.send_raw(frame(0, b"!"))
    assert a.recv_frame() == RawFrame(1, b"aaAA!")  # one final, unmasked frame
    assert b.recv_frame() == RawFrame(2, b"bbBB")
    a.abort()
    b.abort()


def test_ping_payload_is_echoed_in_the_pong(offload_server):
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    ws.ping(b"are you there")
    while not isinstance(event := ws.recv_event(), Pong):  # the server may send its own ping first
        pass
    assert event.payload == b"are you there"
    ws.abort()


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
    bystander = offload_server.ws_client("/ws/echo")
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    for opcode, payload, fin in frames:
        ws.send_raw(frame(opcode, payload, fin))
    assert ws.recv_close().code == code
    assert ws.wait_eof(5)  # closed by the server without waiting for our close
    bystander.send_text("still here")
    assert bystander.recv() == "still here"
    assert offload_server.worker_pids() == pids
    bystander.close()


def test_unmasked_client_frame_is_a_protocol_error(offload_server):
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    ws.send_raw(frame(1, b"hi", mask=False))
    assert ws.recv_close().code == 1002
    ws.abort()


def test_close_handshake_echoes_the_code(offload_server):
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    ws.send_raw(frame(8, struct.pack("!H", 1000) + b"bye"))
    assert ws.recv_close().code == 1000
    assert ws.wait_eof(5)


def test_dead_peer_is_dropped_after_the_ping_timeout(offload_server):
    # The test server pings every 1 s and allows 2 s for an answer.
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    started = time.monotonic()
    assert ws.wait_eof(10)  # never answers: reads only, so the pings go unanswered
    assert 2 <= time.monotonic() - started < 8


def test_a_client_that_answers_pings_stays_connected(offload_server):
    ws = offload_server.ws_client("/ws/echo", auto_reply=False)
    pings = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            raw = ws.recv_frame(timeout=0.2)
        except TimeoutError:
            continue
        assert raw.opcode == 9
        pings += 1
        ws.send_raw(frame(10, raw.payload))
    assert pings >= 3
    ws.send_raw(frame(1, b"alive"))
    assert ws.recv_frame() == RawFrame(1, b"alive")
    ws.abort()
