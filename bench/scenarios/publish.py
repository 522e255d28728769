"""Publish throughput, closed loop: ``offload.publish()`` and the HTTP API vs Channels' publish paths.

One uWSGI worker (the fan-out scenario's environment, embedded Redis) with
``subscribers`` websockets spread over ``channels`` channels
(``public:mc-<i % C>``, ``bench/spread.py``), so every publish is really
delivered; publish ``g`` goes to channel ``g % C``. Each path runs alone for
``seconds`` with ``concurrency`` callers, each calling again as soon as its
previous call returned:

a. ``offload.publish()`` from a Django process (``project.settings``,
   ``REDIS_URL`` = the server's Redis): greenlets after monkey-patching (as in
   the project's uWSGI views) and OS threads (``bench/offload_publisher.py``);
b. the worker's ``POST /api/publish/<channel>`` (bearer key), one connection
   per request (``bench.loadclient.httppub``);

and for each Channels 4 setup of ``bench/channels_anchor``, with the same
subscribers:

c. its publish view ``POST /api/publish/<channel>`` (an async view awaiting
   ``group_send``), the same HTTP client;
d. ``channel_layer.group_send`` called directly from an asyncio process
   (``bench/channels_anchor/publisher.py``).

Per path: publishes/s (calls that succeeded / time from the first call to
the last return), call latency (p50/p90/p99/max), and what the subscribers
saw (deliveries/s, delivery latency, lost/duplicate after the backlog
drained), CPU of server, Redis, publisher and subscriber client.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..channels_anchor.server import ChannelsServer
from ..config import BenchConfig
from ..progress import Progress
from ..report import cell, latency_cells, table, warning_lines
from . import _many

NAME = "publish"


def knobs(cfg: BenchConfig | None = None) -> dict:
    env = os.environ
    small = cfg is not None and cfg.scale == "small"
    return {
        "subscribers": int(env.get("BENCH_PUB_SUBSCRIBERS", 200 if small else 1000)),
        "channels": int(env.get("BENCH_PUB_CHANNELS", 200 if small else 1000)),
        "seconds": float(env.get("BENCH_PUB_SECONDS", 3 if small else 5)),
        "concurrency": int(env.get("BENCH_PUB_CONCURRENCY", 16)),
        "py_modes": [x for x in env.get("BENCH_PUB_PY_MODES", "gevent,threads").split(",") if x],
        "drain": float(env.get("BENCH_PUB_DRAIN", 20)),
        "anchors": [
            x
            for x in env.get("BENCH_PUB_ANCHORS", "uvicorn-pubsub,uvicorn-core,daphne-pubsub,daphne-core").split(",")
            if x
        ],
    }


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    k = knobs(cfg)
    window = k["seconds"] + 4
    connect = 3 + k["subscribers"] / 500
    ours = [("start", 6.0), ("connect", connect)] + [("offload.publish", window + 2)] * len(k["py_modes"])
    ours += [("HTTP API", window), ("collect", 3.0)]
    anchor = [("start", 4.0), ("connect", connect + 2), ("HTTP view", window + 8), ("group_send", window + 8)]
    return ours + anchor * len(k["anchors"]) + [("collect", 3.0), ("stop", 5.0)]


def _connect(cfg, k, name: str, host: str, port: int, logs: Path, progress: Progress):
    subs = _many.subscribers(cfg, name, host, port, k["subscribers"], k["channels"], logs)
    ready = subs.wait("ready", 60 + k["subscribers"] / 20, lambda _: progress.draw())
    return subs, {"sockets": k["subscribers"], "channels": k["channels"], "connect_s": ready["connect_s"]}


def _next_first(windows: dict) -> int:
    return max((w["publisher"]["first"] + w["publisher"]["count"] for w in windows.values()), default=0)


def run_ours(cfg: BenchConfig, k: dict, work: Path, logs: Path, progress: Progress):
    server, _, procs, meter = _many.start_ours(work, progress)
    redis_url = _many.redis_url_of(server)
    out: dict = {"label": "ours (one uWSGI worker)"}
    n, seconds = k["concurrency"], k["seconds"]
    with _many.ours_running(server, procs, logs):
        progress.step(f"[ours] connecting {k['subscribers']:,} over {k['channels']:,} channels")
        subs, connected = _connect(cfg, k, "ours", server.host, server.port, logs, progress)
        procs["subs"] = subs
        out.update(connected)
        windows: dict[str, dict] = {}
        for mode in k["py_modes"]:
            name = f"py_{mode}"
            progress.step(f"[ours] offload.publish() from {n} {'greenlets' if mode == 'gevent' else 'threads'}")
            pub = _many.offload_publisher(
                redis_url,
                work / "publisher-var",
                mode,
                n,
                seconds,
                _next_first(windows),
                k["channels"],
                logs / "ours-publisher.log",
            )
            windows[name] = _many.oneshot_window(pub, subs, meter, procs, progress, k, name, seconds)
        progress.step(f"[ours] HTTP publish API, {n} closed-loop streams")
        target = ("ours", server.host, server.port, server.live.api_key)
        windows["http"] = _many.http_window(
            cfg, target, subs, meter, procs, progress, logs, k, "http", seconds, first=_next_first(windows), streams=n
        )
        _many.collect(subs, windows, out, progress, "[ours]")
    return out, server


def run_anchor(cfg: BenchConfig, k: dict, combo: str, server, logs: Path, progress: Progress) -> dict:
    srv, layer = combo.split("-")
    redis_url = _many.redis_url_of(server)
    anchor = ChannelsServer(srv, layer, redis_url, api_key="bench-key", log_path=logs / f"channels-{combo}.log")
    label = f"[{anchor.name}]"
    progress.step(f"{label} starting")
    anchor.start()
    procs: dict[str, object] = {}
    meter = _many.meter(lambda: [anchor.pid] if anchor.pid else [], lambda: server.pids("redis"), procs)
    out: dict = {"label": anchor.label}
    n, seconds = k["concurrency"], k["seconds"]
    try:
        progress.step(f"{label} connecting {k['subscribers']:,}")
        subs, connected = _connect(cfg, k, anchor.name, anchor.host, anchor.port, logs, progress)
        procs["subs"] = subs
        out.update(connected)
        windows: dict[str, dict] = {}
        progress.step(f"{label} HTTP publish view, {n} closed-loop streams")
        target = (anchor.name, anchor.host, anchor.port, anchor.api_key)
        windows["http"] = _many.http_window(
            cfg, target, subs, meter, procs, progress, logs, k, "http", seconds, first=0, streams=n
        )
        progress.step(f"{label} group_send from a process, {n} concurrent callers")
        pub = _many.channels_publisher(
            anchor,
            seconds,
            _next_first(windows),
            k["channels"],
            logs / f"channels-{combo}-publisher.log",
            concurrency=n,
        )
        windows["group_send"] = _many.oneshot_window(pub, subs, meter, procs, progress, k, "group_send", seconds)
        _many.collect(subs, windows, out, progress, label)
    finally:
        for p in procs.values():
            p.close()
        anchor.stop()
    return out


def run(cfg: BenchConfig, work: Path, logs: Path, progress: Progress) -> dict:
    nofile = _many.raise_nofile()
    k = knobs(cfg)
    ours, server = run_ours(cfg, k, work, logs, progress)
    anchors = _many.run_anchors(
        server, k["anchors"], lambda combo: run_anchor(cfg, k, combo, server, logs, progress), progress, logs
    )
    results = {"scenario": NAME, "knobs": k, "rlimit_nofile": nofile, "ours": ours, "channels": anchors}
    results["comparison"] = compare(results)
    results["verdict"] = {}  # no target in the issue: the figures and ratios are the result
    return results


# -- figures --------------------------------------------------------------


def _rate(w: dict) -> float:
    return w["publisher"].get("publishes_per_s") or 0.0


def compare(results: dict) -> dict:
    """Ours / Channels' best, per kind of path: from Python (offload.publish vs group_send) and over HTTP."""
    ours = results["ours"]["windows"]
    ok = {c: a for c, a in results["channels"].items() if "windows" in a}
    out: dict = {}
    py = [n for n in ours if n.startswith("py_")]
    pairs = (("python", max(py, key=lambda n: _rate(ours[n])) if py else None, "group_send"), ("http", "http", "http"))
    for kind, ours_name, theirs_name in pairs:
        if not ours_name or not ok:
            continue
        best = max(ok, key=lambda c: _rate(ok[c]["windows"][theirs_name]))
        o, t = ours[ours_name], ok[best]["windows"][theirs_name]
        lo, lt = o["publisher"]["latency"], t["publisher"]["latency"]
        out[kind] = {
            "ours": ours_name,
            "channels_best": best,
            "ours_per_s": _rate(o),
            "channels_per_s": _rate(t),
            "throughput_ratio": round(_rate(o) / _rate(t), 2) if _rate(t) else None,
            # what the subscribers got while the publisher ran: a publish path faster than its server delivers
            # only builds a backlog
            "ours_deliveries_per_s": o["broadcast"]["deliveries_per_s"],
            "channels_deliveries_per_s": t["broadcast"]["deliveries_per_s"],
            "deliveries_ratio": round(o["broadcast"]["deliveries_per_s"] / t["broadcast"]["deliveries_per_s"], 2)
            if t["broadcast"]["deliveries_per_s"]
            else None,
            "p50_ratio": round(lt["p50"] / lo["p50"], 2) if lo["p50"] and lt["p50"] else None,
            "p99_ratio": round(lt["p99"] / lo["p99"], 2) if lo["p99"] and lt["p99"] else None,
        }
    return out


# -- Markdown ---------------------------------------------------------------

HEAD = [
    "path",
    "callers",
    "publishes/s",
    "call p50 ms",
    "call p90 ms",
    "call p99 ms",
    "call max ms",
    "failed",
    "deliveries/s",
    "delivery p50 ms",
    "delivery p99 ms",
    "lost / dup",
    "server %core",
    "Redis %core",
    "publisher %core",
    "subscriber client %core",
    "drain s",
]

TITLES = {
    "py_gevent": "offload.publish(), greenlets (gevent)",
    "py_threads": "offload.publish(), threads",
    "http": "HTTP publish API",
}
CHANNELS_TITLES = {"http": "HTTP publish view (async, group_send)", "group_send": "group_send from a process"}


def _row(title: str, n: int, w: dict) -> list[str]:
    pub, b, cpu = w["publisher"], w["broadcast"], w["cpu"]["groups"]
    lat = pub["latency"]
    return [
        title,
        str(n),
        cell(pub.get("publishes_per_s")),
        *latency_cells(lat),
        str(pub["count"] - pub["ok"]),
        cell(b["deliveries_per_s"]),
        cell(b["p50"]),
        cell(b["p99"]),
        f"{b.get('lost', '—')} / {b.get('dup', '—')}",
        cell(cpu["server"]["core_pct"]),
        cell(cpu["Redis"]["core_pct"]),
        cell(cpu["publisher"]["core_pct"]),
        cell(cpu["clients"]["core_pct"]),
        cell(w.get("drain_s")),
    ]


def markdown(results: dict) -> str:
    k, ours, anchors, cmp_ = results["knobs"], results["ours"], results["channels"], results["comparison"]
    n = k["concurrency"]
    rows = [_row(f"ours, {TITLES.get(name, name)}", n, w) for name, w in ours["windows"].items()]
    for combo, a in anchors.items():
        if "windows" not in a:
            rows.append([f"{combo}: FAILED ({a.get('error', '')[:160]})"] + [""] * (len(HEAD) - 1))
            continue
        rows += [_row(f"{a['label']}, {CHANNELS_TITLES[name]}", n, w) for name, w in a["windows"].items()]
    lines = [
        f"## Publish throughput, {results['started']}",
        "",
        f"`{results['command']}` on {results['machine']['cpus']} CPUs, commit {results['machine']['commit']}; "
        f"one uWSGI worker (gevent), embedded Redis shared with the Channels servers; {k['subscribers']:,} "
        f"websockets over {k['channels']:,} channels (`public:mc-<i>`), publishes round robin over them. Each path "
        f"runs alone for {k['seconds']:g} s with {n} callers in a closed loop (next call as soon as the previous "
        f"returned); publishes/s = successful calls / (first call to last return). Deliveries counted after the "
        f"backlog drained (at most {k['drain']:g} s).",
        "",
        table(HEAD, rows),
        "",
    ]
    names = {"python": "from Python (offload.publish() vs group_send)", "http": "over HTTP (API vs publish view)"}
    for kind, c in cmp_.items():
        lines.append(
            f"**Ratio {names[kind]}**: ours ({c['ours']}) {cell(c['ours_per_s'])}/s vs Channels' best "
            f"({c['channels_best']}) {cell(c['channels_per_s'])}/s = {cell(c['throughput_ratio'], suffix='x')} "
            f"the publishes/s; call latency p50 {cell(c['p50_ratio'], suffix='x')}, p99 "
            f"{cell(c['p99_ratio'], suffix='x')} (Channels / ours: above 1 = ours faster); deliveries/s while "
            f"publishing {cell(c['ours_deliveries_per_s'])} vs {cell(c['channels_deliveries_per_s'])} = "
            f"{cell(c['deliveries_ratio'], suffix='x')}."
        )
        lines.append("")
    lines += warning_lines(results.get("warnings"))
    return "\n".join(lines) + "\n"


def warnings(results: dict) -> list[str]:
    out = []
    every = [(f"ours {n}", results["ours"], w) for n, w in results["ours"]["windows"].items()]
    ok = {c: a for c, a in results["channels"].items() if "windows" in a}
    every += [(f"{c} {n}", a, w) for c, a in ok.items() for n, w in a["windows"].items()]
    for where, setup, w in every:
        cpu = w["cpu"]["groups"]
        if w.get("disconnects", {}).get("count"):
            out.append(f"{where}: {w['disconnects']['count']} websockets closed {w['disconnects']['codes']}")
        if w["open_sockets"] < setup["sockets"]:
            out.append(f"{where}: only {w['open_sockets']:,} of {setup['sockets']:,} websockets open at the end")
        if cpu["other"]["core_pct"] > 20:
            out.append(f"{where}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
        pub = w["publisher"]
        if pub["count"] - pub["ok"]:
            out.append(f"{where}: {pub['count'] - pub['ok']} calls failed {pub.get('statuses') or pub.get('errors')}")
        if w.get("drain_s", 0) >= results["knobs"]["drain"]:
            out.append(f"{where}: backlog still arriving after {results['knobs']['drain']:g} s: late = lost")
    for c, a in results["channels"].items():
        if "error" in a:
            out.append(f"{c}: failed: {a['error'][:300]}")
    return out
