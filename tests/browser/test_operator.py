"""The operator page in real headless Chromium, on a real uWSGI with two workers.

A staff user (carol) logs in and watches: both workers appear, a channel
becomes hot while a test publishes to it, and a ping flooder's close appears
among the drops with its reason. A user who is not staff (alice) is refused.
The refusals without a browser: tests/integration/test_operator.py.
"""

from __future__ import annotations

import threading

import pytest
from playwright.sync_api import expect
from wsproto.events import CloseConnection

from offload.testing import frame
from tests.browser.test_demo import (
    ARTIFACTS,
    browser,  # noqa: F401 (the fixture: Debian's Chromium, headless)
)
from tests.integration.demo import DEMO_PASSWORD, serve_demo

pytestmark = pytest.mark.timeout(180)

HOT = "public:operator-hot"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, "operator-var", {"WORKERS": "2", "OFFLOAD_STATS_INTERVAL": "0.5"})


def log_in(browser, server, username):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(server.base_url + "/operator/")
    page.wait_for_url("**/accounts/login/?next=/operator/")  # anonymous: to the login page first
    page.fill("#id_username", username)
    page.fill("#id_password", DEMO_PASSWORD)
    page.click("#login-button")
    return page


def test_staff_watch_workers_a_hot_channel_and_a_drop(server, browser):  # noqa: F811
    page = log_in(browser, server, "carol")
    page.wait_for_url("**/operator/")
    expect(page.locator("#conn-state")).to_have_text("live", timeout=15000)
    expect(page.locator("#workers tr")).to_have_count(2, timeout=15000)  # every worker, merged
    expect(page.locator("#total-workers")).to_have_text("2")
    expect(page.locator("#redis-status")).to_have_text("up")
    pids = set(page.eval_on_selector_all("#workers tr", "rows => rows.map(r => Number(r.dataset.pid))"))
    assert pids == set(server.worker_pids())

    listeners = [server.ws_client(f"/ws/?channel={HOT}") for _ in range(3)]
    stop = threading.Event()

    def publish_until_seen():
        n = 0
        while not stop.is_set():
            server.publish(HOT, {"n": n})
            n += 1

    publisher = threading.Thread(target=publish_until_seen, daemon=True)
    publisher.start()
    try:
        hot = page.locator(f'#channels tr[data-channel="{HOT}"]')
        expect(hot).to_have_class("hot", timeout=15000)  # a message rate above 0
        expect(hot.locator("td").nth(1)).to_have_text("3")  # its three subscribers, summed over workers
    finally:
        stop.set()
        publisher.join(10)
        for ws in listeners:
            ws.close()

    flooder = server.ws_client("/ws/echo", auto_reply=False)
    flooder.send_raw(b"".join(frame(9, b"") for _ in range(200)))
    while not isinstance(event := flooder.recv_event(), CloseConnection):
        pass
    assert event.code == 1008
    flooder.abort()
    drop = page.locator('#drops tr[data-reason="rate_limit"]')
    expect(drop.first).to_be_visible(timeout=15000)
    expect(drop.first.locator("td").nth(2)).to_have_text("websocket")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "operator.png"), full_page=True)

    page.goto(server.base_url + "/rooms/general/")  # the demo's pages link staff to it
    page.click("#operator-link")
    page.wait_for_url("**/operator/")
    expect(page.locator("#conn-state")).to_have_text("live", timeout=15000)
    page.context.close()


def test_users_who_are_not_staff_are_refused(server, browser):  # noqa: F811
    page = log_in(browser, server, "alice")
    page.wait_for_load_state()
    page.goto(server.base_url + "/rooms/general/")
    expect(page.locator("#current-user")).to_have_text("alice")
    assert page.locator("#operator-link").count() == 0
    response = page.goto(server.base_url + "/operator/")
    assert response.status == 403
    assert page.locator("#workers").count() == 0
    token = page.request.get(server.base_url + "/operator/token")
    assert token.status == 403
    page.context.close()
