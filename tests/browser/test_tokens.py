"""offload.js with tokens, in real headless Chromium against the real uWSGI, with no session cookie.

The page never logs in: the client gets its connection token from ``getToken()``
(a fetch of the test server's minting view, tests/urls_tokens.py), refreshes it
before each expiry, and subscribes to a private channel with a subscription
token function. Its event stream does the same over SSE, reconnecting with a
fresh token at every expiry. Messages published all along arrive once each.
"""

from __future__ import annotations

import pytest

from offload.testing import wait_for
from tests.browser.test_demo import browser  # noqa: F401 (the fixture: Debian's Chromium, headless)
from tests.integration.test_tokens import start_token_server

pytestmark = pytest.mark.timeout(180)

SETUP = """(ttl) => {
  window.log = {states: [], tokens: 0, failTokens: false, received: [], private: [], errors: []};
  window.getToken = async () => {
    if (log.failTokens) throw new Error('token service down');
    log.tokens++;
    const reply = await fetch(`/test-tokens/connection?username=alice&ttl=${ttl}`);
    return (await reply.json()).token;
  };
  window.subscriptionToken = (channel) =>
    fetch(`/test-tokens/subscription?channel=${channel}`).then((r) => r.json()).then((j) => j.token);
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_token_server(tmp_path_factory.mktemp("browser-tokens-var"))
    yield live
    live.stop()


@pytest.fixture
def page(server, browser):  # noqa: F811
    """A page of the server's origin with offload.js loaded and no session cookie."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.base_url + "/accounts/login/")
    page.add_script_tag(url="/static/offload/offload.js")
    yield page
    assert not [c for c in context.cookies() if c["name"] == "sessionid"], "the page must not be logged in"
    context.close()


def user_id(server, username: str) -> int:
    from tests.integration.test_tokens import token_for

    return token_for(server, username)[1]


def received(page, key: str = "received") -> list:
    return page.evaluate(f"log.{key}.map((m) => m.id)")


def test_the_client_refreshes_its_token_across_expiries_and_reconnects_after_a_4003(server, page):
    alice = user_id(server, "alice")
    page.evaluate(SETUP, 3)
    page.evaluate(
        """(userId) => {
          window.client = new OffloadClient(null, {
            getToken, refreshBefore: 1000, onState: (s) => log.states.push(s), onError: (e) => log.errors.push(e),
          });
          client.subscribe(`user:${userId}`, (data, msg) => log.received.push(msg));
          client.subscribe('private:browser', (data, msg) => log.private.push(msg), {token: subscriptionToken});
        }""",
        alice,
    )
    wait_for(lambda: page.evaluate("client.state") == "live", 15, "the client to be live")
    published = [server.publish(f"user:{alice}", {"n": 0})]
    private = [server.publish("private:browser", {"doc": 1})]
    # Two more tokens fetched means two refreshes on the same socket: past two expiries of 3 s tokens.
    wait_for(lambda: page.evaluate("log.tokens") >= 3, 20, "two refreshes")
    published.append(server.publish(f"user:{alice}", {"n": 1}))
    wait_for(lambda: received(page) == published, 10, "the messages on the refreshed socket")
    stats = page.evaluate("client.stats")
    assert (stats["connects"], stats["lastCloseCode"]) == (1, None), stats

    # The token service fails: the refresh cannot happen, the server closes with 4003 at expiry,
    # and the client reconnects once tokens come back, resuming where it was.
    page.evaluate("log.failTokens = true")
    wait_for(lambda: page.evaluate("client.stats.lastCloseCode") == 4003, 15, "the close at expiry (4003)")
    published.append(server.publish(f"user:{alice}", {"n": 2}))  # while it is away
    private.append(server.publish("private:browser", {"doc": 2}))
    page.evaluate("log.failTokens = false")
    wait_for(lambda: page.evaluate("client.state") == "live", 20, "the client to reconnect with a fresh token")
    published.append(server.publish(f"user:{alice}", {"n": 3}))
    wait_for(lambda: received(page) == published, 10, "every message once, in order, across the reconnect")
    wait_for(lambda: received(page, "private") == private, 10, "the private channel resubscribed with a fresh token")
    assert page.evaluate("client.stats.reconnects") == 1
    assert page.evaluate("log.errors") == []
    page.evaluate("client.close()")


def test_the_event_stream_reconnects_with_a_fresh_token_at_each_expiry(server, page):
    alice = user_id(server, "alice")
    page.evaluate(SETUP, 2)
    page.evaluate(
        """(userId) => {
          window.stream = new OffloadClient.EventStream('/sse/', {
            channels: [`user:${userId}`],
            subTokens: () => subscriptionToken('private:browser-sse').then((token) => [token]),
            getToken,
            onMessage: (data, msg) => (msg.channel === 'private:browser-sse' ? log.private : log.received).push(msg),
            onError: (e) => log.errors.push(e),
          });
        }""",
        alice,
    )
    wait_for(lambda: page.evaluate("stream.state") == "live", 15, "the stream to open")
    published, private = [], []

    def reconnected_three_times() -> bool:
        published.append(server.publish(f"user:{alice}", {"n": len(published)}))
        private.append(server.publish("private:browser-sse", {"n": len(private)}))
        wait_for(lambda: len(received(page)) == len(published), 10, "the message on the stream")
        return page.evaluate("stream.stats.connects") >= 4

    # Each 2 s token ends its stream (error event token_expired); publish across three of them.
    wait_for(reconnected_three_times, 30, "three reconnects with fresh tokens", interval=0.2)
    wait_for(lambda: received(page) == published, 10, "every message once, in order, across the reconnects")
    wait_for(lambda: received(page, "private") == private, 10, "the private channel's messages too")
    assert page.evaluate("log.tokens") >= 4
    assert page.evaluate("log.errors") == []
    page.evaluate("stream.close()")
