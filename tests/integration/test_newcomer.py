"""A newcomer's project, built by following docs/guide.md to the letter.

The library is built into a wheel (``python -m build``) and installed, with
its dependencies from the package index, into a fresh virtualenv of a fresh
``django-admin startproject``: exactly the guide's commands, run in order, and
its files written as it says (each code block carries a mark after its
opening fence: ``run``, ``serve``, or ``file=PATH action=create|append``; an
unmarked or unknown block fails the test, so the guide cannot drift from
what is tested). Its ``uwsgi --ini uwsgi.ini`` runs from that project, not
from this repository: the guide's view publishes, a websocket client and the
guide's page in Chromium receive; with a connection token from the guide's
view, a cookie-less websocket publishes through the guide's publish hook
(stored, transformed, or refused with its code) and calls its RPC method;
once stopped like Ctrl-C stops it, nothing (Redis included) is left running. Then the guide's own pytest test
runs in that project, through offload.testing.

uWSGI compiles from source. To keep CI time sane its wheel is built once per
uWSGI version and Python into ``~/.cache/django-uwsgi-offload`` (or
``$XDG_CACHE_HOME``) and offered to pip with ``PIP_FIND_LINKS``, as is the
library's wheel; pip still installs it (and checks it has SSL and PCRE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from offload import __version__
from offload.testing import HandshakeError, HttpSession, WebSocketClient, free_port, timeout_factor, wait_for
from tests.test_packaging import build

pytestmark = pytest.mark.timeout(2400)

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs/guide.md"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Seconds for one step of the guide (a cold uWSGI build takes about half a minute here).
STEP_TIMEOUT = 900
#: Variables of this test session that a newcomer's shell does not have.
FOREIGN_ENV = ("VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE", "OFFLOAD_VAR_DIR", "REDIS_URL", "PYTHONPATH")
FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of the guide and the marks after its language."""

    lang: str
    marks: dict[str, str] = field(hash=False)
    code: str
    line: int

    @property
    def kind(self) -> str:
        """``run``, ``serve`` or ``file``; an AssertionError for anything else."""
        if "file" in self.marks:
            assert self.marks.get("action") in ("create", "append"), f"guide line {self.line}: action=create|append"
            return "file"
        kinds = [mark for mark in ("run", "serve") if mark in self.marks]
        assert len(kinds) == 1 and len(self.marks) == 1, f"guide line {self.line}: unmarked block {self.marks}"
        return kinds[0]


def guide_blocks(text: str) -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            marks = dict([*word.split("=", 1), ""][:2] for word in match[2].split())
            current = (match[1], marks, [], number)
        elif current is not None and line.startswith("```"):
            lang, marks, lines, start = current
            blocks.append(Block(lang, marks, "\n".join(lines) + "\n", start))
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"guide line {current[3]}: a block is never closed"
    return blocks


def test_every_block_of_the_guide_is_marked_for_this_test():
    blocks = guide_blocks(GUIDE.read_text())
    kinds = [block.kind for block in blocks]
    assert kinds.count("serve") == 1, "the guide starts uWSGI exactly once"
    files = [block.marks["file"] for block in blocks if block.kind == "file"]
    for needed in (
        "mysite/settings.py",
        "mysite/urls.py",
        "mysite/wsgi.py",
        "uwsgi.ini",
        "news/hooks.py",
        "news/rpc.py",
    ):
        assert needed in files, f"the guide no longer writes {needed}"


# -- the environment of a newcomer --------------------------------------------------


def uwsgi_version() -> str:
    (pin,) = re.findall(r"^uWSGI==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    return pin


def cached_uwsgi_wheel() -> Path:
    """uWSGI's wheel built with SSL and PCRE, once per uWSGI version and Python."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "django-uwsgi-offload"
    version = uwsgi_version()
    directory = cache / f"uwsgi-{version}-{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
    found = sorted(directory.glob("uwsgi-*.whl")) + sorted(directory.glob("uWSGI-*.whl"))
    if found:
        return found[0]
    building = directory.with_name(directory.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "-q",
            "-w",
            str(building),
            f"uWSGI=={version}",
        ],
        env={**os.environ, "UWSGI_PROFILE_OVERRIDE": "ssl=true;pcre=true;routing=true"},
        check=True,
        capture_output=True,
        timeout=STEP_TIMEOUT,
    )
    print(f"\nbuilt uWSGI {version}'s wheel in {time.monotonic() - started:.0f} s (cached in {directory})")
    try:
        building.rename(directory)
    except OSError:  # another run cached it meanwhile
        shutil.rmtree(building)
    return next(directory.glob("*.whl"))


def newcomer_env(links: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV and not k.startswith("OFFLOAD_")}
    venv_bin = str(Path(sys.executable).parent)  # not this repository's virtualenv
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    # the wheels first; the machine's own find-links (if any) stay
    env["PIP_FIND_LINKS"] = " ".join([str(links), env.get("PIP_FIND_LINKS", "")]).strip()
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(block: Block, project: Path, env: dict) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT * timeout_factor(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"guide line {block.line} failed ({result.returncode}):\n{output[-4000:]}"
    return output


def write(block: Block, project: Path) -> None:
    path = project / block.marks["file"]
    if block.marks["action"] == "append":
        assert path.is_file(), f"guide line {block.line}: {path} to append to does not exist"
        path.write_text(path.read_text() + "\n" + block.code)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)


# -- the test -------------------------------------------------------------------------


def test_a_newcomer_follows_the_guide_and_gets_real_time(tmp_path):
    started = time.monotonic()
    links = tmp_path / "links"
    links.mkdir()
    _, wheel = build(tmp_path)
    shutil.copy2(wheel, links)
    shutil.copy2(cached_uwsgi_wheel(), links)
    project = tmp_path / "newcomer"
    project.mkdir()
    env = newcomer_env(links)
    served = False
    blocks = guide_blocks(GUIDE.read_text())
    for block in blocks:
        if block.kind == "file":
            write(block, project)
        elif block.kind == "run":
            output = run(block, project, env)
            if "pytest" in block.code:
                assert re.search(r"\b1 passed\b", output), output[-3000:]
        else:
            serve_and_check(block, project, env, account(blocks))
            served = True
    assert served
    installed = subprocess.run(
        [
            project / ".venv/bin/python",
            "-c",
            "import offload, os; print(offload.__version__, os.path.dirname(offload.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    assert installed[0] == __version__
    package = Path(installed[1])
    assert package.is_relative_to(project / ".venv"), "offload must come from the wheel installed in the virtualenv"
    assert (package / "uwsgiconf/offload.ini").read_text() == (ROOT / "offload/uwsgiconf/offload.ini").read_text()
    flags = subprocess.run([project / ".venv/bin/uwsgi", "--cflags"], capture_output=True, text=True, check=True).stdout
    assert "-DUWSGI_SSL" in flags and "-DUWSGI_PCRE" in flags, flags
    print(f"\nthe newcomer's project from docs/guide.md: {time.monotonic() - started:.0f} s")


def account(blocks: list[Block]) -> tuple[str, str]:
    """The username and password of the account the guide creates."""
    (match,) = [
        m
        for block in blocks
        if block.kind == "run" and (m := re.search(r"DJANGO_SUPERUSER_PASSWORD=(\S+) .*--username (\S+)", block.code))
    ]
    return match[2], match[1]


def serve_and_check(block: Block, project: Path, env: dict, editor: tuple[str, str]) -> None:
    """Start the guide's uWSGI, publish from the guide's view, receive on a websocket
    and on the guide's page, call its handlers with its token, then stop it as Ctrl-C
    does and find nothing left."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = project / "uwsgi.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", block.code],
            cwd=project,
            env={**env, "PORT": str(port)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, like a terminal's foreground job
        )

    def serves() -> bool:
        assert proc.poll() is None, f"uWSGI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
        return HttpSession(base).request("GET", "/healthz", timeout=2)[0] == 200

    try:
        wait_for(serves, 60, f"the newcomer's uWSGI on {base}", 0.2)
        check_the_page_and_its_static_client(base)
        with WebSocketClient(f"ws://127.0.0.1:{port}/ws/?channel=news:headlines") as ws:
            assert json.loads(ws.recv())["type"] == "subscribed"
            publisher = HttpSession(base)
            publisher.request("GET", "/")  # the CSRF cookie
            status, _, body = publisher.post_csrf("/headlines", {"title": "Hello, newcomer"})
            assert status == 200, body
            message = json.loads(ws.recv())
            assert message == {
                "type": "message",
                "channel": "news:headlines",
                "id": json.loads(body)["id"],
                "data": {"title": "Hello, newcomer"},
            }
            check_the_page_in_chromium(base, ws)
        check_the_handlers_with_a_token(base, port, editor)
        var = project / "var"
        daemons = [int((var / name).read_text()) for name in ("redis.pid", "upstream.pid")]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert "SIGINT/SIGTERM received" in log_path.read_text()
    wait_for(lambda: not processes_of(project), 10, "every process of the newcomer's project to exit")
    for pid in daemons:
        assert not running(pid), f"daemon {pid} outlived uWSGI"


def check_the_page_and_its_static_client(base: str) -> None:
    status, _, page = HttpSession(base).request("GET", "/")
    assert status == 200
    (script,) = re.findall(rb'src="(/static/offload/offload[^"]*\.js)"', page)
    status, headers, body = HttpSession(base).request("GET", script.decode())
    assert status == 200
    assert b"OffloadClient" in body
    # served by uWSGI's static-map (the library's options), with the library's security headers
    assert headers.get("X-Content-Type-Options") == "nosniff"


def check_the_page_in_chromium(base: str, ws: WebSocketClient) -> None:
    """The guide's page: offload.js connects, and a headline published from the page's form
    reaches both the page and the other subscriber."""
    assert Path(CHROMIUM).exists(), "Debian's chromium is required: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(base + "/")
            expect(page.locator("#state")).to_have_text("live", timeout=15000)
            page.fill("#title", "From the page")
            page.click("#send")
            expect(page.locator("#headlines li").last).to_have_text("From the page", timeout=10000)
        finally:
            browser.close()
    assert json.loads(ws.recv())["data"] == {"title": "From the page"}


def running(pid: int) -> bool:
    """Is ``pid`` a live process? (A zombie that nobody reaped yet is as good as gone.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def check_the_handlers_with_a_token(base: str, port: int, editor: tuple[str, str]) -> None:
    """The guide's publish hook and RPC method, on a connection opened with a token from the
    guide's view (no cookie); anonymous clients may read the comments but not publish."""
    channel = "comments:general"
    with pytest.raises(HandshakeError) as refused:
        WebSocketClient(f"ws://127.0.0.1:{port}/ws/?token=forged")
    assert refused.value.status == 401
    user = HttpSession(base, login_url="/admin/login/")
    user.login(*editor)
    status, _, token = user.request("GET", "/token")
    assert status == 200, token
    with (
        WebSocketClient(f"ws://127.0.0.1:{port}/ws/?channel={channel}") as reader,
        WebSocketClient(f"ws://127.0.0.1:{port}/ws/?token={token.decode()}") as writer,
    ):
        assert json.loads(reader.recv())["type"] == "subscribed"
        writer.send_text(
            json.dumps({"type": "publish", "channel": channel, "data": {"text": "  First!  "}, "ref": "p1"})
        )
        published = json.loads(writer.recv())
        assert published == {"type": "published", "ref": "p1", "channel": channel, "id": published["id"]}
        message = json.loads(reader.recv())
        assert (message["id"], message["data"]) == (published["id"], {"id": 1, "author": editor[0], "text": "First!"})
        writer.send_text(json.dumps({"type": "publish", "channel": channel, "data": {"text": " "}, "ref": "p2"}))
        refusal = json.loads(writer.recv())
        assert (refusal["type"], refusal["code"], refusal["ref"]) == ("error", "empty_comment", "p2")
        writer.send_text(json.dumps({"type": "rpc", "method": "comments.recent", "data": channel, "ref": "r1"}))
        assert json.loads(writer.recv()) == {
            "type": "reply",
            "ref": "r1",
            "data": [{"id": 1, "author": editor[0], "text": "First!"}],
        }
        reader.send_text(
            json.dumps({"type": "publish", "channel": channel, "data": {"text": "anonymous"}, "ref": "a1"})
        )
        refusal = json.loads(reader.recv())
        assert (refusal["type"], refusal["code"]) == ("error", "publish_forbidden")


def processes_of(project: Path) -> list[str]:
    """Command lines of running processes that name the project's directory (uWSGI, its
    workers and spooler, the upstream gate, redis-embedded and redis-server)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(project) in cmdline or cwd.startswith(str(project)):
            found.append(f"{entry.name}: {cmdline}")
    return found
