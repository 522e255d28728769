"""Presence: what "who is online" costs, side by side with presence off in the same run.
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``presence``."""

from __future__ import annotations

import json
import time
from functools import partial

import redis

from offload.testing import tcp_connections, wait_for

from .. import report
from ..harness import SERVER_ENV, Bench, backlog, raise_nofile
from ..stats import median_merge, ratio, summarize_us

PREFIX = "PRESENCE_"
KNOBS = dict(storm=(10000, 1000), repeats=(2, 1), queries=(1000, 200), seconds=(3.0, 2.0), closes=(20, 5))
KNOBS.update(coalesce=(0.5, 0.5))
MODES = {"off": "public", "on": "crowd", "quiet": "quiet"}  # namespaces: the same but for presence (bench/settings.py)
TITLES = {"off": "presence off", "on": "presence on", "quiet": "presence on, no join/leave events"}
SETTINGS = "bench.settings"


def run(bench: Bench, k: dict) -> dict:
    nofile, runs, at_scale = raise_nofile(), {mode: [] for mode in MODES}, None
    with backlog(2 * k["storm"]) as (sysctls, listen):
        env = {**SERVER_ENV, "UWSGI_LISTEN": str(listen), "DJANGO_SETTINGS_MODULE": SETTINGS}
        env.update(OFFLOAD_PRESENCE_GRACE="0", OFFLOAD_PRESENCE_COALESCE=str(k["coalesce"]))
        env["OFFLOAD_MAX_MESSAGES_PER_SECOND"] = "1000000"  # queries back to back from one socket
        server = bench.server("ours", env)
        meter = bench.meter(server)
        storm(bench, k, server, meter, "on", "warm-up", False)  # a cold worker's first storm costs more
        for rep in range(k["repeats"]):
            for mode in MODES if rep % 2 == 0 else list(MODES)[::-1]:  # alternate: no order bias
                scale = at_scale is None and mode == "on"
                figures, scaled = storm(bench, k, server, meter, mode, rep, scale)
                runs[mode].append(figures)
                at_scale = scaled or at_scale
        leave = leaves(bench, k, server)
    summary = {mode: median_merge(r) for mode, r in runs.items()}
    out = {"rlimit_nofile": nofile, "uwsgi_listen": listen, "backlog_sysctls": sysctls, "runs": runs}
    return {**out, "summary": summary, "at_scale": at_scale, "leave": leave, "verdict": {}}  # no target: figures


def storm(bench: Bench, k: dict, server, meter, mode: str, rep: int | str, scale: bool) -> tuple[dict, dict | None]:
    """``storm`` sockets at once on a fresh channel (CPU until every one is a member); with ``scale`` the figures
    at that many members too. Returns once the server closed them all (and they left)."""
    used = redis.Redis.from_url(server.redis_url).info("memory")["used_memory"]
    channel, scaled = f"{MODES[mode]}:storm-{rep}", None
    bench.step(f"[presence {mode}] connect storm: {k['storm']:,} sockets on {channel}")
    settled = partial(_wait_count, server, channel, k["storm"]) if mode != "off" else lambda: None
    with bench.scope():
        _, info = bench.storm(server, f"{mode}-{rep}", k["storm"], meter, settled, channel=channel)
        if scale:
            scaled = queries(bench, k, server, channel, used)
    bench.step(f"[presence {mode}] waiting for the server to close them")
    busy = ("ESTABLISHED", "CLOSE_WAIT")
    wait_for(lambda: not any(c.state in busy for c in tcp_connections(server.port)), 120, "the sockets closed")
    if mode != "off":
        _wait_count(server, channel, 0)
    return info, scaled


def queries(bench: Bench, k: dict, server, channel: str, used_before: int) -> dict:
    """At ``storm`` members: Redis memory per member, and the latency of each kind of query."""
    bench.step(f"[presence on] memory and queries at {k['storm']:,} members")
    r, n = redis.Redis.from_url(server.redis_url), k["storm"]
    keys = r.scan_iter(match=f"*p:{{{channel}}}:*", count=1000)  # the channel's hash tag: all its keys
    usage = {key.decode().rsplit(":", 1)[1]: r.memory_usage(key, samples=0) for key in keys}
    out = {"by_key_b": {key: round(b / n, 1) for key, b in sorted(usage.items())}}
    out.update(keys=len(usage), memory_usage_b=round(sum(usage.values()) / n, 1))
    out["used_memory_delta_b"] = round((r.info("memory")["used_memory"] - used_before) / n, 1)
    with server.live.ws_client("/ws/") as ws:
        for limit in (100, 0):
            page = _members(ws, channel, limit)
            if page["count"] != n or len(page["members"]) != limit:
                raise RuntimeError(f"members of {channel}: count {page['count']}, {len(page['members'])} listed")
            us = [_timed(_members, ws, channel, limit) for _ in range(k["queries"])]
            out[f"ws_page_{limit}"] = summarize_us(us)
    how = {"call": "presence_count", "settings": SETTINGS, "channel": channel, "concurrency": 1}
    pub = bench.publisher(server, "presence-count", **how, seconds=k["seconds"], first=0)
    pub.send("go")
    out["python_count"] = pub.wait("result", k["seconds"] + 60)["latency"]
    bench.stop(pub)
    return out


def leaves(bench: Bench, k: dict, server) -> dict:
    """``closes`` sockets of one channel close one by one; an observer there times each one's ``leave``."""
    bench.step(f"[presence on] {k['closes']} sockets closing one by one, an observer timing the leaves")
    path, us = "/ws/?channel=crowd:leave", []
    with server.live.ws_client(path) as observer:
        closers = [server.live.ws_client(path) for _ in range(k["closes"])]
        _next(observer, lambda m: m.get("count") == k["closes"] + 1)  # everyone joined, the observer too
        for ws in closers:
            started = time.perf_counter_ns()
            ws.close()
            event = _next(observer, lambda m: m.get("leaves"))
            us.append((time.perf_counter_ns() - started) // 1000)
            if len(event["leaves"]) != 1:
                raise RuntimeError(f"one socket closed, but the presence event says {event}")
    return summarize_us(us)


def _timed(call, *args) -> int:
    started = time.perf_counter_ns()
    call(*args)
    return (time.perf_counter_ns() - started) // 1000


def _next(ws, wanted, kind: str = "presence") -> dict:
    """The next message of ``kind`` that is ``wanted`` (the others are skipped); an error raises."""
    while (message := json.loads(ws.recv(30)))["type"] != kind or not wanted(message):
        if message["type"] == "error":
            raise RuntimeError(f"presence: {message}")
    return message


def _members(ws, channel: str, limit: int) -> dict:
    ws.send_text(json.dumps({"type": "members", "channel": channel, "limit": limit}))
    return _next(ws, lambda m: True, "members")


def _wait_count(server, channel: str, n: int) -> None:
    with server.live.ws_client("/ws/") as ws:
        wait_for(lambda: _members(ws, channel, 0)["count"] == n, 120, f"{n:,} members in {channel}", 0.1)


CPU = {"worker": "server", "Redis": "Redis"}  # row name: the CPU group
STORM_ROWS = [(f"connect {q} (ms)", lambda s, q=q: s["connect_ms"][q]) for q in ("p50", "p90", "p99", "max")]
STORM_ROWS.append(("all connected (s)", lambda s: s["connect_s"]))
STORM_ROWS.append(("retries", lambda s: sum(s["connect_errors"].values())))
STORM_ROWS += [(f"{g} CPU per connect (ms)", lambda s, k=k: s["ms_per_connect"][k]) for g, k in CPU.items()]
QUERIES = {"`members`, page of 100": "ws_page_100", "`members`, count only (limit 0)": "ws_page_0"}
QUERIES["`offload.presence_count()` (Python)"] = "python_count"
TEXT = """one uWSGI worker (gevent), embedded Redis; connect storms of {storm} sockets at once from two client processes
on a fresh channel: presence off (`public`), on (`crowd`, each anonymous socket a member) and on without join/leave
events (`quiet`), order alternating, {repeats} of each (medians); CPU from the first connect until every socket is a
member."""
AT_SCALE = """**At {storm} members**: Redis {memory_usage_b} bytes per member (`MEMORY USAGE` of the channel's {keys}
presence keys, per key: {by_key}; `used_memory` grew {used_memory_delta_b} bytes per member). Queries one after the
other ({queries} websocket queries each, round trip from a blocking client; `presence_count()` for {seconds} s):"""
LEAVE = """**Socket closed -> `leave` seen by another socket of the channel** (`OFFLOAD_PRESENCE_GRACE=0`, coalescing
window {coalesce} s): median {p50} ms, p90 {p90} ms, max {max} ms over {n} closes (clean close frames)."""


def markdown(results: dict) -> str:
    k, s, scale = results["knobs"], results["summary"], results["at_scale"]
    lines = [*report.heading(results, "Presence benchmark", report.fill(TEXT, k))]
    columns = [(TITLES[mode], lambda get, mode=mode: get(s[mode])) for mode in MODES]
    columns.append(("on / off", lambda get: ratio(get(s["on"]), get(s["off"]))))
    lines += [report.grid("connect storm", STORM_ROWS, columns), ""]
    lines += [report.fill(AT_SCALE, k, **scale, by_key=str(scale["by_key_b"])), ""]
    rows = [[name, *(report.cell(scale[key][q]) for q in ("p50", "p99", "max"))] for name, key in QUERIES.items()]
    lines += [report.table(["query", "p50 ms", "p99 ms", "max ms"], rows), ""]
    lines.append(report.fill(LEAVE, k, **results["leave"]))
    return "\n".join([*lines, *report.closing(results)]) + "\n"  # no verdict: the warnings, if any


def plot(results: dict) -> dict:
    s = {f"ours, {TITLES[mode]}": results["summary"][mode] for mode in MODES}
    panels = [report.cdf("connect time (to subscribed)", {n: x["connect_ms"] for n, x in s.items()})]
    panels.append(report.bars_of("worker CPU per connect", "ms", s, lambda x: x["ms_per_connect"]["server"], log=False))
    return {"title": f"presence {results['started']}: {results['knobs']['storm']:,} sockets at once", "panels": panels}


def warnings(results: dict) -> list[str]:
    out = []
    for mode, runs in results["runs"].items():
        for number, r in enumerate(runs, 1):
            if (other := r["cpu"]["groups"]["other"]["core_pct"]) > 20:
                out.append(f"presence {mode} storm {number}: other processes used {other:.0f}% of a core (noisy box)")
    return out
