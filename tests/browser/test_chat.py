"""The chat in real headless Chromium: messages saved by the publish hook, reloaded from the
database without duplicates, refusals shown, and "typing…" over RPC.

Real uWSGI from uwsgi.ini with a real redis-server, Debian's chromium driven by Playwright.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from offload.testing import RedisServer
from tests.browser import test_demo as demo_page
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(180)

browser = demo_page.browser  # the same module-scoped Chromium fixture
open_room = demo_page.open_room


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """uWSGI with an external Redis (REDIS_URL set), so that a test can stop Redis alone."""
    redis = RedisServer(tmp_path_factory.mktemp("chat-browser-redis")).start()
    server = DemoServer(tmp_path_factory.mktemp("chat-browser-var"), redis_url=redis.url).prepare().start()
    try:
        yield server, redis
    finally:
        server.stop()
        redis.stop()


@pytest.fixture
def pages(stack, browser):
    server, _ = stack
    opened = [open_room(browser, server, name) for name in ("alice", "bob")]
    yield opened
    for page in opened:
        page.context.close()


def texts(page) -> list[str]:
    return page.locator("#messages li.message .text").all_text_contents()


def send(page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def test_a_message_is_seen_live_and_again_after_a_reload_from_the_database(pages):
    alice, bob = pages
    send(alice, "saved for later")
    expect(bob.locator("#messages li.message .text").last).to_have_text("saved for later", timeout=10000)
    expect(alice.locator("#message-input")).to_have_value("")
    expect(bob.locator("#messages li.message").last).to_have_attribute("data-pk", re.compile(r"^\d+$"))

    bob.reload()
    expect(bob.locator("#conn-state")).to_have_text("live", timeout=15000)
    saved = bob.locator("#messages li.message", has_text="saved for later")
    expect(saved).to_have_count(1)
    expect(saved.locator(".author")).to_have_text("alice")
    # A message after the reload arrives live; nothing before it came twice.
    send(alice, "after the reload")
    expect(bob.locator("#messages li.message .text").last).to_have_text("after the reload", timeout=10000)
    assert texts(bob).count("saved for later") == 1
    assert texts(bob).count("after the reload") == 1


def test_messages_sent_one_right_after_another_all_arrive_in_order(pages):
    """The next message may be typed and sent while the previous one waits for its answer: none is dropped
    (a send while one was in flight was ignored, and the answer then cleared what had been typed)."""
    alice, bob = pages
    for n in range(3):
        send(alice, f"quick {n}")
    expect(alice.locator("#message-input")).to_have_value("")
    expect(bob.locator("#messages li.message .text").last).to_have_text("quick 2", timeout=10000)
    quick = [text for text in texts(bob) if text.startswith("quick ")]
    assert quick == ["quick 0", "quick 1", "quick 2"]


def test_a_page_rendered_while_redis_was_down_replays_the_history_and_still_shows_each_message_once(stack, pages):
    """Without the channel's newest id the page subscribes from the start of the retained
    history, which repeats the messages it rendered from the database: each is shown once (by pk)."""
    _, redis = stack
    alice, bob = pages
    for n in range(3):
        send(alice, f"replayed {n}")
        expect(alice.locator("#messages li.message .text").last).to_have_text(f"replayed {n}", timeout=10000)
    redis.stop()
    try:
        bob.reload()  # rendered from the database alone
        expect(bob.locator("#messages li.message", has_text="replayed 2")).to_have_count(1)
        assert bob.evaluate("window.demo.config.room_since") == "0-0"
    finally:
        redis.start()
    expect(bob.locator("#conn-state")).to_have_text("live", timeout=30000)
    expect(alice.locator("#conn-state")).to_have_text("live", timeout=30000)
    send(alice, "replay done")
    expect(bob.locator("#messages li.message .text").last).to_have_text("replay done", timeout=10000)
    shown = texts(bob)
    for n in range(3):
        assert shown.count(f"replayed {n}") == 1, shown
    pks = bob.eval_on_selector_all("#messages li.message[data-pk]", "els => els.map(e => e.dataset.pk)")
    assert len(pks) == len(set(pks))


def test_a_refused_message_shows_the_error_and_is_not_saved(pages):
    alice, bob = pages
    too_long = "x" * 2001
    send(alice, too_long)
    expect(alice.locator("#send-error")).to_be_visible(timeout=10000)
    expect(alice.locator("#send-error")).to_contain_text("too_long")
    expect(alice.locator("#message-input")).to_have_value(too_long)  # kept, to be shortened
    alice.reload()
    expect(alice.locator("#conn-state")).to_have_text("live", timeout=15000)
    assert too_long not in texts(alice) and too_long not in texts(bob)


def test_typing_shows_on_the_other_page_and_goes_away(pages):
    alice, bob = pages
    alice.evaluate(
        """() => {
            const client = window.demo.client;
            const rpc = client.rpc.bind(client);
            window.typingCalls = 0;
            client.rpc = (method, data) => { if (method === 'typing') window.typingCalls++; return rpc(method, data); };
        }"""
    )
    alice.locator("#message-input").press_sequentially("hello bo")  # eight keys, well within 2 s
    expect(bob.locator("#typing")).to_have_text("alice is typing…", timeout=10000)
    expect(bob.locator("#typing")).to_be_visible()
    expect(alice.locator("#typing")).to_be_hidden()  # not about oneself
    assert alice.evaluate("window.typingCalls") == 1  # throttled: one call per 2 s
    expect(bob.locator("#typing")).to_be_hidden(timeout=10000)  # a few seconds without news
