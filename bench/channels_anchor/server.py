"""Start and stop one Channels anchor server; standard library only.

The harness runs under the project's ``.venv`` and imports this module; the
server itself runs under ``bench/.venv-channels`` (Django 5.2, Channels 4,
channels_redis, daphne, uvicorn), installed once per run with::

    python3 -m venv bench/.venv-channels
    bench/.venv-channels/bin/pip install -r bench/requirements-channels.txt

Usage from the harness::

    from bench.channels_anchor.server import ChannelsServer, COMBINATIONS

    redis_url = ...  # the same Redis the project under test uses, e.g. "unix:///.../redis.sock"
    for server, layer in COMBINATIONS:  # daphne/uvicorn x core/pubsub
        anchor = ChannelsServer(server, layer, redis_url, api_key="bench-key", log_path=logs / f"{server}-{layer}.log")
        anchor.start()  # free loopback port; returns once a websocket got its "subscribed"
        try:
            # the same load client as against uWSGI:
            #   anchor.host, anchor.port, anchor.ws_url, anchor.base_url
            #   channel "public:bench", api_key=anchor.api_key
            #   view probe path: ChannelsServer.PROBE_PATH ("/probe/", a sync Django view)
            #   CPU: anchor.pid is the only process (nothing forks)
            ...
        finally:
            anchor.stop()

What the anchor speaks (docs/protocol.md, the part the benchmark uses):

* ``GET /ws/?channel=C`` (Origin must be one of ALLOWED_HOSTS, as Channels'
  ``AllowedHostsOriginValidator`` wants; the load client sends it): first
  ``{"type":"subscribed","channel":C,"last_id":null,"recovered":true}``, then
  ``{"type":"message","channel":C,"id":ID,"data":DATA}`` per publish.
* ``POST /api/publish/<channel>`` with ``Authorization: Bearer <api_key>``
  and the JSON data as body: ``{"id": "<ms>-<seq>"}`` (200), 401, 400, 413.
* ``GET /probe/``: a small HTML page from a sync view.

One process, one event loop each (daphne: Twisted's asyncio reactor;
uvicorn: uvloop + httptools), to compare with one uWSGI worker. No access
log. Channel layers keep their library defaults.

Worth knowing when reading the results (``smoke.py`` checks all of this):

* Every start gets its own channel-layer prefix (``self.prefix``), so group
  members left in the shared Redis by an earlier run cannot slow this one.
* The core layer drops whole broadcasts, silently, once 100 group messages
  wait in Redis for one server process (``capacity`` 100): publishing faster
  than the process delivers loses messages. The pubsub layer never drops; its
  per-socket queues grow instead (latency and memory). Pass
  ``env={"CHANNELS_REDIS_LOG_LEVEL": "INFO"}`` to get channels_redis' "over
  capacity" lines in the log.
* A delivery costs the server roughly 100-300 us of CPU (one uWSGI worker:
  about 10-15 us), so one process tops out near 3,000-9,000 deliveries/s.
* ``subscribed`` always has ``"last_id": null`` (Channels keeps no history);
  the project sends the newest id when the channel has history.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run.py"
#: the venv made from bench/requirements-channels.txt
DEFAULT_PYTHON = HERE.parent / ".venv-channels" / "bin" / "python"
REQUIREMENTS = HERE.parent / "requirements-channels.txt"

SERVERS = ("daphne", "uvicorn")
LAYERS = ("core", "pubsub")
#: every combination the comparison runs, in a stable order
COMBINATIONS = tuple((server, layer) for server in SERVERS for layer in LAYERS)
LAYER_CLASSES = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def ws_first_message(host: str, port: int, path: str, timeout: float = 2.0) -> str:
    """Open a websocket, return the first text message, close. Raises on failure."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}:{port}\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request.encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during handshake: {head[:200]!r}")
            head += chunk
            if len(head) > 65536:
                raise ConnectionError("handshake reply too long")
        status_line = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status_line + b" ":
            raise ConnectionError(f"handshake refused: {status_line!r}")
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.settimeout(timeout)

        def take(n: int) -> bytes:
            nonlocal rest
            if len(rest) < n:
                rest += _recv_exactly(sock, n - len(rest))
            out, rest = rest[:n], rest[n:]
            return out

        while True:
            b0, b1 = take(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", take(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", take(8))
            payload = take(length)
            opcode = b0 & 0x0F
            if opcode == 0x1:  # text (the anchor never fragments its small replies)
                break
            if opcode == 0x8:
                raise ConnectionError(f"closed by server: {payload!r}")
            # pings and pongs: skip
        # a masked close frame (code 1000), then hang up
        mask = os.urandom(4)
        body = struct.pack("!H", 1000)
        sock.sendall(bytes([0x88, 0x80 | len(body)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
        return payload.decode()


class ChannelsServer:
    """One Django Channels server (daphne or uvicorn, core or pubsub layer).

    Args:
        server: ``"daphne"`` or ``"uvicorn"``.
        layer: ``"core"`` (RedisChannelLayer) or ``"pubsub"`` (RedisPubSubChannelLayer).
        redis_url: the run's Redis, e.g. ``unix:///path/redis.sock``.
        api_key: bearer key of the publish API.
        python: the channels venv's interpreter (default ``bench/.venv-channels/bin/python``).
        log_path: where the server's stdout/stderr go (default: a new temp dir).
        host: loopback address to listen on.
        uvicorn_ws: uvicorn's websocket implementation (``websockets-sansio``,
            uvicorn's own default; or the deprecated ``websockets``).
        backlog: listen queue of either server (LiveServer gives uWSGI 1024).
        ready_channel: the channel the readiness check subscribes to.
        env: extra environment for the server process.
    """

    PROBE_PATH = "/probe/"

    def __init__(
        self,
        server: str,
        layer: str,
        redis_url: str,
        api_key: str,
        *,
        python: str | Path | None = None,
        log_path: str | Path | None = None,
        host: str = "127.0.0.1",
        uvicorn_ws: str = "websockets-sansio",
        backlog: int = 1024,
        ready_channel: str = "public:bench",
        env: dict[str, str] | None = None,
    ) -> None:
        if server not in SERVERS:
            raise ValueError(f"server must be one of {SERVERS}, not {server!r}")
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
        self.server = server
        self.layer = layer
        self.redis_url = redis_url
        self.api_key = api_key
        self.python = Path(python) if python else DEFAULT_PYTHON
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="channels-anchor-")) / "server.log"
        self.host = host
        self.uvicorn_ws = uvicorn_ws
        self.backlog = backlog
        self.ready_channel = ready_channel
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.prefix: str | None = None  # the channel layer's Redis prefix, new at every start
        self._log_start = 0

    # --- what the harness reads ------------------------------------------
    @property
    def name(self) -> str:
        """``channels-<server>-<layer>``, e.g. ``channels-uvicorn-pubsub``."""
        return f"channels-{self.server}-{self.layer}"

    @property
    def label(self) -> str:
        """For reports: ``Channels 4 + daphne + RedisChannelLayer``."""
        return f"Channels 4 + {self.server} + {LAYER_CLASSES[self.layer].rsplit('.', 1)[1]}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The websocket endpoint without a query (add ``?channel=...``)."""
        return f"ws://{self.host}:{self.port}/ws/"

    def command(self, port: int) -> list[str]:
        cmd = [
            str(self.python), str(RUNNER),
            "--server", self.server,
            "--layer", self.layer,
            "--host", self.host,
            "--port", str(port),
            "--redis-url", self.redis_url,
            "--backlog", str(self.backlog),
        ]  # fmt: skip
        if self.server == "uvicorn":
            cmd += ["--uvicorn-ws", self.uvicorn_ws]
        return cmd

    # --- life cycle --------------------------------------------------------
    def start(self, timeout: float = 30.0, attempts: int = 3) -> ChannelsServer:
        """Spawn the server on a free port; return once a websocket is subscribed.

        Raises RuntimeError (with the log's tail) if it exits or is not ready
        within ``timeout`` s. A port taken between choosing and binding it is
        retried on another port.
        """
        if not self.python.exists():
            raise RuntimeError(
                f"{self.python} missing; the default one is made with: python3 -m venv {DEFAULT_PYTHON.parent.parent}"
                f" && {DEFAULT_PYTHON.parent / 'pip'} install -r {REQUIREMENTS}"
            )
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} already running (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["API_KEY"] = self.api_key  # by environment, not argv (ps shows argv)
        env["PYTHONUNBUFFERED"] = "1"
        # A fresh Redis prefix per start: stale group members of an earlier
        # run (stopped with sockets open) must not cost this run anything.
        self.prefix = f"asgi-{secrets.token_hex(4)}-"
        env["CHANNELS_PREFIX"] = self.prefix
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env.update(self.extra_env)
        for attempt in range(attempts):
            port = free_port(self.host)
            with open(self.log_path, "ab") as log:  # appended to: one log may hold several starts
                self._log_start = log.tell()
                log.write(f"--- {self.name} on {self.host}:{port}: {' '.join(self.command(port))}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.command(port),
                    cwd=HERE,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.port = port
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if attempt + 1 < attempts and "address already in use" in self.log_tail().lower():
                    continue
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        path = f"/ws/?channel={self.ready_channel}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                first = json.loads(ws_first_message(self.host, self.port, path, timeout=2.0))
                if first.get("type") == "subscribed":
                    return
                last_error = RuntimeError(f"unexpected first message {first}")
            except (OSError, ValueError) as exc:
                last_error = exc
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} not ready on port {self.port} after {timeout} s ({last_error!r}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; only the process we started. Returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def log_text(self) -> str:
        """What the server wrote since the last start (the log file is appended to)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> ChannelsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ChannelsServer {self.name} pid={self.pid} port={self.port}>"
