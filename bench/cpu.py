"""CPU seconds per process group, read from /proc (no dependency).

The box is shared and has two cores: a latency figure means little unless we
also know who burnt the CPU meanwhile. Groups are e.g. the uWSGI worker,
Redis, each load client, and "other" (everything else on the machine, from
/proc/stat), so a client-bound or neighbour-disturbed run shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

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


class CpuMeter:
    """Snapshots of CPU seconds per group; ``delta`` gives a window's usage.

    ``groups`` maps a name to a callable returning the group's pids *now*
    (processes come and go between windows); a pid first seen in the later
    snapshot counts from zero.
    """

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
