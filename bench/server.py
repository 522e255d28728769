"""One server under test: var dir, uWSGI via LiveServer, a logged-in user, its pids.

The server is started exactly as the integration tests start it
(``offload.testing.LiveServer``: ``uwsgi --ini uwsgi.ini`` from the project's
.venv, its own var dir and embedded Redis, a free loopback port), so the
benchmark measures the shipped configuration, not a benchmark-only one. Only
environment overrides differ (``WORKERS``, ``OFFLOAD_INLINE``, ...).

Processes are found from the master's pid and the Redis pidfile, never by
name: other uWSGI instances titled "offload uWSGI ..." run on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from offload.testing import LiveServer

from .cpu import descendants


def make_file(path: Path, size_mb: int) -> Path:
    """A file of ``size_mb`` MiB of incompressible bytes (written once per run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(2**20)
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(block)
    return path


class BenchServer:
    """A LiveServer with the benchmark's environment and helpers.

    Args:
        var_dir: a fresh directory (database, static, Redis, spool, files).
        env: environment overrides, e.g. ``{"OFFLOAD_INLINE": "1"}``.
        downloads: files to hard-link (copy across filesystems) into
            ``<var_dir>/files/downloads/`` under their own names.
    """

    def __init__(self, var_dir: Path, env: dict[str, str], downloads: list[Path] = ()) -> None:
        var_dir.mkdir(parents=True, exist_ok=True)
        self.live = LiveServer(var_dir, env=env)
        if "OFFLOAD_INLINE" not in env:  # never inherit "offloading disabled" by accident
            self.live.env.pop("OFFLOAD_INLINE", None)
        self.var_dir = var_dir
        self.downloads = list(downloads)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.live.port

    def start(self) -> BenchServer:
        self.live.prepare()
        target_dir = self.var_dir / "files" / "downloads"
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in self.downloads:
            target = target_dir / source.name
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        self.live.start()
        return self

    def stop(self, log_copy: Path | None = None) -> None:
        """Stop uWSGI and its Redis (by pid), then keep the uWSGI log if asked."""
        self.live.stop()
        if log_copy is not None and self.live.log_path.exists():
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.live.log_path, log_copy)

    def login(self, username: str = "alice") -> dict:
        """Cookies, CSRF token and personal channel of a logged-in demo user."""
        session = self.live.http()
        session.login(username)
        _, _, body = session.request("GET", "/rooms/general/")
        match = re.search(rb"user:(\d+)", body)
        if not match:
            raise RuntimeError("could not find the user's channel on /rooms/general/")
        return {
            "cookie": session.cookie_header(),
            "csrftoken": session.cookie("csrftoken") or "",
            "user_channel": f"user:{match.group(1).decode()}",
        }

    # -- processes ----------------------------------------------------------

    def _tree(self) -> list[int]:
        return descendants(self.live.proc.pid) if self.live.proc else []

    def pids(self, role: str) -> list[int]:
        """pids of ``master``, ``worker``, ``spooler`` or ``redis`` (by process title under our master)."""
        if role == "redis":
            try:
                return descendants(int((self.var_dir / "redis.pid").read_text().strip()))
            except (FileNotFoundError, ValueError):
                return []
        found = []
        for pid in self._tree():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except FileNotFoundError:
                continue
            if f"uWSGI {role}" in title:
                found.append(pid)
        return found

    def counters(self) -> dict:
        """Figures from uWSGI's stats server worth comparing across a window."""
        try:
            stats = self.live.stats()
        except OSError as exc:
            return {"error": str(exc)}
        workers = stats.get("workers", [])
        return {
            "offloaded_requests": sum(c.get("offloaded_requests", 0) for w in workers for c in w.get("cores", [])),
            "requests": sum(w.get("requests", 0) for w in workers),
            "worker_rss_mb": round(sum(w.get("rss", 0) for w in workers) / 2**20, 1),
            "listen_queue": stats.get("listen_queue"),
            "listen_queue_errors": stats.get("listen_queue_errors"),
            "spooler_processes": len(self.pids("spooler")),
        }
