"""Slow Python work in the uWSGI spooler: progress on the user's channel, results
downloaded through an offload thread, failures reported, jobs surviving restarts,
and no job able to hold a spooler process or to run forever."""

from __future__ import annotations

import json
import re
import struct
import time
import uuid

import pytest

from offload.testing import wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = DemoServer(tmp_path_factory.mktemp("tasks-var")).prepare().start()
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
    wait_for_no_spool_files(server, 5)
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


def write_spool_file(server, task: str, channel: str, kwargs: dict, task_id: str | None = None) -> str:
    """Queue ``task`` by writing a spool file the way ``uwsgi.spool`` does
    (core/spooler.c: a uwsgi packet header, the arguments, then the body);
    returns the task id. Written aside and renamed, so the spooler never sees
    half a file."""
    task_id = task_id or uuid.uuid4().hex
    fields = {b"offload_task": task.encode(), b"task_id": task_id.encode(), b"channel": channel.encode()}
    args = b"".join(struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v for k, v in fields.items())
    body = json.dumps(kwargs).encode()  # json.dumps writes NaN as NaN, as a poisoned spool file would hold
    spool = server.var_dir / "spool"
    partial = spool / f"partial-{task_id}"
    partial.write_bytes(struct.pack("<BHB", 17, len(args), 0) + args + body)
    partial.rename(spool / f"uwsgi_spoolfile_on_test_{task_id}")
    return task_id


def wait_for_no_spool_files(server, timeout: float = 10) -> None:
    """The spooler removes a task's file once it ran (or gave up): fail if one is left behind."""
    wait_for(lambda: not list((server.var_dir / "spool").iterdir()), timeout, "the spool files to go", 0.1)


def spooler_pids(server) -> list[int]:
    return sorted(s["pid"] for s in server.stats()["spoolers"])


@pytest.mark.parametrize("spin", [False, True], ids=["waits-in-gevent", "spins-the-cpu"])
def test_a_hung_task_is_stopped_by_its_time_limit_retried_failed_and_the_spooler_carries_on(server, spin):
    """demo_hang has a 1 s limit and one retry. It used to hold a spooler
    process until spooler-harakiri (600 s) killed it, and then ran again."""
    channel = f"public:hang-{uuid.uuid4().hex[:8]}"
    ws = server.websocket(f"/ws/?channel={channel}")
    assert json.loads(ws.recv())["type"] == "subscribed"
    pids = spooler_pids(server)
    task_id = write_spool_file(server, "demo_hang", channel, {"spin": spin})
    events = task_events(ws, task_id, timeout=60)
    states = [(e["state"], e.get("attempt"), e.get("error")) for e in events]
    assert states == [
        ("running", 1, None),
        ("retrying", None, "timed out after 1 s"),
        ("running", 2, None),
        ("failed", None, "timed out after 1 s"),
    ], states
    state = server.redis().hgetall(f"offload:task:{task_id}")
    assert state[b"state"] == b"failed" and json.loads(state[b"error"]) == "timed out after 1 s"
    assert state[b"attempts"] == b"2"
    wait_for_no_spool_files(server)
    assert spooler_pids(server) == pids  # stopped inside the spooler: no process was killed
    ws.close()

    # The spoolers still take work: a normal report completes.
    alice, user_channel = login(server, "alice")
    ws = server.websocket(f"/ws/?channel={user_channel}", cookie=alice.cookie_header())
    json.loads(ws.recv())
    status, _, body = alice.post_csrf("/reports/", {"seconds": "0.2", "rows": "1000"})
    assert status == 202
    assert task_events(ws, json.loads(body)["task_id"])[-1]["state"] == "done"
    ws.close()


def test_a_spool_file_whose_runs_keep_dying_is_given_up_not_run_forever(server):
    """A report spooled with seconds=NaN (before validation) hung until
    spooler-harakiri killed the spooler, and uWSGI re-ran the file after each
    kill. Its runs were counted: once ``retries + 1`` runs began without an
    outcome, the next run fails the task instead of running it."""
    channel = f"public:dying-{uuid.uuid4().hex[:8]}"
    ws = server.websocket(f"/ws/?channel={channel}")
    assert json.loads(ws.recv())["type"] == "subscribed"
    task_id = uuid.uuid4().hex
    # Two runs of build_report (retries=1) began and died with their process.
    server.redis().hset(f"offload:task:{task_id}", mapping={"name": "build_report", "attempts": 2, "state": "running"})
    write_spool_file(server, "build_report", channel, {"user_id": 1, "seconds": float("nan")}, task_id=task_id)
    events = task_events(ws, task_id, timeout=30)
    assert [e["state"] for e in events] == ["failed"]  # never ran again
    assert events[0]["error"].startswith("gave up after 2 attempts")
    state = server.redis().hgetall(f"offload:task:{task_id}")
    assert state[b"state"] == b"failed" and state[b"attempts"] == b"3"
    wait_for_no_spool_files(server)
    ws.close()


def test_a_report_spooled_with_nan_seconds_fails_at_once_instead_of_sleeping_forever(server):
    """The view refuses NaN now, but a spool file written before (or by other
    code) may still hold it: the task checks its own arguments."""
    channel = f"public:nan-{uuid.uuid4().hex[:8]}"
    ws = server.websocket(f"/ws/?channel={channel}")
    assert json.loads(ws.recv())["type"] == "subscribed"
    task_id = write_spool_file(server, "build_report", channel, {"user_id": 1, "seconds": float("nan")})
    events = task_events(ws, task_id, timeout=30)
    assert [e["state"] for e in events] == ["running", "failed"]  # a TaskError: no retry
    assert events[-1]["error"] == "seconds must be a finite number >= 0, not nan"
    wait_for_no_spool_files(server)
    ws.close()
