"""Servers ours is compared with, one process each on a free port (a fresh Redis key prefix per start, so an earlier
run's leftovers cost nothing): Django Channels 4 and Node.js. Each speaks the part of ``docs/protocol.md`` the load
client uses (``/ws/?channel=C``, ``subscribed``, ``message`` envelopes, ``POST /api/publish/<channel>``).

Worth knowing when reading Channels' results: the core layer drops whole broadcasts, silently, once 100 group
messages wait for one server process (``capacity``); the pubsub layer never drops, its per-socket queues grow.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from offload.testing import WaitTimeout, free_port, wait_for

from .server import descendants, end

NODE_DIR = Path(__file__).resolve().parent / "node"
CHANNELS_DIR = Path(__file__).resolve().parent / "channels_anchor"
#: the Node.js anchors: ``ws`` 8 and Socket.IO 4, each with an ioredis subscriber
NODE_ANCHORS = ("node-ws", "node-socketio")
#: every Channels setup the comparison runs, in a stable order: ``<server>-<layer>``
COMBINATIONS = ("uvicorn-pubsub", "uvicorn-core", "daphne-pubsub", "daphne-core")
LAYER_NAMES = {"core": "RedisChannelLayer", "pubsub": "RedisPubSubChannelLayer"}


class AnchorServer:
    """One anchor server: a subclass's ``argv()`` (given the port) run from ``cwd``; ``label`` names it in reports."""

    host, api_key, ws_path = "127.0.0.1", "bench-key", "/ws/?"
    cwd: Path

    def __init__(self, combo: str, redis_url: str, log_path: Path, label: str) -> None:
        self.name, self.redis_url, self.log_path, self.label = combo, redis_url, log_path, label
        self.proc: subprocess.Popen | None = None
        self.port, self.prefix = 0, ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def tree(self) -> list[int]:
        return descendants(self.pid) if self.pid else []

    def start(self, timeout: float = 30.0) -> AnchorServer:
        """Spawn it on a free port; return once its ``/probe/`` answers. Raises with the log's tail."""
        self.port, self.prefix = free_port(), f"asgi-{secrets.token_hex(4)}-"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(API_KEY=self.api_key, CHANNELS_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            how = {"stdin": subprocess.DEVNULL, "stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True}
            self.proc = subprocess.Popen(self.argv(), cwd=self.cwd, env=env, **how)
        try:
            wait_for(self._answers, timeout, f"{self.name} on port {self.port}", 0.1)
        except WaitTimeout as exc:
            self.close()
            raise RuntimeError(f"{exc}; log {self.log_path}:\n{self.log_path.read_text()[-3000:]}") from None
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"exited with {self.proc.returncode}")
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/probe/", timeout=2) as resp:
            return resp.status == 200

    def close(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: only the process we started."""
        proc, self.proc = self.proc, None
        if proc is not None:
            end(proc, ((signal.SIGTERM, 10), (signal.SIGKILL, 5)))


class NodeServer(AnchorServer):
    """``node-ws`` or ``node-socketio``: ``node/server.js`` under the distribution's node, the packages
    of ``node/package-lock.json`` (``npm ci --prefix bench/node``, which ``make bench`` runs)."""

    cwd = NODE_DIR

    def __init__(self, combo: str, redis_url: str, log_path: Path) -> None:
        self.kind = combo.removeprefix("node-")
        label = "Node.js ws 8 + ioredis" if self.kind == "ws" else "Node.js Socket.IO 4 + ioredis"
        super().__init__(combo, redis_url, log_path, label)
        if self.kind == "socketio":  # Engine.IO 4 straight over a websocket, no polling first
            self.ws_path = "/socket.io/?EIO=4&transport=websocket&"

    def argv(self) -> list[str]:
        if not (NODE_DIR / "node_modules").is_dir() or not shutil.which("node"):
            raise RuntimeError("Node.js anchors need node and `npm ci --prefix bench/node` (make bench runs it)")
        return ["node", str(NODE_DIR / "server.js"), self.kind, str(self.port), self.redis_url, self.prefix]


class ChannelsServer(AnchorServer):
    """``<daphne|uvicorn>-<core|pubsub>``: ``channels_anchor/`` under ``bench/.venv-channels``
    (``requirements-channels.txt``), one process and one event loop, to compare with one uWSGI worker."""

    python, cwd = CHANNELS_DIR.parent / ".venv-channels" / "bin" / "python", CHANNELS_DIR

    def __init__(self, combo: str, redis_url: str, log_path: Path) -> None:
        self.server, self.layer = combo.split("-")
        if self.server not in ("daphne", "uvicorn") or self.layer not in LAYER_NAMES:
            raise ValueError(f"unknown Channels setup {combo!r}; known: {', '.join(COMBINATIONS)}")
        label = f"Channels 4 + {self.server} + {LAYER_NAMES[self.layer]}"
        super().__init__(f"channels-{combo}", redis_url, log_path, label)

    def argv(self) -> list[str]:
        if not self.python.exists():
            venv = "python3 -m venv bench/.venv-channels && bench/.venv-channels/bin/pip install -r"
            raise RuntimeError(f"{self.python} missing: {venv} bench/requirements-channels.txt")
        return [str(self.python), str(CHANNELS_DIR / "run.py"), self.server, self.layer, str(self.port), self.redis_url]
