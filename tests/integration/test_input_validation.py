"""What a hostile client sent to the demo views, the resume cursor and the login, on the real server.

Every refusal is a 400 with ``{"error": code, "reason": ...}`` (or a 429 for
the login throttle) and leaves no traceback in the uWSGI log: before, NaN
seconds queued a report that hung a spooler process, ``abc`` and over-long
names were 500s, Arabic-Indic digits were read as a stream id, and a password
could be guessed as fast as the server hashed.
"""

from __future__ import annotations

import json
import re
import urllib.parse

import pytest

from offload.testing import HttpSession, LiveServer
from tests.integration.demo import serve_demo

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_demo(tmp_path_factory, "input-var")


class LogWatch:
    """The part of the uWSGI log written since it was created."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.start = len(server.log_text())

    def new_text(self) -> str:
        return self.server.log_text()[self.start :]


def spool_files(server) -> list:
    return list((server.var_dir / "spool").iterdir())


# -- the demo views ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, code",
    [
        ({"seconds": "nan"}, "invalid_seconds"),  # NaN survived min(..., 60.0): sleep(nan) never returns
        ({"seconds": "NaN"}, "invalid_seconds"),
        ({"seconds": "inf"}, "invalid_seconds"),
        ({"seconds": "-inf"}, "invalid_seconds"),
        ({"seconds": "1e3"}, "invalid_seconds"),
        ({"seconds": "abc"}, "invalid_seconds"),  # was a 500 with a traceback
        ({"seconds": "-1"}, "invalid_seconds"),
        ({"seconds": "61"}, "invalid_seconds"),
        ({"seconds": "\u0661\u0662"}, "invalid_seconds"),  # Arabic-Indic digits: float() reads 12
        ({"seconds": " 5"}, "invalid_seconds"),
        ({"rows": "\u0661\u0662\u0663"}, "invalid_rows"),  # int() reads 123
        ({"rows": "²"}, "invalid_rows"),  # isdigit() but int() raises
        ({"rows": "1_000"}, "invalid_rows"),
        ({"rows": "abc"}, "invalid_rows"),
        ({"rows": "0"}, "invalid_rows"),
        ({"rows": "2000001"}, "invalid_rows"),
        ({"rows": "9" * 400}, "invalid_rows"),
        ({"fail": "yes"}, "invalid_fail"),
    ],
)
def test_report_numbers_that_are_not_plain_ascii_in_range_are_refused_and_nothing_is_queued(
    server, alice, fields, code
):
    watch = LogWatch(server)
    status, headers, body = alice.post_csrf("/reports/", fields)
    assert status == 400, body[:300]
    assert headers["Content-Type"] == "application/json"
    reply = json.loads(body)
    assert reply["error"] == code and reply["reason"]
    assert spool_files(server) == []
    assert "Traceback" not in watch.new_text()


def test_a_sound_report_request_is_still_queued(server, alice):
    status, _, body = alice.post_csrf("/reports/", {"seconds": "0.2", "rows": "1000"})
    assert status == 202 and re.fullmatch(r"[0-9a-f]{32}", json.loads(body)["task_id"])


@pytest.mark.parametrize(
    "text, status, code",
    [
        ("", 400, "empty"),
        ("   \n\t ", 400, "empty"),
        ("x" * 2001, 400, "too_long"),
        ("a\x00b", 400, "invalid_text"),
        ("hello \u0661\u0662\u0663 ²", 200, None),  # any text is fine in a message
    ],
)
def test_chat_messages_are_validated(server, alice, text, status, code):
    got, _, body = alice.post_csrf("/rooms/general/messages", {"text": text})
    assert got == status, body[:300]
    reply = json.loads(body)
    assert reply.get("error") == code
    if status == 200:
        assert reply["id"]


def test_an_unknown_room_is_404(server, alice):
    status, _, _ = alice.post_csrf("/rooms/nosuchroom/messages", {"text": "hi"})
    assert status == 404


@pytest.mark.parametrize(
    "path, code",
    [
        ("/reports/" + "a" * 300 + "/download", "invalid_task_id"),  # ENAMETOOLONG: was a 500
        ("/reports/not-a-task-id/download", "invalid_task_id"),
        ("/downloads/" + "a" * 300, "invalid_name"),  # ENAMETOOLONG: was a 500
        ("/downloads/dir/" + "b" * 256 + ".txt", "invalid_name"),
        ("/downloads/a%01b", "invalid_name"),
    ],
)
def test_download_names_and_task_ids_are_checked_before_the_filesystem(server, alice, path, code):
    watch = LogWatch(server)
    status, _, body = alice.request("GET", path)
    assert status == 400, body[:300]
    assert json.loads(body)["error"] == code
    assert "Traceback" not in watch.new_text()


def test_a_well_formed_but_unknown_task_id_is_still_404(server, alice):
    status, _, _ = alice.request("GET", "/reports/" + "0" * 32 + "/download")
    assert status == 404


# -- the resume cursor ------------------------------------------------------------------


@pytest.mark.parametrize("since", ["\u0661\u0662\u0663-0", "1-\u0660", "²-0", "\uff11-0"])
def test_since_with_non_ascii_digits_is_refused_on_websocket_and_sse(server, since):
    channel = "public:unicode-since"
    ws = server.websocket(f"/ws/?channel={channel}&since={urllib.parse.quote(since)}")
    reply = json.loads(ws.recv())
    ws.close()
    assert reply["type"] == "error" and reply["code"] == "invalid_since", reply
    status, _, body = server.http().request("GET", f"/sse/?channel={channel}&since={urllib.parse.quote(since)}")
    assert status == 400 and json.loads(body)["error"] == "invalid_since"


# -- login throttling -------------------------------------------------------------------


@pytest.fixture
def no_failures(server):
    """Each throttle test starts (and leaves) with no failures counted."""

    def clear():
        client = server.redis()
        keys = client.keys("offload:login-failures:*")
        if keys:
            client.delete(*keys)

    clear()
    yield
    clear()


def try_login(server, username: str, password: str, session: HttpSession | None = None):
    """One login attempt; returns ``(status, headers, body, session)``."""
    session = session or server.http()
    session.request("GET", "/accounts/login/")
    status, headers, body = session.request(
        "POST",
        "/accounts/login/",
        {"username": username, "password": password, "csrfmiddlewaretoken": session.cookie("csrftoken")},
        headers={"Referer": server.base_url + "/accounts/login/"},
    )
    return status, headers, body, session


def test_wrong_passwords_lock_the_account_even_for_the_right_one(server, no_failures):
    for _ in range(5):
        status, _, body, _ = try_login(server, "bob", "wrong")
        assert status == 200 and b"Please enter a correct username and password" in body
    status, headers, body, session = try_login(server, "bob", "demo")  # the right password, too late
    assert status == 429
    assert 800 < int(headers["Retry-After"]) <= 900
    assert b"Too many failed logins" in body
    assert session.cookie("sessionid") is None
    # Another account from the same address is not locked.
    status, _, _, session = try_login(server, "carol", "demo")
    assert status == 200 and session.cookie("sessionid")


def test_a_successful_login_resets_the_account_count(server, no_failures):
    for _ in range(4):
        assert try_login(server, "bob", "wrong")[0] == 200
    assert try_login(server, "bob", "demo")[3].cookie("sessionid")
    for _ in range(4):
        assert try_login(server, "bob", "wrong")[0] == 200
    status, _, _, session = try_login(server, "bob", "demo")
    assert status == 200 and session.cookie("sessionid")


def test_one_address_guessing_many_accounts_is_locked_out(server, no_failures):
    for n in range(20):
        status, _, _, _ = try_login(server, f"nobody{n}", "wrong")
        assert status == 200
    status, headers, _, session = try_login(server, "carol", "demo")
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert session.cookie("sessionid") is None
