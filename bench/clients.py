"""Helper processes of a run, spoken to in JSON lines: load clients and publishers.

The orchestrator writes commands (``{"cmd": ...}``) to a process's stdin and
reads events (``{"event": ...}``) from its stdout; its stderr goes to a log
file. If the orchestrator dies, the process sees EOF on stdin and exits; a
load client also stops by itself at its deadline, so no run can leave one
behind.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

from .config import PROJECT_DIR


class ClientError(RuntimeError):
    pass


class Process:
    """``argv`` run from the project directory; ``label`` names its CPU group in the reports."""

    def __init__(self, argv: list[str], label: str, log_path: Path) -> None:
        self.label, self.log_path = label, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), PYTHONUNBUFFERED="1")
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        with open(log_path, "ab") as log:  # a new session: Ctrl-C reaches the orchestrator, which stops us in order
            self.proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env=env, stderr=log, start_new_session=True, **pipes)
        self.events: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{label}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "garbage", "line": line.decode(errors="replace")[:500]})
        self.events.put({"event": "exit"})

    def send(self, cmd: str, **fields) -> None:
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise ClientError(f"{self.label} is gone ({exc}); log {self.log_path}:\n{self.log_tail()}") from exc

    def wait(self, event: str, timeout: float) -> dict:
        """The next ``event`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if item.get("event") == event:
                return item
            if item.get("event") in ("exit", "error", "garbage"):
                raise ClientError(f"{self.label} failed: {item}; log {self.log_path}:\n{self.log_tail()}")
        raise ClientError(f"{self.label}: no {event!r} within {timeout:.0f} s; log {self.log_path}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """EOF on stdin (its own way out), then TERM, then KILL: only this pid."""
        if self.proc.poll() is None:
            with suppress(OSError):
                self.proc.stdin.close()
            end(self.proc)
        self._reader.join(2)


def end(proc: subprocess.Popen, steps=((None, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5))) -> None:
    """Each step's signal (None: none), then up to its seconds for ``proc`` to exit: only this pid."""
    for action, seconds in steps:
        if proc.poll() is not None:
            return
        if action is not None:
            proc.send_signal(action)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(seconds)
