"""One server under test, started as the integration tests start it (``offload.testing.LiveServer``), so the bench
measures the shipped configuration; and what /proc says of processes: memory, and CPU per group (on a shared 2-core
box a latency means little unless we know who burnt the CPU meanwhile: "other" is the rest of the machine). Processes
are found from the master's pid and the Redis pidfile, never by name: other uWSGI instances run on this machine."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from offload.testing import LiveServer

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of one process and all its threads, seconds; None if gone. stime is the kernel's
    share: on loopback a socket write also pays for the receiver's TCP input."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (scans /proc: ``children`` files are not always there)."""
    parent_of: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parent_of.items() if parent in frontier]
        found.extend(frontier)
    return found


def end(proc: subprocess.Popen, steps=((None, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5))) -> None:
    """Each step's signal (None: none), then up to its seconds for ``proc`` to exit: only this pid."""
    for action, seconds in steps:
        if proc.poll() is not None:
            return
        if action is not None:
            proc.send_signal(action)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(seconds)


class CpuMeter:
    """Snapshots of CPU seconds per group (``groups``: name -> the group's pids *now*, processes come and go);
    ``delta`` gives a window's usage."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def snapshot(self) -> dict:
        pids = {name: {pid: cpu for pid in get() if (cpu := process_cpu(pid))} for name, get in self.groups.items()}
        with open("/proc/stat") as f:  # the whole machine's busy CPU seconds since boot, all cores
            values = [int(v) for v in f.readline().split()[1:]]
        machine = (sum(values[:8]) - values[3] - values[4]) / _TICK  # minus idle and iowait
        return {"t": time.monotonic(), "machine": machine, "pids": pids}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        """CPU seconds, % of one core and kernel seconds per group between two snapshots."""
        wall, ours, out = max(1e-9, after["t"] - before["t"]), 0.0, {}
        for name, now in after["pids"].items():
            then = before["pids"].get(name, {})
            was = {pid: then.get(pid, (0.0, 0.0)) for pid in now}  # a process first seen now counts from zero
            user = sum(max(0.0, cpu[0] - was[pid][0]) for pid, cpu in now.items())
            kernel = sum(max(0.0, cpu[1] - was[pid][1]) for pid, cpu in now.items())
            ours += user + kernel
            out[name] = {"cpu_s": round(user + kernel, 2), "core_pct": round(100 * (user + kernel) / wall, 1)}
            out[name]["sys_s"] = round(kernel, 2)
        total = after["machine"] - before["machine"]
        other = max(0.0, total - ours)
        out["other"] = {"cpu_s": round(other, 2), "core_pct": round(100 * other / wall, 1)}
        return {"wall_s": round(wall, 2), "groups": out, "machine_pct": round(100 * total / (wall * os.cpu_count()), 1)}


def rss_kib(pid: int | None) -> int | None:
    """Resident memory of one process (KiB), None if it is gone."""
    try:
        return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    except (OSError, TypeError):
        return None


def tree_kib(pids: list[int]) -> int | None:
    """Resident memory of several processes (KiB; shared pages count in each), None if none is left."""
    return sum(filter(None, map(rss_kib, pids))) or None


def make_file(path: Path, size_mb: int) -> Path:
    """A file of ``size_mb`` MiB of incompressible bytes (written once per run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(2**20) * size_mb)
    return path


class BenchServer:
    """A LiveServer with the bench's environment; ``downloads`` are linked into ``files/downloads/``."""

    host, name, label = "127.0.0.1", "ours", "ours (one uWSGI worker)"

    def __init__(self, var_dir: Path, env: dict[str, str], downloads: list[Path], log_copy: Path) -> None:
        var_dir.mkdir(parents=True, exist_ok=True)
        self.live = LiveServer(var_dir, env=env)
        if "OFFLOAD_INLINE" not in env:  # never inherit "offloading disabled" by accident
            self.live.env.pop("OFFLOAD_INLINE", None)
        self.var_dir, self.downloads, self.log_copy = var_dir, list(downloads), log_copy
        self.port, self.api_key, self.redis_url = self.live.port, self.live.api_key, self.live.redis_url

    def start(self) -> BenchServer:
        self.live.prepare()
        self.live.manage("create_demo_users")  # the demo's users (password "demo"), whatever prepare() runs
        (target := self.var_dir / "files" / "downloads").mkdir(parents=True, exist_ok=True)
        for source in self.downloads:
            try:
                os.link(source, target / source.name)
            except OSError:
                shutil.copyfile(source, target / source.name)
        settings = self.live.env.get("DJANGO_SETTINGS_MODULE")  # the ini sets the demo's: ours goes after it
        self.live.start(extra_args=("--env", f"DJANGO_SETTINGS_MODULE={settings}") if settings else ())
        return self

    def close(self) -> None:
        """Stop uWSGI and its Redis (by pid), then keep the uWSGI log."""
        self.live.stop()
        if self.live.log_path.exists():
            self.log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.live.log_path, self.log_copy)

    @property
    def pid(self) -> int | None:
        """The (first) worker: what the scenarios measure."""
        return next(iter(self.pids("worker")), None)

    def login(self, username: str = "alice") -> dict:
        """Cookies, CSRF token and personal channel of a logged-in demo user."""
        session = self.live.http()
        session.login(username, "demo")
        match = re.search(rb"user:(\d+)", session.request("GET", "/rooms/general/")[2])
        if not match:
            raise RuntimeError("could not find the user's channel on /rooms/general/")
        cookie, csrf = session.cookie_header(), session.cookie("csrftoken") or ""
        return {"cookie": cookie, "csrftoken": csrf, "user_channel": f"user:{match[1].decode()}"}

    def tree(self) -> list[int]:
        """The whole uWSGI tree (master, worker, spoolers, gate), not Redis (it serves the anchors too)."""
        redis = set(self.pids("redis"))
        return [pid for pid in descendants(self.live.proc.pid) if pid not in redis] if self.live.proc else []

    def pids(self, role: str) -> list[int]:
        """pids of ``master``, ``worker``, ``spooler`` (by process title under our master) or ``redis``."""
        if role == "redis":
            try:
                return descendants(int((self.var_dir / "redis.pid").read_text()))
            except (FileNotFoundError, ValueError):
                return []
        found = []
        for pid in descendants(self.live.proc.pid) if self.live.proc else []:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if f"uWSGI {role}".encode() in title.replace(b"\0", b" "):
                found.append(pid)
        return found

    def counters(self) -> dict:
        """Figures from uWSGI's stats server worth comparing across a window."""
        try:
            stats = self.live.stats()
        except OSError as exc:
            return {"error": str(exc)}
        workers = stats.get("workers", [])
        out = {key: stats.get(key) for key in ("listen_queue", "listen_queue_errors")}
        out["offloaded_requests"] = sum(c.get("offloaded_requests", 0) for w in workers for c in w.get("cores", []))
        out["requests"] = sum(w.get("requests", 0) for w in workers)
        out["spooler_processes"] = len(self.pids("spooler"))
        return {**out, "worker_rss_mb": round(sum(rss_kib(w["pid"]) or 0 for w in workers if w.get("pid")) / 2**10, 1)}
