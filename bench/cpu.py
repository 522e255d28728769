"""CPU seconds per process group, read from /proc (no dependency).

The box is shared and has two cores: a latency figure means little unless we
also know who burnt the CPU meanwhile. Groups are e.g. the uWSGI worker, the
spoolers, Redis, each load client, and "other" (everything else on the
machine, from /proc/stat), so a client-bound or neighbour-disturbed run shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float | None:
    """utime + stime of one process (all its threads), seconds; None if gone."""
    split = process_cpu_split(pid)
    return None if split is None else split[0] + split[1]


def process_cpu_split(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of one process, seconds: stime is the kernel's share
    (on loopback a socket write also pays for the receiver's TCP input)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (scans /proc: ``children`` files are not always there)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
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


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _TICK


class CpuMeter:
    """Snapshots of CPU seconds per group; ``delta`` gives a window's usage.

    ``groups`` maps a name to a callable returning the group's pids *now*
    (processes come and go between windows: a load client starts late).
    A pid first seen in the later snapshot counts from zero.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def snapshot(self) -> dict:
        per_pid: dict[str, dict[int, float]] = {}
        sys_pid: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            per_pid[name], sys_pid[name] = {}, {}
            for pid in pids():
                split = process_cpu_split(pid)
                if split is not None:
                    per_pid[name][pid] = split[0] + split[1]
                    sys_pid[name][pid] = split[1]
        return {"t": time.monotonic(), "machine": machine_busy(), "pids": per_pid, "sys": sys_pid}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        """CPU seconds and % of one core per group between two snapshots."""
        wall = max(1e-9, after["t"] - before["t"])
        out: dict = {"wall_s": round(wall, 2), "groups": {}}
        ours = 0.0
        for name, now in after["pids"].items():
            then = before["pids"].get(name, {})
            used = sum(max(0.0, value - then.get(pid, 0.0)) for pid, value in now.items())
            sys_then = before.get("sys", {}).get(name, {})
            kernel = sum(max(0.0, v - sys_then.get(pid, 0.0)) for pid, v in after.get("sys", {}).get(name, {}).items())
            ours += used
            out["groups"][name] = {
                "cpu_s": round(used, 2),
                "core_pct": round(100 * used / wall, 1),
                "sys_s": round(kernel, 2),
            }
        other = max(0.0, after["machine"] - before["machine"] - ours)
        out["groups"]["other"] = {"cpu_s": round(other, 2), "core_pct": round(100 * other / wall, 1)}
        cores = os.cpu_count() or 1
        total = after["machine"] - before["machine"]
        out["machine_pct"] = round(100 * total / (wall * cores), 1)
        return out
