"""Slow Python work in the uWSGI spooler: progress on the user's channel, results
downloaded through an offload thread, failures reported, jobs surviving restarts."""

from __future__ import annotations

import json
import re
import time

import pytest

from offload.testing import LiveServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("tasks-var")).prepare().start()
    yield live
    live.stop()


def login(server, username):
    session = server.http()
    session.login(username)
    _, _, body = session.request("GET", "/rooms/general/")
    user_channel = re.search(rb'"user_channel": "(user:\d+)"', body).group(1).decode()
    return session, user_channel


def task_events(ws, task_id, until=("done", "failed"), timeout=60):
    """Collect this task's messages until a final state."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if message.get("type") != "message" or message["data"].get("task_id") != task_id:
            continue
        events.append(message["data"])
        if message["data"]["state"] in until:
            return events
    raise AssertionError(f"task {task_id} did not finish: {events}")


def offloaded(server) -> int:
    return sum(core.get("offloaded_requests", 0) for w in server.stats()["workers"] for core in w["cores"])


def test_report_runs_in_the_spooler_reports_progress_and_is_downloaded_offloaded(server):
    alice, channel = login(server, "alice")
    ws = server.websocket(f"/ws/?channel={channel}", cookie=alice.cookie_header())
    assert json.loads(ws.recv())["type"] == "subscribed"
    status, _, body = alice.post_csrf("/reports/", {"seconds": "2", "rows": "100000"})
    assert status == 202  # answered at once: "queued" is the first state seen below
    task_id = json.loads(body)["task_id"]
    events = task_events(ws, task_id)
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "done"
    progress = [e["progress"] for e in events if e["state"] == "running"]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) >= 10
    result = events[-1]["result"]
    assert result["bytes"] > 2_000_000

    before = offloaded(server)
    status, headers, data = alice.request("GET", result["download"])
    assert status == 200 and len(data) == result["bytes"]
    assert data.startswith(b"row,region,product,units,price\n")
    assert headers["Content-Disposition"].startswith("attachment")
    assert offloaded(server) == before + 1
    assert re.search(r"spooler", server.log_text(), re.I)

    bob, _ = login(server, "bob")
    status, _, data = bob.request("GET", result["download"])
    assert status == 404 and not data.startswith(b"row,")
    ws.close()


def test_a_failing_task_reaches_the_user_as_an_error_and_leaves_no_spool_file(server):
    alice, channel = login(server, "alice")
    ws = server.websocket(f"/ws/?channel={channel}", cookie=alice.cookie_header())
    json.loads(ws.recv())
    status, _, body = alice.post_csrf("/reports/", {"seconds": "0.1", "fail": "1"})
    assert status == 202
    task_id = json.loads(body)["task_id"]
    events = task_events(ws, task_id)
    assert events[-1]["state"] == "failed"
    assert events[-1]["error"] == "the report generator was asked to fail"
    deadline = time.monotonic() + 5
    while list((server.var_dir / "spool").iterdir()):
        assert time.monotonic() < deadline, "spool file left behind"
        time.sleep(0.1)
    ws.close()


def test_a_task_interrupted_by_a_restart_runs_again_and_completes(server):
    alice, channel = login(server, "alice")
    ws = server.websocket(f"/ws/?channel={channel}", cookie=alice.cookie_header())
    json.loads(ws.recv())
    status, _, body = alice.post_csrf("/reports/", {"seconds": "6", "rows": "20000"})
    assert status == 202
    task_id = json.loads(body)["task_id"]
    task_events(ws, task_id, until=("running",))
    ws.close()
    assert len(list((server.var_dir / "spool").iterdir())) == 1  # the job is on disk
    server.restart()
    # Resume the channel from the beginning of its history: nothing is lost.
    ws = server.websocket(f"/ws/?channel={channel}&since=0-0", cookie=alice.cookie_header())
    json.loads(ws.recv())
    events = task_events(ws, task_id, timeout=90)
    assert events[-1]["state"] == "done"
    assert any(e.get("attempt", 1) >= 2 for e in events if e["state"] == "running")
    ws.close()


def test_the_configured_number_of_spooler_processes_runs(server):
    # UWSGI_SPOOLER_PROCESSES=2 (a placeholder in uwsgi.ini would silently give 1)
    spoolers = server.stats()["spoolers"]
    assert len(spoolers) == 2 and all(s["pid"] for s in spoolers)
