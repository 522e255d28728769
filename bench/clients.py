"""Load clients as subprocesses of the bench venv, spoken to in JSON lines.

The orchestrator writes commands (``{"cmd": ...}``) to a client's stdin and
reads events (``{"event": ...}``) from its stdout; the client's stderr goes
to a log file. If the orchestrator dies, the client sees EOF on stdin and
exits; it also stops by itself at its own deadline, so no run can leave a
client behind.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import PROJECT_DIR


class ClientError(RuntimeError):
    pass


class ClientProcess:
    """``<bench python> -m bench.loadclient <role> <config json>``."""

    def __init__(self, python: str, role: str, config: dict, log_path: Path) -> None:
        self.role = role
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [python, "-m", "bench.loadclient", role, json.dumps(config)],
            cwd=PROJECT_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the orchestrator, which stops us in order
        )
        log.close()
        self.events: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{role}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "garbage", "line": line.decode(errors="replace")[:500]})
        self.events.put({"event": "exit"})

    def send(self, cmd: str, **fields) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ClientError(f"{self.role} client is gone ({exc}); log: {self.log_path}\n{self.log_tail()}") from exc

    def wait(self, event: str, timeout: float, tick: Callable[[dict | None], None] | None = None) -> dict:
        """The next ``event`` (others are passed to ``tick``); ``tick(None)`` runs every 0.2 s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=0.2)
            except queue.Empty:
                if tick:
                    tick(None)
                continue
            if item.get("event") == event:
                return item
            if item.get("event") in ("exit", "error"):
                raise ClientError(f"{self.role} client failed: {item}; log: {self.log_path}\n{self.log_tail()}")
            if tick:
                tick(item)
        raise ClientError(f"{self.role} client: no {event!r} within {timeout:.0f} s; log: {self.log_path}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def close(self, timeout: float = 15) -> None:
        """Ask it to stop (closing stdin), then TERM, then KILL: only this pid."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the client's own way out
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        self._reader.join(2)
