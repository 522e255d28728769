"""Many channels: 10,000 websockets over 1,000 channels on one worker; Channels 4 as anchor.

One uWSGI worker (gevent, embedded Redis, ``offload.testing.LiveServer``,
the fan-out scenario's environment) and, in the same run against the same
Redis with the same load client, Django Channels 4 setups of
``bench/channels_anchor``. Subscriber ``i`` listens on ``public:mc-<i % C>``
(``bench/spread.py``): 10 sockets per channel at full scale, so the worker's
hub holds 1,000 Redis subscriptions and each message reaches a handful of
sockets (rooms, documents, per-user feeds) instead of one large broadcast.

1. ours: connect all subscribers (connect time; worker RSS before/after:
   memory per socket), then a fixed-rate window: ``rate`` messages/s on
   *every* channel, published round robin by a separate process exactly as
   ``offload.publish()`` does (``bench/redis_publisher.py``: EVALSHA of
   ``offload/lua/publish.lua``), then optionally the same rate through the
   HTTP publish API (``bench.loadclient.httppub``, open loop);
2. each Channels setup (daphne/uvicorn x RedisChannelLayer/RedisPubSubChannelLayer,
   at the same scale: 10,000 sockets connect in 13-19 s): the same subscribers, then the same fixed-rate
   window published by ``channel_layer.group_send`` from a separate process
   (``bench/channels_anchor/publisher.py``: what a Channels view or task
   calls), and optionally through its HTTP publish view.

Per window: latency of every delivery (arrival - publish time), deliveries/s
by arrival, lost/duplicate per subscriber (a backlog is waited for, up to
``drain`` seconds, before counting), CPU of server, client, Redis and
publisher from /proc.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..channels_anchor.server import ChannelsServer
from ..clients import ClientProcess
from ..config import BenchConfig
from ..progress import Progress
from ..report import cell, latency_cells, table, verdict_table, warning_lines
from . import _many
from .fanout import rss_kib

NAME = "manychannels"


def knobs(cfg: BenchConfig | None = None) -> dict:
    env = os.environ
    small = cfg is not None and cfg.scale == "small"
    subscribers = int(env.get("BENCH_MC_SUBSCRIBERS", 1000 if small else 10000))
    channels = int(env.get("BENCH_MC_CHANNELS", 100 if small else 1000))
    rate_per_channel = float(env.get("BENCH_MC_RATE", 1))
    return {
        "subscribers": subscribers,
        "channels": channels,
        "rate_per_channel": rate_per_channel,
        "seconds": float(env.get("BENCH_MC_SECONDS", 5 if small else 10)),
        # one worker answers only ~450 HTTP publishes/s to 10-socket channels flat out (about 1 ms of CPU each,
        # plus the deliveries): a quarter of the Redis window's rate keeps this window below saturation
        "api_rate": float(env.get("BENCH_MC_API_RATE", rate_per_channel * channels / 4)),
        "api_seconds": float(env.get("BENCH_MC_API_SECONDS", 5 if small else 10)),
        "connect_concurrency": int(env.get("BENCH_MC_CONNECT_CONCURRENCY", 200)),
        "drain": float(env.get("BENCH_MC_DRAIN", 20)),
        "anchors": [
            x
            for x in env.get("BENCH_MC_ANCHORS", "uvicorn-pubsub,uvicorn-core,daphne-pubsub,daphne-core").split(",")
            if x
        ],
        "anchor_subscribers": int(env.get("BENCH_MC_ANCHOR_SUBSCRIBERS", subscribers)),
        "anchor_api": env.get("BENCH_MC_ANCHOR_API", "0") == "1",
    }


def _total_rate(k: dict) -> float:
    return k["rate_per_channel"] * k["channels"]


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    k = knobs(cfg)
    connect = 4 + k["subscribers"] / 500
    ours = [("start", 6.0), ("connect", connect), ("window", k["seconds"] + 3)]
    if k["api_seconds"]:
        ours.append(("api window", k["api_seconds"] + 3))
    ours.append(("stop", 4.0))
    anchor = [("start", 4.0), ("connect", 4 + k["anchor_subscribers"] / 500), ("window", k["seconds"] + k["drain"])]
    if k["anchor_api"] and k["api_seconds"]:
        anchor.append(("api window", k["api_seconds"] + k["drain"]))
    anchor.append(("stop", 5.0))
    return ours + anchor * len(k["anchors"]) + [("stop", 5.0)]


def _connect(
    cfg: BenchConfig, k: dict, name: str, host: str, port: int, pid: int, n: int, logs: Path, progress: Progress
) -> tuple[ClientProcess, dict]:
    """The subscribers, connected; connect time and the server's RSS before/after."""
    rss0 = rss_kib(pid)
    subs = _many.subscribers(
        cfg, name, host, port, n, k["channels"], logs, connect_concurrency=k["connect_concurrency"]
    )
    ready = subs.wait("ready", 60 + n / 20, lambda _: progress.draw())
    time.sleep(2)
    rss1 = rss_kib(pid)
    return subs, {
        "sockets": n,
        "channels": k["channels"],
        "connect_s": ready["connect_s"],
        "connect_errors": ready["connect_errors"],
        "idle_rss": {
            "before_kib": rss0,
            "after_kib": rss1,
            "per_socket_kib": round((rss1 - rss0) / n, 2) if rss0 and rss1 else None,
        },
    }


def run_ours(cfg: BenchConfig, k: dict, work: Path, logs: Path, progress: Progress):
    server, worker, procs, meter = _many.start_ours(work, progress)
    redis_url = _many.redis_url_of(server)
    out: dict = {"label": "ours (one uWSGI worker)"}
    rate = _total_rate(k)
    with _many.ours_running(server, procs, logs):
        progress.step(f"[ours] connecting {k['subscribers']:,} over {k['channels']:,} channels")
        subs, connected = _connect(cfg, k, "ours", server.host, server.port, worker, k["subscribers"], logs, progress)
        procs["subs"] = subs
        out.update(connected)
        out["counters"] = server.counters()
        windows: dict[str, dict] = {}
        progress.step(f"[ours] {rate:,.0f} publishes/s over {k['channels']:,} channels (Redis publisher)")
        pub = _many.redis_publisher(redis_url, rate, k["seconds"], 0, k["channels"], logs / "ours-publisher.log")
        windows["redis"] = _many.oneshot_window(pub, subs, meter, procs, progress, k, "redis", k["seconds"])
        first = windows["redis"]["publisher"]["first"] + windows["redis"]["publisher"]["count"]
        if k["api_seconds"]:
            progress.step(f"[ours] {k['api_rate']:,.0f} publishes/s through the HTTP API")
            target = ("ours", server.host, server.port, server.live.api_key)
            windows["api"] = _many.http_window(
                cfg, target, subs, meter, procs, progress, logs, k, "api", k["api_seconds"],
                first=first, rate=k["api_rate"],
            )  # fmt: skip
        _many.collect(subs, windows, out, progress, "[ours]")
    return out, server


def run_anchor(cfg: BenchConfig, k: dict, combo: str, redis_url: str, logs: Path, progress: Progress) -> dict:
    srv, layer = combo.split("-")
    anchor = ChannelsServer(srv, layer, redis_url, api_key="bench-key", log_path=logs / f"channels-{combo}.log")
    label = f"[{anchor.name}]"
    progress.step(f"{label} starting")
    anchor.start()
    procs: dict[str, object] = {}
    meter = _many.meter(lambda: [anchor.pid] if anchor.pid else [], lambda: _REDIS_PIDS, procs)
    out: dict = {"label": anchor.label}
    rate = _total_rate(k)
    n = k["anchor_subscribers"]
    try:
        progress.step(f"{label} connecting {n:,} over {k['channels']:,} channels")
        subs, connected = _connect(cfg, k, anchor.name, anchor.host, anchor.port, anchor.pid, n, logs, progress)
        procs["subs"] = subs
        out.update(connected)
        windows: dict[str, dict] = {}
        progress.step(f"{label} {rate:,.0f} group_send/s over {k['channels']:,} groups")
        pub = _many.channels_publisher(
            anchor, k["seconds"], 0, k["channels"], logs / f"channels-{combo}-publisher.log", rate=rate
        )
        windows["group_send"] = _many.oneshot_window(pub, subs, meter, procs, progress, k, "group_send", k["seconds"])
        if k["anchor_api"] and k["api_seconds"]:
            first = windows["group_send"]["publisher"]["first"] + windows["group_send"]["publisher"]["count"]
            progress.step(f"{label} {k['api_rate']:,.0f} publishes/s through its HTTP publish view")
            target = (anchor.name, anchor.host, anchor.port, anchor.api_key)
            windows["api"] = _many.http_window(
                cfg, target, subs, meter, procs, progress, logs, k, "api", k["api_seconds"],
                first=first, rate=k["api_rate"],
            )  # fmt: skip
        _many.collect(subs, windows, out, progress, label)
    finally:
        for p in procs.values():
            p.close()
        anchor.stop()
    return out


_REDIS_PIDS: list[int] = []


def run(cfg: BenchConfig, work: Path, logs: Path, progress: Progress) -> dict:
    nofile = _many.raise_nofile()  # 10,000 sockets in the server and in the client
    k = knobs(cfg)
    ours, server = run_ours(cfg, k, work, logs, progress)
    _REDIS_PIDS[:] = server.pids("redis")
    redis_url = _many.redis_url_of(server)
    anchors = _many.run_anchors(
        server, k["anchors"], lambda combo: run_anchor(cfg, k, combo, redis_url, logs, progress), progress, logs
    )
    results = {"scenario": NAME, "knobs": k, "rlimit_nofile": nofile, "ours": ours, "channels": anchors}
    results["comparison"] = compare(results)
    results["verdict"] = verdict(results)
    return results


# -- figures --------------------------------------------------------------


def _ok(results: dict) -> dict[str, dict]:
    return {c: a for c, a in results["channels"].items() if "windows" in a}


def compare(results: dict) -> dict:
    """Ours (Redis publisher window) against Channels' best setup (group_send window), at the same rate.

    Channels' best is the setup that delivered the most messages; CPU and memory
    ratios take the best value of any setup.
    """
    ours = results["ours"]["windows"]["redis"]
    ok = _ok(results)
    if not ok:
        return {}

    def delivered(c: str) -> tuple:
        b = ok[c]["windows"]["group_send"]["broadcast"]
        return (b.get("expected", 0) - b.get("lost", 0), -(b["p99"] or 1e12))

    # the setup that delivered the most (an overloaded core layer drops messages: a low p99 of what it kept is no win)
    best = max(ok, key=delivered)
    theirs = ok[best]["windows"]["group_send"]
    o, t = ours["broadcast"], theirs["broadcast"]

    def div(a, b):
        return round(a / b, 1) if a is not None and b else None

    cpu_best = min((a["windows"]["group_send"]["server_us_per_delivery"] or 1e12) for a in ok.values())
    rss_best = min((a["idle_rss"]["per_socket_kib"] or 1e12) for a in ok.values())
    return {
        "channels_best": best,
        "same_scale": ok[best]["sockets"] == results["ours"]["sockets"],
        "p50_ratio": div(t["p50"], o["p50"]),
        "p99_ratio": div(t["p99"], o["p99"]),
        "deliveries_ratio": div(o["deliveries_per_s"], t["deliveries_per_s"]),
        "cpu_ratio": div(cpu_best, ours["server_us_per_delivery"]),
        "channels_best_us_per_delivery": cpu_best,
        "rss_ratio": div(rss_best, results["ours"]["idle_rss"]["per_socket_kib"]),
        "channels_best_rss_kib": rss_best,
        "connect_ratio": div(ok[best]["connect_s"], results["ours"]["connect_s"]),
    }


def verdict(results: dict) -> dict:
    ours = results["ours"]
    w = ours["windows"]["redis"]["broadcast"]
    items = {
        f"p99, {ours['sockets']:,} sockets over {ours['channels']:,} channels (ms)": (w["p99"], "<=", 50),
        "lost + duplicate (Redis publisher window)": (w.get("lost", 0) + w.get("dup", 0), "<=", 0),
        "RSS per idle connection (KiB)": (ours["idle_rss"]["per_socket_kib"], "<=", 20),
    }
    out = {}
    for name, (value, op, target) in items.items():
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": value, "op": op, "target": target, "met": met}
    return out


# -- Markdown ---------------------------------------------------------------

HEAD = [
    "window",
    "sockets / channels",
    "publishes/s",
    "deliveries/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "lost / dup",
    "worst subscriber lost / dup",
    "server %core",
    "server µs/delivery",
    "client %core",
    "Redis %core",
    "publisher %core",
    "drain s",
]


def _row(title: str, setup: dict, w: dict) -> list[str]:
    b, cpu, pub = w["broadcast"], w["cpu"]["groups"], w["publisher"]
    achieved = pub.get("publishes_per_s") or (pub["count"] / pub["seconds"] if pub.get("seconds") else None)
    return [
        title,
        f"{setup['sockets']:,} / {setup['channels']:,}",
        cell(round(achieved, 1) if achieved else None),
        cell(b["deliveries_per_s"]),
        *latency_cells(b),
        f"{b.get('lost', '—')} / {b.get('dup', '—')}",
        f"{b.get('max_lost_per_subscriber', '—')} / {b.get('max_dup_per_subscriber', '—')}",
        cell(cpu["server"]["core_pct"]),
        cell(w.get("server_us_per_delivery")),
        cell(cpu["clients"]["core_pct"]),
        cell(cpu["Redis"]["core_pct"]),
        cell(cpu["publisher"]["core_pct"]),
        cell(w.get("drain_s")),
    ]


def markdown(results: dict) -> str:
    k, ours, anchors, cmp_ = results["knobs"], results["ours"], results["channels"], results["comparison"]
    rate = _total_rate(k)
    rows = [_row(f"ours, Redis publisher (offload.publish's path), {rate:,.0f}/s", ours, ours["windows"]["redis"])]
    api = k["api_rate"]
    if "api" in ours["windows"]:
        rows.append(_row(f"ours, HTTP publish API, {api:,.0f}/s (open loop)", ours, ours["windows"]["api"]))
    for combo, a in anchors.items():
        if "windows" not in a:
            rows.append([f"{combo}: FAILED ({a.get('error', '')[:160]})"] + [""] * (len(HEAD) - 1))
            continue
        rows.append(_row(f"{a['label']}, group_send from a process, {rate:,.0f}/s", a, a["windows"]["group_send"]))
        if "api" in a["windows"]:
            rows.append(_row(f"{a['label']}, HTTP publish view, {api:,.0f}/s", a, a["windows"]["api"]))
    mem_rows = []
    for a in [ours, *anchors.values()]:
        if "windows" in a:
            mem_rows.append(
                [
                    a["label"],
                    f"{a['sockets']:,}",
                    cell(a["connect_s"]),
                    cell(a["idle_rss"]["per_socket_kib"]),
                    str(a["connect_errors"] or "none"),
                ]
            )
    lines = [
        f"## Many channels, {results['started']}",
        "",
        f"`{results['command']}` on {results['machine']['cpus']} CPUs, commit {results['machine']['commit']}; "
        f"one uWSGI worker (gevent), embedded Redis shared with the Channels servers. Subscriber i listens on "
        f"`public:mc-<i % {k['channels']}>`; {k['rate_per_channel']:g} msg/s on every channel, round robin "
        f"({rate:,.0f} publishes/s), windows of {k['seconds']:g} s "
        f"(HTTP API: {api:,.0f}/s for {k['api_seconds']:g} s). "
        f"Latency = arrival - publish time of every delivery; lost/dup counted per subscriber after the backlog "
        f"drained (at most {k['drain']:g} s); CPU from /proc over the publisher's run.",
        "",
        table(HEAD, rows),
        "",
        table(["setup", "sockets", "connect time (s)", "RSS per socket (KiB)", "connect retries"], mem_rows),
        "",
    ]
    if cmp_:
        scale = "same scale" if cmp_["same_scale"] else "**different scales** (see sockets)"
        lines += [
            f"**Ratios** (ours / Channels' best setup, {cmp_['channels_best']}, same run, {scale}): "
            f"p50 {cell(cmp_['p50_ratio'], suffix='x')} lower, p99 {cell(cmp_['p99_ratio'], suffix='x')} lower, "
            f"deliveries/s {cell(cmp_['deliveries_ratio'], suffix='x')}; server CPU per delivery "
            f"{cell(cmp_['cpu_ratio'], suffix='x')} less (Channels' best {cell(cmp_['channels_best_us_per_delivery'])}"
            f" µs); memory per socket {cell(cmp_['rss_ratio'], suffix='x')} less (Channels' best "
            f"{cell(cmp_['channels_best_rss_kib'])} KiB); connect time {cell(cmp_['connect_ratio'], suffix='x')} "
            f"shorter.",
            "",
        ]
    lines += [f"uWSGI after connecting: {ours.get('counters')}.", ""]
    lines += [verdict_table(results["verdict"], "target (one worker)")]
    lines += warning_lines(results.get("warnings"))
    return "\n".join(lines) + "\n"


def warnings(results: dict) -> list[str]:
    out = []
    every = [(f"ours {n}", results["ours"], w) for n, w in results["ours"]["windows"].items()]
    every += [(f"{c} {n}", a, w) for c, a in _ok(results).items() for n, w in a["windows"].items()]
    k = results["knobs"]
    for where, setup, w in every:
        cpu = w["cpu"]["groups"]
        if w.get("disconnects", {}).get("count"):
            out.append(f"{where}: {w['disconnects']['count']} websockets closed {w['disconnects']['codes']}")
        if w["open_sockets"] < setup["sockets"]:
            out.append(f"{where}: only {w['open_sockets']:,} of {setup['sockets']:,} websockets open at the end")
        if cpu["clients"]["core_pct"] > 85:
            out.append(f"{where}: subscriber client at {cpu['clients']['core_pct']:.0f}% of a core: client-bound")
        if cpu["other"]["core_pct"] > 20:
            out.append(f"{where}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
        pub = w["publisher"]
        target = k["api_rate"] if where.endswith(" api") else _total_rate(k)
        achieved = pub["count"] / pub["seconds"] if pub.get("seconds") else 0
        if achieved < 0.95 * target:
            out.append(f"{where}: publisher reached {achieved:,.0f} of {target:,.0f} publishes/s")
        if pub.get("failed"):
            out.append(f"{where}: {len(pub['failed'])} publishes failed {pub.get('statuses') or pub.get('errors')}")
        if w.get("drain_s", 0) >= k["drain"]:
            out.append(f"{where}: backlog still arriving after {k['drain']:g} s: late deliveries count as lost")
    for c, a in results["channels"].items():
        if "error" in a:
            out.append(f"{c}: failed: {a['error'][:300]}")
    if results["ours"].get("misrouted"):
        out.append(f"ours: {results['ours']['misrouted']} deliveries reached a socket of another channel")
    return out
