"""The demo page in real headless Chromium (Debian's chromium, driven by Playwright).

Two users in one room chat live; then the server restarts while messages are
published, and both pages reconnect and resume from their last id with
nothing lost and nothing twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from offload.testing import RedisServer
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(180)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """uWSGI with an external Redis (REDIS_URL set), so Redis outlives uWSGI restarts."""
    redis = RedisServer(tmp_path_factory.mktemp("browser-redis")).start()
    server = DemoServer(redis_url=redis.url).prepare().start()
    try:
        yield server, redis
    finally:
        server.stop()
        redis.stop()


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Debian's chromium is required: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def open_room(browser, server, username):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.goto(server.base_url + "/rooms/general/")
    page.fill("#id_username", username)
    page.fill("#id_password", "demo")
    page.click("#login-button")
    page.wait_for_url("**/rooms/general/")
    expect(page.locator("#conn-state")).to_have_text("live", timeout=15000)
    return page


def message_ids(page) -> list[str]:
    return page.eval_on_selector_all("#messages li.message", "els => els.map(e => e.dataset.id)")


def test_two_pages_chat_live_and_resume_after_a_server_restart(stack, browser):
    server, redis = stack
    assert not (server.var_dir / "redis.pid").exists(), "REDIS_URL is set: no embedded Redis may start"
    alice = open_room(browser, server, "alice")
    bob = open_room(browser, server, "bob")

    alice.fill("#message-input", "hello bob")
    alice.click("#send-button")
    expect(bob.locator("#messages li.message .text").last).to_have_text("hello bob", timeout=10000)
    expect(alice.locator("#messages li.message .text").last).to_have_text("hello bob")
    expect(alice.locator("#message-input")).to_have_value("")

    bob.fill("#message-input", "hi alice")
    bob.press("#message-input", "Enter")
    expect(alice.locator("#messages li.message .text").last).to_have_text("hi alice", timeout=10000)
    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "demo-alice.png"), full_page=True)

    # The server goes away; the pages notice and start reconnecting.
    server.stop()
    for page in (alice, bob):
        expect(page.locator("#conn-state")).to_have_text("reconnecting", timeout=15000)

    # Messages published while no server is up reach history only.
    from django.conf import settings

    import offload
    from offload import conf
    from offload.backend import redis_client

    saved = settings.OFFLOAD_REDIS_URL
    settings.OFFLOAD_REDIS_URL = redis.url
    conf.reset()
    redis_client.reset()
    try:
        missed = [offload.publish("room:general", {"user": "system", "text": f"missed {n}"}) for n in range(5)]
    finally:
        settings.OFFLOAD_REDIS_URL = saved
        conf.reset()
        redis_client.reset()

    server.start()
    for page in (alice, bob):
        expect(page.locator("#conn-state")).to_have_text("live", timeout=30000)
    after = server.publish("room:general", {"user": "system", "text": "after restart"})
    for page in (alice, bob):
        expect(page.locator("#messages li.message .text").last).to_have_text("after restart", timeout=10000)
        ids = message_ids(page)
        assert len(ids) == len(set(ids)), "a message was shown twice"
        assert ids[-6:] == [*missed, after], "messages published during the restart were lost or reordered"
        assert page.evaluate("window.demo.client.stats.reconnects") >= 1
        expect(page.locator("#recovery-warning")).to_be_hidden()
    bob.screenshot(path=str(ARTIFACTS / "demo-bob-after-restart.png"), full_page=True)


def test_echo_panel_and_live_stats(stack, browser):
    server, _ = stack
    page = open_room(browser, server, "carol")
    page.fill("#echo-input", "echo me")
    page.click("#echo-button")
    expect(page.locator("#echo-log li.echo").last).to_contain_text("echo me", timeout=10000)
    expect(page.locator("#stats tr[data-pid]")).to_have_count(1, timeout=10000)
    page.click("#notify-button")
    expect(page.locator("#notifications li.notification")).to_have_count(1, timeout=10000)


def test_report_progress_bar_and_offloaded_download(stack, browser):
    server, _ = stack
    page = open_room(browser, server, "alice")
    page.eval_on_selector("#report-button", "b => b.dataset.seconds = '1.5'")
    page.click("#report-button")
    expect(page.locator("#report-progress")).to_be_visible(timeout=10000)
    expect(page.locator("#report-link")).to_be_visible(timeout=30000)
    assert page.eval_on_selector("#report-progress", "p => p.value") == 1
    with page.expect_download() as info:
        page.click("#report-link")
    path = info.value.path()
    with open(path, "rb") as f:
        assert f.read(31) == b"row,region,product,units,price\n"
    page.screenshot(path=str(ARTIFACTS / "demo-report.png"), full_page=True)
