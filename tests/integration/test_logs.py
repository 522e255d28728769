"""Structured logs on the real server: OFFLOAD_LOG_FORMAT=json, one client's story by its connection id.

uWSGI with ``OFFLOAD_LOG_FORMAT=json`` (and the offload loggers at DEBUG, for
the open and close lines): alice opens a websocket and closes it, an anonymous
client floods pings and is closed for it, bob reads an event stream and goes;
each connection's lines are found by its ``connection_id`` alone, in order,
with its ``user_id``.
"""

from __future__ import annotations

import json

import pytest
from wsproto.events import CloseConnection

from offload.testing import frame, wait_for
from tests.integration.demo import serve_demo
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, "logs-var", {"OFFLOAD_LOG_FORMAT": "json", "OFFLOAD_LOG_LEVEL": "DEBUG"})


def json_lines(server) -> list[dict]:
    """The log's JSON lines: Python's (uWSGI's own lines, its request log included, keep uWSGI's format)."""
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith('{"ts": ')]


def story(server, connection_id: str) -> list[dict]:
    return [line for line in json_lines(server) if line.get("connection_id") == connection_id]


def opened(server, user_id) -> list[dict]:
    return [line for line in json_lines(server) if line["msg"] == "websocket open" and line["user_id"] == user_id]


def test_one_connection_is_followed_by_its_id(server):
    session = server.http()
    session.login("alice")
    ws = server.ws_client("/ws/?channel=public:logs", cookie=session.cookie_header())
    assert json.loads(ws.recv())["type"] == "subscribed"
    [line] = wait_for(lambda: [line for line in json_lines(server) if line["msg"] == "websocket open"], 10, "open")
    alice, connection_id = line["user_id"], line["connection_id"]
    assert isinstance(alice, int) and len(connection_id) == 16
    assert line["logger"] == "offload.transports.connection" and line["level"] == "DEBUG"
    ws.close()
    lines = wait_for(lambda: (s := story(server, connection_id)) and len(s) >= 2 and s, 10, "alice's close line")
    assert [line["msg"] for line in lines] == ["websocket open", "websocket closed (code 1000)"]
    assert {line["user_id"] for line in lines} == {alice}
    assert all(line["pid"] == lines[0]["pid"] for line in lines)

    flooder = server.ws_client("/ws/echo", auto_reply=False)
    [anonymous] = wait_for(lambda: opened(server, None), 10, "the anonymous socket's open line")
    flooder.send_raw(b"".join(frame(9, b"") for _ in range(200)))
    while not isinstance(flooder.recv_event(), CloseConnection):
        pass
    flooder.abort()
    lines = wait_for(
        lambda: (s := story(server, anonymous["connection_id"]))[-1]["msg"].startswith("websocket closed") and s,
        10,
        "the flooder's close line",
    )
    assert anonymous["connection_id"] != connection_id
    messages = [line["msg"] for line in lines]
    assert messages[0] == "websocket open" and messages[-1].startswith("websocket closed")
    assert any("faster than its rate limit: closing it with 1008" in message for message in messages), messages
    assert {line["user_id"] for line in lines} == {None}


def test_an_event_stream_is_followed_by_its_id_too(server):
    session = server.http()
    session.login("bob")
    stream = SseClient(server, "/sse/?channel=public:logs-sse", headers={"Cookie": session.cookie_header()})
    assert "public:logs-sse" in stream.subscribed()
    [line] = wait_for(lambda: [line for line in json_lines(server) if line["msg"] == "sse stream open"], 10, "open")
    bob, connection_id = line["user_id"], line["connection_id"]
    assert isinstance(bob, int) and line["logger"] == "offload.transports.sse"
    server.publish("public:logs-sse", "hello")
    assert stream.message()["data"] == "hello"
    stream.close()  # the client goes: the server sees EOF and ends the stream
    lines = wait_for(
        lambda: (s := story(server, connection_id))[-1]["msg"].startswith("sse stream ended") and s,
        10,
        "bob's stream's end line",
    )
    assert lines[0]["msg"] == "sse stream open" and lines[-1]["msg"] == "sse stream ended: client closed"
    assert {line["user_id"] for line in lines} == {bob}
