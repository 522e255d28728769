"""Presence on the demo's room page in real headless Chromium: who is in the room, live.

Two users see each other join and leave, the header count follows, a user's
tabs are one member, a member goes only after the grace period, a page that
was offline reads the list again when it reconnects, and a connect storm (one
``reset`` event instead of a join per socket) still ends in the exact list.

Real uWSGI (two workers) from uwsgi.ini with its embedded redis-server, with a
short grace period and coalescing window from the environment; Debian's
chromium driven by Playwright.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from playwright.sync_api import expect

from offload.testing import WebSocketClient
from tests.browser.test_demo import (
    ARTIFACTS,
    browser,  # noqa: F401 (the fixture: Debian's Chromium, headless)
)
from tests.integration.demo import serve_demo

pytestmark = pytest.mark.timeout(180)

GRACE = 2.0  # OFFLOAD_PRESENCE_GRACE: a member stays this long after its last connection
COALESCE = 1.0  # OFFLOAD_PRESENCE_COALESCE: joins and leaves of a channel are sent together over this
STORM = 120  # sockets of distinct users connecting at once: over OFFLOAD_PRESENCE_MAX_LISTED (50) per worker
WAIT = 15000  # ms: GRACE + COALESCE + a heartbeat's worth of slack


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"WORKERS": "2", "OFFLOAD_PRESENCE_GRACE": str(GRACE), "OFFLOAD_PRESENCE_COALESCE": str(COALESCE)}
    yield from serve_demo(tmp_path_factory, "presence-browser-var", env)


def open_room(browser, server, username: str, room: str):  # noqa: F811
    """A new browser context logged in as ``username`` (its session cookie), on the room's page."""
    session = server.http()
    session.login(username)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.add_cookies([{"name": c.name, "value": c.value, "url": server.base_url} for c in session.jar])
    return open_tab(context, server, room)


def open_tab(context, server, room: str):
    page = context.new_page()
    page.goto(f"{server.base_url}/rooms/{room}/")
    expect(page.locator("#conn-state")).to_have_text("live", timeout=WAIT)
    return page


def expect_members(page, names: list[str]) -> None:
    """The page lists exactly ``names`` (sorted), once each, and its header counts them."""
    expect(page.locator("#members .member .name")).to_have_text(names, timeout=WAIT)
    count = len(names)
    expect(page.locator("#member-count")).to_have_text(f"{count} member{'' if count == 1 else 's'}", timeout=WAIT)


def test_two_users_see_each_other_join_and_leave_and_tabs_count_once(server, browser):  # noqa: F811
    alice = open_room(browser, server, "alice", "random")
    expect_members(alice, ["alice"])
    expect(alice.locator("#members .member.me .name")).to_have_text("alice")

    bob = open_room(browser, server, "bob", "random")
    for page in (alice, bob):
        expect_members(page, ["alice", "bob"])

    # Bob's second tab is the same member: no second "bob", no third member.
    bob_again = open_tab(bob.context, server, "random")
    expect_members(bob_again, ["alice", "bob"])
    carol = open_room(browser, server, "carol", "random")  # after bob's second tab: it would show by now
    for page in (alice, bob_again, carol):
        expect_members(page, ["alice", "bob", "carol"])
    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "presence-alice.png"))

    # Bob closes one tab, then carol leaves: once carol is gone (her grace period is over),
    # bob's first tab's would be over too: bob stays, his other tab holds him.
    bob.close()
    carol.context.close()
    for page in (alice, bob_again):
        expect_members(page, ["alice", "bob"])

    # Bob's last tab closes: he leaves, after the grace period and not before.
    closed_at = time.monotonic()
    bob_again.context.close()
    expect_members(alice, ["alice"])
    took = time.monotonic() - closed_at
    assert took >= GRACE, f"bob left {took:.2f} s after his last tab closed, within the {GRACE} s grace period"
    print(f"\nbob's leave reached alice {took:.2f} s after his last tab closed (grace {GRACE} s)")
    alice.context.close()


def test_a_page_that_was_offline_reads_the_members_again(server, browser):  # noqa: F811
    """Events sent while a page was disconnected are lost to it: its list must not keep bob."""
    alice = open_room(browser, server, "alice", "offtopic")
    bob = open_room(browser, server, "bob", "offtopic")
    carol = open_room(browser, server, "carol", "offtopic")
    for page in (alice, bob, carol):
        expect_members(page, ["alice", "bob", "carol"])
    members = alice.locator("#members")
    expect(members).to_have_attribute("data-synced", "true")

    alice.evaluate("window.demo.client.close()")
    expect(members).to_have_attribute("data-synced", "false")  # shown as possibly stale
    bob.context.close()
    expect_members(carol, ["carol"])  # bob's leave went out (and alice's: she was away past her grace)
    expect_members(alice, ["alice", "bob", "carol"])  # alice heard none of it

    alice.evaluate("window.demo.client.connect()")
    expect_members(alice, ["alice", "carol"])
    expect(members).to_have_attribute("data-synced", "true")
    expect_members(carol, ["alice", "carol"])
    for page in (alice, carol):
        page.context.close()


def guest_tokens(server, count: int) -> list[str]:
    """Connection tokens of ``count`` new users (no password: made in bulk), minted by the server's project."""
    code = (
        "from django.contrib.auth.models import User\n"
        "import offload\n"
        f"users = [User(username=f'guest{{n:04d}}') for n in range({count})]\n"
        "for user in users: user.set_unusable_password()\n"
        "User.objects.bulk_create(users, ignore_conflicts=True)\n"
        "for user in User.objects.filter(username__startswith='guest').order_by('username'):\n"
        "    print('token', offload.connection_token(user, ttl=600))\n"
    )
    command = [sys.executable, "manage.py", "shell", "-c", code]
    result = subprocess.run(command, cwd=server.project_dir, env=server.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # (the shell prints a line of its own first)
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("token ")]


def test_a_connect_storm_sends_a_reset_and_the_page_still_lists_everyone(server, browser):  # noqa: F811
    alice = open_room(browser, server, "alice", "general")
    expect_members(alice, ["alice"])
    alice.evaluate(
        """() => {
            window.presenceEvents = [];
            window.demo.client.options.onPresence = (channel, event) => presenceEvents.push(event);
        }"""
    )
    tokens = guest_tokens(server, STORM)
    everyone = sorted(["alice", *(f"guest{n:04d}" for n in range(STORM))])

    def connect(token: str) -> WebSocketClient:
        return WebSocketClient(f"{server.ws_url}/ws/?token={token}&channel=room:general")

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        sockets = list(pool.map(connect, tokens))
    connected = time.monotonic() - started
    try:
        expect(alice.locator("#member-count")).to_have_text(f"{STORM + 1} members", timeout=WAIT)
        expect(alice.locator("#members .member")).to_have_count(STORM + 1, timeout=WAIT)
        listed = time.monotonic() - started
        kept = alice.evaluate("window.demo.client.members('room:general')")
        assert sorted(info["name"] for info in kept["members"]) == everyone
        assert kept["complete"] is True and kept["count"] == STORM + 1
        events = alice.evaluate("presenceEvents")
        assert any(event.get("reset") for event in events), events  # not a join per socket
        assert len(events) <= 6, events
    finally:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(WebSocketClient.close, sockets))
    expect_members(alice, ["alice"])
    assert sum(1 for event in alice.evaluate("presenceEvents") if event.get("reset")) >= 2
    print(f"\n{STORM} sockets connected in {connected:.2f} s; alice listed all {STORM + 1} members {listed:.2f} s in")
    alice.context.close()
