"""Start and stop one Channels anchor server; standard library only (the orchestrator imports it).

The server runs under ``bench/.venv-channels`` (``requirements-channels.txt``),
one process and one event loop, to compare with one uWSGI worker; it speaks
the part of ``docs/protocol.md`` the load client uses. Every start gets its
own channel-layer prefix, so group members left in the shared Redis by an
earlier run cannot slow this one down. Worth knowing when reading results:
the core layer drops whole broadcasts, silently, once 100 group messages wait
for one server process (``capacity``); the pubsub layer never drops, its
per-socket queues grow instead.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = HERE.parent / ".venv-channels" / "bin" / "python"
#: every setup the comparison runs, in a stable order: ``<server>-<layer>``
COMBINATIONS = ("uvicorn-pubsub", "uvicorn-core", "daphne-pubsub", "daphne-core")
LAYER_NAMES = {"core": "RedisChannelLayer", "pubsub": "RedisPubSubChannelLayer"}


class ChannelsServer:
    """One Django Channels server: ``combo`` is ``<daphne|uvicorn>-<core|pubsub>``."""

    host = "127.0.0.1"
    api_key = "bench-key"
    python = PYTHON

    def __init__(self, combo: str, redis_url: str, log_path: Path) -> None:
        self.server, self.layer = combo.split("-")
        if self.server not in ("daphne", "uvicorn") or self.layer not in LAYER_NAMES:
            raise ValueError(f"unknown Channels setup {combo!r}; known: {', '.join(COMBINATIONS)}")
        self.redis_url, self.log_path = redis_url, log_path
        self.name = f"channels-{combo}"
        self.label = f"Channels 4 + {self.server} + {LAYER_NAMES[self.layer]}"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.prefix = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 30.0) -> ChannelsServer:
        """Spawn it on a free port; return once its sync view answers. Raises with the log's tail."""
        if not self.python.exists():
            venv = "python3 -m venv bench/.venv-channels && bench/.venv-channels/bin/pip install -r"
            raise RuntimeError(f"{self.python} missing: {venv} bench/requirements-channels.txt")
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.prefix = f"asgi-{secrets.token_hex(4)}-"  # stale group members of an earlier run cost nothing
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(API_KEY=self.api_key, CHANNELS_PREFIX=self.prefix, PYTHONUNBUFFERED="1")
        argv = [str(self.python), str(HERE / "run.py"), self.server, self.layer, str(self.port), self.redis_url]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.name} on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/probe/", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError(f"{self.name} did not start; log {self.log_path}:\n{self.log_path.read_text()[-3000:]}")

    def close(self) -> None:
        """SIGTERM, then SIGKILL after 10 s: only the process we started."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
