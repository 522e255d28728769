"""offload.js's rpc() and publish() against the real server's handlers, in real headless Chromium.

The server is the handler tests' (tests/settings.py: the demo plus tests/testapp).
"""

from __future__ import annotations

import pytest
from playwright.sync_api import sync_playwright

from tests.browser.test_demo import CHROMIUM, FLAGS
from tests.integration.test_handlers import TIMEOUT, start_handlers_server

pytestmark = pytest.mark.timeout(180)

#: Settles a promise into {ok, value} or {ok: false, code, reason}: what the page's caller sees.
OUTCOME = """async ([call, args]) => {
  try {
    return {ok: true, value: await client[call](...args)};
  } catch (err) {
    return {ok: false, code: err.code, reason: err.reason, name: err.name};
  }
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = start_handlers_server(tmp_path_factory.mktemp("browser-handlers-var"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(server.base_url + "/accounts/login/")
        page.add_script_tag(url="/static/offload/offload.js")
        page.evaluate("() => { window.client = new OffloadClient(null); window.received = []; }")
        yield page
        browser.close()


def outcome(page, call: str, *args):
    return page.evaluate(OUTCOME, [call, list(args)])


def test_rpc_resolves_with_the_methods_value(page):
    assert outcome(page, "rpc", "test.echo", {"a": [1, "é"]}) == {
        "ok": True,
        "value": {"user": None, "user_id": None, "data": {"a": [1, "é"]}},
    }
    assert outcome(page, "rpc", "usernames") == {"ok": True, "value": ["alice", "bob", "carol"]}


@pytest.mark.parametrize(
    "args, code, reason",
    [
        (["test.reject"], "not_today", "not today"),
        (["no.such"], "method_not_found", "no RPC method 'no.such'"),
        (["test.fail", "x"], "internal_error", "internal error (the server log has the details)"),
        (
            ["test.sleep", {"seconds": TIMEOUT + 0.5, "token": "browser"}],
            "rpc_timeout",
            f"no answer within {TIMEOUT:g} s",
        ),
    ],
)
def test_rpc_rejects_with_the_servers_code(page, args, code, reason):
    assert outcome(page, "rpc", *args) == {"ok": False, "code": code, "reason": reason, "name": "OffloadError"}


def test_rpc_times_out_on_the_client_too(page):
    result = outcome(page, "rpc", "test.sleep", {"seconds": 1, "token": "browser-client"}, {"timeout": 200})
    assert result["ok"] is False and result["code"] == "timeout"


def test_publish_goes_through_the_hook_and_rejects_with_its_verdict(page):
    page.evaluate(
        """() => client.subscribe('shout:browser', (data, msg) => received.push([msg.id, data]), {
          onSubscribed: () => { window.subscribed = true; },
        })"""
    )
    page.wait_for_function("() => window.subscribed")  # live from here on: the message cannot be missed
    published = outcome(page, "publish", "shout:browser", {"text": "hello"})
    assert published["ok"] is True
    page.wait_for_function("() => received.length === 1")
    assert page.evaluate("received") == [[published["value"], {"text": "HELLO", "by": "anonymous"}]]
    assert outcome(page, "publish", "shout:browser", {"text": "buy spam"}) == {
        "ok": False,
        "code": "spam",
        "reason": "no spam here",
        "name": "OffloadError",
    }
