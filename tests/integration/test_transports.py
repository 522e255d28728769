"""What websockets and event streams share, run on both against the real uWSGI.

Both transports carry one ``offload.core.session.ChannelSession``: the same
cases (resume with no gap and no duplicate, from-now subscriptions, refusals,
resume positions that fell out of history) run once per transport through
one small client interface.
"""

from __future__ import annotations

import json

import pytest

from offload.testing import LiveServer
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(60)


class WebSocketChannels:
    """The channels of one websocket, read through the interface the tests share."""

    def __init__(self, server: LiveServer, channel: str, since: str | None, cookie: str | None) -> None:
        query = f"channel={channel}" + (f"&since={since}" if since else "")
        self.ws = server.websocket(f"/ws/?{query}", cookie=cookie)

    def subscribed(self) -> dict:
        reply = json.loads(self.ws.recv())
        if reply["type"] == "error":
            return {"refused": reply["code"]}
        assert reply["type"] == "subscribed", reply
        return reply

    def message(self) -> dict:
        return json.loads(self.ws.recv())

    def close(self) -> None:
        self.ws.close()


class EventStreamChannels:
    """The channels of one event stream, read through the same interface."""

    def __init__(self, server: LiveServer, channel: str, since: str | None, cookie: str | None) -> None:
        query = f"channel={channel}" + (f"&since={since}" if since else "")
        self.stream = SseClient(server, f"/sse/?{query}", {"Cookie": cookie} if cookie else None)

    def subscribed(self) -> dict:
        if self.stream.status != 200:
            return {"refused": self.stream.json()["error"]}
        return next(iter(self.stream.subscribed().values()))

    def message(self) -> dict:
        return self.stream.message()

    def close(self) -> None:
        self.stream.close()


@pytest.fixture(params=[WebSocketChannels, EventStreamChannels], ids=["websocket", "sse"])
def transport(request):
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("transports-var")).prepare().start()
    yield live
    live.stop()


def test_a_resume_gets_what_it_missed_then_live_messages_once_each(server, transport, request):
    channel = f"public:resume-{request.node.callspec.id}"
    ids = [server.publish(channel, {"n": n}) for n in range(5)]
    client = transport(server, channel, ids[1], None)
    try:
        reply = client.subscribed()
        assert reply["recovered"] is True and reply["last_id"] == ids[1]
        live = server.publish(channel, {"n": 5})
        got = [client.message()["id"] for _ in range(4)]
        assert got == [*ids[2:], live]
    finally:
        client.close()


def test_a_subscription_from_now_gets_only_new_messages(server, transport, request):
    channel = f"public:now-{request.node.callspec.id}"
    old = server.publish(channel, {"old": True})
    client = transport(server, channel, None, None)
    try:
        assert client.subscribed()["last_id"] == old
        new = server.publish(channel, {"new": True})
        message = client.message()
        assert (message["id"], message["data"]) == (new, {"new": True})
    finally:
        client.close()


def test_a_position_that_left_history_says_recovered_false(server, transport, request):
    channel = f"stats:trimmed-{request.node.callspec.id}"  # the stats namespace keeps one message
    first = server.publish(channel, 1)
    server.publish(channel, 2)  # trims the first
    client = transport(server, channel, first, None)
    try:
        reply = client.subscribed()
        assert reply["recovered"] is False
        assert client.message()["data"] == 2, "what is still retained comes anyway"
    finally:
        client.close()


def test_a_channel_the_user_may_not_read_is_refused(server, transport):
    client = transport(server, "user:1", None, None)  # anonymous: user:<id> belongs to that user only
    try:
        assert client.subscribed() == {"refused": "forbidden"}
    finally:
        client.close()
