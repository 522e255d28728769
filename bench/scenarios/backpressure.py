"""Slow consumers: do clients that never read hurt the others, or the worker's memory?

One uWSGI worker (``fanout.SERVER_ENV``: gevent, embedded Redis, per-IP cap
lifted), ``fast`` picows subscribers on one channel, and big messages
(``payload`` bytes) published at ``rate``/s through the HTTP API. Two kinds
of window, alternating order, ``repeats`` times each, in the same run:

* ``baseline``: the fast subscribers only;
* ``stalled``: the same, plus ``stalled`` raw websockets (separate process,
  small ``SO_RCVBUF``) that stop reading as soon as they are subscribed.
  ``returning`` of them read again shortly after the server must have hit
  their queue limit (inside its 2 s closing grace) to see the close frame;
  the others read only after the server closed its end.

The server writes to every socket without blocking and queues what a socket
cannot take; a queue over ``OFFLOAD_MAX_QUEUED_BYTES`` closes that socket
with 1008 "slow consumer" (``offload/connection.py``). Measured per window:
fast latency (every delivery), lost/duplicate, worker RSS sampled every
0.25 s, CPU per process group; per stalled socket: the bytes the server's
kernel holds for it and when the server closed its end (both from
``/proc/net/tcp``), and how its stream ends when it finally reads. The
server's own "stopped reading" / ping-timeout drops are counted in its log:
a socket closed earlier than those timers, without such a line, was closed
by the queue limit (1008).

Target: fast p99 in stalled windows within 1.5x of baseline (medians),
no fast delivery lost, every stalled socket closed, worker RSS bounded.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from ..clients import ClientProcess
from ..config import BenchConfig
from ..cpu import CpuMeter
from ..progress import Progress
from ..report import cell, latency_cells, table, verdict_table, warning_lines
from ..server import BenchServer
from ..stats import median_merge, ratio
from .fanout import SERVER_ENV, rss_kib

NAME = "backpressure"
CHANNEL = "public:backpressure"
TARGET = 1.5
#: worker RSS in a stalled window may exceed the baseline windows' max by what the queue limit lets one
#: stalled socket hold (queued frames are shared by all sockets) plus this much for the allocator (MiB)
RSS_SLACK_MIB = 4.0
#: the server's own log lines when it drops a socket by timer, not by the queue limit
TIMER_DROPS = {
    "stuck": re.compile(r"websocket peer stopped reading for"),
    "ping": re.compile(r"websocket peer did not answer a ping"),
}


def _queue_bytes(k: dict) -> int:
    """The worker's queue limit in bytes: ``queue`` messages of ``payload`` bytes and their envelope and frame."""
    return k["queue"] * (k["payload"] + 128)


def knobs(cfg: BenchConfig) -> dict:
    env, small = os.environ, cfg.scale == "small"
    return {
        "fast": int(env.get("BENCH_BACKPRESSURE_FAST", 100 if small else 1000)),
        "stalled": int(env.get("BENCH_BACKPRESSURE_STALLED", 10)),
        # of the stalled ones, how many read again once the server must have closed them (to see the code)
        "returning": int(env.get("BENCH_BACKPRESSURE_RETURNING", 5)),
        "seconds": float(env.get("BENCH_BACKPRESSURE_SECONDS", 20)),
        "repeats": int(env.get("BENCH_BACKPRESSURE_REPEATS", 1 if small else 2)),
        "rate": float(env.get("BENCH_BACKPRESSURE_RATE", 20)),
        "payload": int(env.get("BENCH_BACKPRESSURE_PAYLOAD", 16384)),
        "queue": int(env.get("BENCH_BACKPRESSURE_QUEUE", 50)),
        "rcvbuf": int(env.get("BENCH_BACKPRESSURE_RCVBUF", 4096)),
        "warmup": float(env.get("BENCH_BACKPRESSURE_WARMUP", 3)),
        "pause": float(env.get("BENCH_BACKPRESSURE_PAUSE", 2)),
    }


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    k = knobs(cfg)
    windows = [("window", k["seconds"] + k["pause"] + 1.5)] * (2 * k["repeats"])
    return [("start", 6.0), ("connect", 2 + k["fast"] / 250), ("warmup", k["warmup"] + 1), *windows, ("stop", 5.0)]


class RssSampler:
    """The worker's VmRSS every ``period`` s on a thread: ``[[seconds from start, MiB], ...]``."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.pid, self.period = pid, period
        self.samples: list[list[float]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def now(self) -> float:
        """Seconds since the sampler started (to mark events on its timeline)."""
        return round(time.monotonic() - self.started, 2)

    def _run(self) -> None:
        while True:
            kib = rss_kib(self.pid)
            if kib is not None:
                self.samples.append([self.now(), round(kib / 1024, 2)])
            if self._stop.wait(self.period):
                return

    def start(self) -> RssSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        values = [v for _, v in self.samples]
        return {
            "start_mib": values[0] if values else None,
            "max_mib": max(values) if values else None,
            "end_mib": values[-1] if values else None,
            "samples": self.samples,
        }


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "min": values[0] if values else None,
        "median": round(statistics.median(values), 2) if values else None,
        "max": values[-1] if values else None,
    }


def _ending(r: dict) -> str:
    """How a stalled socket's stream ended when it read again: ``1008 slow consumer``, ``no close frame``."""
    d = r["drain"]
    if d is None:
        return "not read"
    if d["close_code"] is None:
        return f"no close frame ({d['ended']})"
    return f"{d['close_code']} {d['close_reason']}".strip()


def _stalled_figures(reports: list[dict], wanted: int, seconds: float) -> dict:
    """What happened to the stalled sockets of one window."""
    dropped = [r for r in reports if r["dropped_s"] is not None and r["dropped_s"] <= seconds + 1]
    tx = [r["server_tx_queue_max"] for r in reports]
    return {
        "wanted": wanted,
        "subscribed": len(reports),
        "returning": sum(r["returning"] for r in reports),
        "closed_by_server": len(dropped),
        "closed_after_s": _spread([r["dropped_s"] for r in dropped]),
        "kernel_full_after_s": _spread([r["kernel_full_s"] for r in reports if r["kernel_full_s"] is not None]),
        "close_frame_after_s": _spread([r["close_frame_s"] for r in reports if r["close_frame_s"] is not None]),
        "server_kernel_bytes_max": max(tx) if tx else None,
        "server_kernel_bytes_total": sum(tx),
        "ending_never": dict(Counter(_ending(r) for r in reports if not r["returning"])),
        "ending_returning": dict(Counter(_ending(r) for r in reports if r["returning"])),
    }


def _window(ctx: dict, name: str, kind: str, k: dict, progress: Progress) -> dict:
    fast, stalled, meter, server = ctx["fast"], ctx["stalled"], ctx["meter"], ctx["server"]
    log_start = len(server.live.log_text())
    sampler = RssSampler(ctx["worker"]).start()
    fast.send("window", name=name, seconds=k["seconds"], rate=k["rate"])
    fast.wait("window_started", 30)
    ctx["marks"].append([name, kind, ctx["run_rss"].now()])
    before = meter.snapshot()
    out: dict = {"kind": kind}
    if kind == "stalled":
        stalled.send("stall", name=name, count=k["stalled"], returning=k["returning"])
        event = stalled.wait("stalled", 30)
        out["stalled_open"] = {k2: event[k2] for k2 in ("count", "returning", "errors", "rcvbuf")}
    ended = fast.wait("window_ended", k["seconds"] + 60, lambda _: progress.draw())
    ctx["marks"][-1].append(ctx["run_rss"].now())
    after = meter.snapshot()
    out["rss"] = sampler.stop()
    out["cpu"] = CpuMeter.delta(before, after)
    out["fast_open_at_end"] = ended["open_sockets"]
    if kind == "stalled":
        stalled.send("release")
        released = stalled.wait("released", 60)
        reports = released["sockets"]
        out["stalled"] = _stalled_figures(reports, k["stalled"], k["seconds"])
        out["stalled"]["witness_messages"] = released["witness_messages"]
        out["stalled"]["sockets"] = reports
    log = server.live.log_text()[log_start:]
    out["server_timer_drops"] = {key: len(rx.findall(log)) for key, rx in TIMER_DROPS.items()}
    return out


def run(cfg: BenchConfig, work: Path, logs: Path, progress: Progress) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    k = knobs(cfg)
    env = {**SERVER_ENV, "OFFLOAD_MAX_QUEUED_BYTES": str(_queue_bytes(k))}
    server = BenchServer(work / "var", env)
    fast = stalled = None
    windows: dict[str, dict] = {}
    progress.step("starting uWSGI (1 worker)")
    try:
        server.start()
        worker = server.pids("worker")[0]
        base = {"host": server.host, "port": server.port, "channel": CHANNEL, "deadline_s": 900}
        fast = ClientProcess(
            cfg.client_python,
            "backpressure",
            {
                **base,
                "api_key": server.live.api_key,
                "subscribers": k["fast"],
                "payload": k["payload"],
                "connect_concurrency": 100,
            },
            logs / "fast-client.log",
        )
        # a returning socket reads again this many messages after its server-side kernel buffer filled:
        # the queue limit plus about half a second, well inside the server's 2 s closing grace
        resume_after = k["queue"] + max(3, round(k["rate"] / 2))
        stalled = ClientProcess(
            cfg.client_python,
            "stalled",
            {**base, "rcvbuf": k["rcvbuf"], "resume_after": resume_after},
            logs / "stalled-client.log",
        )
        meter = CpuMeter(
            {
                "server": lambda: [worker],
                "Redis": lambda: server.pids("redis"),
                "fast client": lambda: [fast.pid],
                "stalled client": lambda: [stalled.pid],
                "orchestrator": lambda: [os.getpid()],
            }
        )
        run_rss = RssSampler(worker, 0.5)
        ctx = {"fast": fast, "stalled": stalled, "meter": meter, "server": server, "worker": worker}
        ctx.update(run_rss=run_rss, marks=[])
        progress.step(f"connecting {k['fast']} fast subscribers")
        rss_idle = rss_kib(worker)
        ready = fast.wait("ready", 180, lambda _: progress.draw())
        progress.step(f"warm-up: {k['rate']:g} x {k['payload'] // 1024} KiB messages/s")
        fast.send("window", name="warmup", seconds=k["warmup"], rate=k["rate"])
        fast.wait("window_ended", k["warmup"] + 60, lambda _: progress.draw())
        time.sleep(1)
        run_rss.start()
        for rep in range(k["repeats"]):
            order = ("baseline", "stalled") if rep % 2 == 0 else ("stalled", "baseline")  # no order bias
            for kind in order:
                name = f"{kind}_{rep + 1}"
                extra = f" + {k['stalled']} that never read" if kind == "stalled" else ""
                progress.step(f"[{rep + 1}/{k['repeats']}] {kind}: {k['fast']} fast{extra}")
                windows[name] = _window(ctx, name, kind, k, progress)
                time.sleep(k["pause"])  # backlogs gone, the next window starts clean
        progress.step("stopping")
        rss_run = {**run_rss.stop(), "windows": ctx["marks"]}
        fast.send("stop")
        summary = fast.wait("summary", 120)
        stalled.send("stop")
    finally:
        for client in (fast, stalled):
            if client is not None:
                client.close()
        server.stop(log_copy=logs / "uwsgi.log")
    for name, w in windows.items():
        w.update(summary["windows"][name])
    results = {
        "scenario": NAME,
        "knobs": k,
        "server_env": env,
        "rlimit_nofile": [soft, hard],
        "connect_s": ready["connect_s"],
        "rss_idle_mib": round(rss_idle / 1024, 1) if rss_idle else None,
        "rss_run": rss_run,
        "windows": windows,
    }
    results["summary"] = summarize(results)
    results["verdict"] = verdict(results)
    return results


# -- figures --------------------------------------------------------------


def _of(results: dict, kind: str) -> list[dict]:
    return [w for w in results["windows"].values() if w["kind"] == kind]


def summarize(results: dict) -> dict:
    out = {}
    for kind in ("baseline", "stalled"):
        ws = _of(results, kind)
        if not ws:
            continue
        fast = median_merge(
            [{q: w["broadcast"][q] for q in ("p50", "p90", "p99", "p999", "max", "deliveries_per_s")} for w in ws]
        )
        out[kind] = {
            "windows": len(ws),
            "fast": fast,
            "lost": sum(w["broadcast"]["lost"] for w in ws),
            "dup": sum(w["broadcast"]["dup"] for w in ws),
            "fast_disconnects": sum(w["disconnects"]["count"] for w in ws),
            "publish_p99": median_merge([w["publish"]["p99"] for w in ws]),
            "client_lag_p99": median_merge([w["client_loop_lag"]["p99"] for w in ws]),
            "rss_max_mib": median_merge([w["rss"]["max_mib"] for w in ws]),
            "rss_end_mib": median_merge([w["rss"]["end_mib"] for w in ws]),
            "rss_growth_mib": max(w["rss"]["end_mib"] - w["rss"]["start_mib"] for w in ws),
            "cpu": median_merge([{g: v["core_pct"] for g, v in w["cpu"]["groups"].items()} for w in ws]),
            "timer_drops": sum(sum(w["server_timer_drops"].values()) for w in ws),
        }
        if kind == "stalled":
            st = [w["stalled"] for w in ws]
            every = [r for s in st for r in s["sockets"]]

            def all_of(field: str, sockets=every) -> dict:
                return _spread([r[field] for r in sockets if r[field] is not None])

            out[kind]["stalled"] = {
                "wanted": sum(s["wanted"] for s in st),
                "returning": sum(s["returning"] for s in st),
                "closed_by_server": sum(s["closed_by_server"] for s in st),
                "closed_after_s": all_of("dropped_s"),
                "kernel_full_after_s": all_of("kernel_full_s"),
                "close_frame_after_s": all_of("close_frame_s"),
                "server_kernel_mib_total": round(max(s["server_kernel_bytes_total"] for s in st) / 2**20, 1),
                "server_kernel_mib_max": round(max(s["server_kernel_bytes_max"] or 0 for s in st) / 2**20, 2),
                "ending_never": dict(sum((Counter(s["ending_never"]) for s in st), Counter())),
                "ending_returning": dict(sum((Counter(s["ending_returning"]) for s in st), Counter())),
                "groups": {},
            }
            limit = results["knobs"]["seconds"] + 1
            for group, returning in (("never read again", False), ("read again after the limit", True)):
                rs = [r for r in every if r["returning"] is returning]
                if rs:
                    out[kind]["stalled"]["groups"][group] = {
                        "count": len(rs),
                        "closed": sum(1 for r in rs if r["dropped_s"] is not None and r["dropped_s"] <= limit),
                        "kernel_full_after_s": all_of("kernel_full_s", rs),
                        "resumed_after_s": all_of("resumed_s", rs),
                        "close_frame_after_s": all_of("close_frame_s", rs),
                        "closed_after_s": all_of("dropped_s", rs),
                        "endings": dict(Counter(_ending(r) for r in rs)),
                    }
    ordered = list(results["windows"].values())
    if ordered:
        # memory that stays: the last window's peak against the first one's (same kinds alternate)
        out["rss_drift_mib"] = round(ordered[-1]["rss"]["max_mib"] - ordered[0]["rss"]["max_mib"], 1)
    if "baseline" in out and "stalled" in out:
        out["p99_ratio"] = ratio(out["stalled"]["fast"]["p99"], out["baseline"]["fast"]["p99"])
        out["p50_ratio"] = ratio(out["stalled"]["fast"]["p50"], out["baseline"]["fast"]["p50"])
        out["p99_ratio_per_repeat"] = [
            ratio(
                results["windows"][f"stalled_{r}"]["broadcast"]["p99"],
                results["windows"][f"baseline_{r}"]["broadcast"]["p99"],
            )
            for r in range(1, results["knobs"]["repeats"] + 1)
        ]
    return out


def verdict(results: dict) -> dict:
    s, k = results["summary"], results["knobs"]
    base, st = s.get("baseline", {}), s.get("stalled", {})
    sta = st.get("stalled", {})
    rss_excess = None
    if base.get("rss_max_mib") is not None and st.get("rss_max_mib") is not None:
        rss_excess = round(max(w["rss"]["max_mib"] for w in _of(results, "stalled")) - base["rss_max_mib"], 1)
    rss_bound = round(RSS_SLACK_MIB + k["queue"] * k["payload"] / 2**20, 1)
    timer = sum(w["server_timer_drops"]["stuck"] + w["server_timer_drops"]["ping"] for w in results["windows"].values())
    slow_consumer = sum(n for e, n in sta.get("ending_returning", {}).items() if e == "1008 slow consumer")
    items = {
        "fast p99, stalled / baseline (medians)": (s.get("p99_ratio"), "<=", TARGET),
        "fast deliveries lost + duplicate (all windows)": (
            base.get("lost", 0) + base.get("dup", 0) + st.get("lost", 0) + st.get("dup", 0),
            "<=",
            0,
        ),
        "fast sockets closed (all windows)": (base.get("fast_disconnects", 0) + st.get("fast_disconnects", 0), "<=", 0),
        "stalled sockets closed by the server within the window": (
            sta.get("closed_by_server"),
            ">=",
            sta.get("wanted", k["stalled"] * k["repeats"]),
        ),
        "returning stalled sockets that read close 1008 'slow consumer'": (
            slow_consumer if sta.get("returning") else None,
            ">=",
            sta.get("returning", 0),
        ),
        "worker RSS in stalled windows above the baseline max (MiB)": (rss_excess, "<=", rss_bound),
        "sockets dropped by the server's timers instead of the queue limit": (timer, "<=", 0),
    }
    out = {}
    for name, (value, op, target) in items.items():
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": value, "op": op, "target": target, "met": met}
    return out


# -- Markdown ---------------------------------------------------------------

HEAD = [
    "window",
    "fast p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "deliveries/s",
    "lost / dup",
    "publish API p99 ms",
    "worker RSS start / max / end MiB",
    "stalled closed by server",
    "closed after s (min / median / max)",
    "server %core",
    "fast client %core",
    "Redis %core",
    "other %core",
    "client lag p99 ms",
]


def _row(name: str, w: dict) -> list[str]:
    b, cpu, rss = w["broadcast"], w["cpu"]["groups"], w["rss"]
    st = w.get("stalled")
    closed = after = "—"
    if st:
        closed = f"{st['closed_by_server']} / {st['wanted']}"
        a = st["closed_after_s"]
        after = f"{cell(a['min'])} / {cell(a['median'])} / {cell(a['max'])}"
    return [
        name,
        *latency_cells(b),
        cell(b["deliveries_per_s"]),
        f"{b['lost']} / {b['dup']}",
        cell(w["publish"]["p99"]),
        f"{cell(rss['start_mib'])} / {cell(rss['max_mib'])} / {cell(rss['end_mib'])}",
        closed,
        after,
        cell(cpu["server"]["core_pct"]),
        cell(cpu["fast client"]["core_pct"]),
        cell(cpu["Redis"]["core_pct"]),
        cell(cpu["other"]["core_pct"]),
        cell(w["client_loop_lag"]["p99"]),
    ]


def markdown(results: dict) -> str:
    k, s = results["knobs"], results["summary"]
    rows = [_row(name, w) for name, w in results["windows"].items()]
    median_rows = []
    for kind in ("baseline", "stalled"):
        if kind in s:
            x = s[kind]
            median_rows.append(
                [
                    f"{kind} (median of {x['windows']})",
                    cell(x["fast"]["p50"]),
                    cell(x["fast"]["p99"]),
                    cell(x["fast"]["max"]),
                    f"{x['lost']} / {x['dup']}",
                    cell(x["rss_max_mib"]),
                    cell(x["rss_end_mib"]),
                    cell(x["cpu"]["server"]),
                ]
            )
    if "p99_ratio" in s:
        median_rows.append(
            [
                "**stalled / baseline**",
                cell(s["p50_ratio"], suffix="x"),
                f"**{cell(s['p99_ratio'], suffix='x')}**",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    sta = s.get("stalled", {}).get("stalled", {})
    lines = [
        f"## Slow-consumer benchmark, {results['started']}",
        "",
        f"`{results['command']}` on {results['machine']['cpus']} CPUs, commit {results['machine']['commit']}; "
        f"one uWSGI worker (gevent), embedded Redis, `OFFLOAD_MAX_QUEUED_BYTES={_queue_bytes(k)}` "
        f"({k['queue']} messages). "
        f"{k['fast']:,} fast subscribers on `{CHANNEL}`, {k['rate']:g} messages/s of {k['payload']:,} bytes "
        f"through `POST /api/publish/` ({k['rate'] * k['payload'] * k['fast'] / 2**20:,.0f} MiB/s to the fast "
        f"sockets); stalled windows add {k['stalled']} websockets (SO_RCVBUF {k['rcvbuf']}) that stop reading once "
        f"subscribed. Windows of {k['seconds']:g} s, baseline and stalled alternating, {k['repeats']} of each.",
        "",
        table(HEAD, rows),
        "",
        table(
            [
                "medians",
                "fast p50 ms",
                "fast p99 ms",
                "fast max ms",
                "lost / dup",
                "RSS max MiB",
                "RSS end MiB",
                "server %core",
            ],
            median_rows,
        ),
        "",
    ]
    if sta:
        groups = sta["groups"]

        def spread(g: dict, field: str) -> str:
            x = g[field]
            return "—" if x["median"] is None else f"{cell(x['min'])} / {cell(x['median'])} / {cell(x['max'])}"

        stalled_rows = [
            ["sockets", *(str(g["count"]) for g in groups.values())],
            ["closed by the server within the window", *(str(g["closed"]) for g in groups.values())],
            ["server kernel buffer full after s", *(spread(g, "kernel_full_after_s") for g in groups.values())],
            ["read again after s", *(spread(g, "resumed_after_s") for g in groups.values())],
            ["close frame read after s", *(spread(g, "close_frame_after_s") for g in groups.values())],
            ["server closed its end after s", *(spread(g, "closed_after_s") for g in groups.values())],
            [
                "how their stream ended",
                *(", ".join(f"{e}: {n}" for e, n in g["endings"].items()) for g in groups.values()),
            ],
        ]
        lines += [
            table(["stalled sockets, all stalled windows (min / median / max)", *groups], stalled_rows),
            "",
            f"Every stalled socket stops reading once subscribed. The server's kernel absorbs up to "
            f"{cell(sta['server_kernel_mib_max'])} MiB per socket ({cell(sta['server_kernel_mib_total'])} MiB for the "
            f"{k['stalled']} of a window: kernel memory, not worker RSS); then the worker queues {k['queue']} messages "
            f"({k['queue'] / k['rate']:g} s at {k['rate']:g}/s), closes with 1008 and drops the socket after its 2 s "
            f"closing grace. A client that never reads again cannot see that close frame (it is queued behind the "
            f"bytes it never read): its TCP stream just ends. Drops by the server's timers instead "
            f"(stopped reading / ping timeout, from its log) in stalled windows: {s['stalled']['timer_drops']}. "
            f"Worker RSS: idle {cell(results['rss_idle_mib'])} MiB before connecting; the last window's peak is "
            f"{cell(s.get('rss_drift_mib'))} MiB above the first one's.",
            "",
        ]
    lines += [verdict_table(results["verdict"], number="g")]
    lines += warning_lines(results.get("warnings"))
    return "\n".join(lines) + "\n"


def warnings(results: dict) -> list[str]:
    out = []
    for name, w in results["windows"].items():
        cpu = w["cpu"]["groups"]
        if w["disconnects"]["count"]:
            out.append(f"{name}: {w['disconnects']['count']} fast websockets closed {w['disconnects']['codes']}")
        if w["broadcast"]["lost"] or w["broadcast"]["dup"]:
            out.append(f"{name}: {w['broadcast']['lost']} lost, {w['broadcast']['dup']} duplicate fast deliveries")
        if cpu["fast client"]["core_pct"] > 85:
            out.append(f"{name}: the fast client used {cpu['fast client']['core_pct']:.0f}% of a core: client-bound")
        if cpu["other"]["core_pct"] > 20:
            out.append(f"{name}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
        if (w["client_loop_lag"]["p99"] or 0) > 20:
            out.append(f"{name}: the fast client's event loop lagged (p99 {w['client_loop_lag']['p99']} ms)")
        st = w.get("stalled")
        if st and st["subscribed"] < st["wanted"]:
            out.append(f"{name}: only {st['subscribed']} of {st['wanted']} stalled sockets subscribed")
        if st and st["closed_by_server"] < st["subscribed"]:
            out.append(f"{name}: {st['subscribed'] - st['closed_by_server']} stalled sockets still open at the end")
    return out
