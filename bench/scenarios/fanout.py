"""Fan-out on one channel: latency, saturation, idle memory, connect storm; Channels 4 and Node.js as anchors.
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``fanout``."""

from __future__ import annotations

import statistics

from .. import report
from ..anchor import COMBINATIONS, NODE_ANCHORS
from ..harness import SERVER_ENV, Bench, backlog, raise_nofile
from ..report import cell
from ..stats import ratio

PREFIX = "FANOUT_"
KNOBS = dict(seconds=(10.0, 5.0), sat_seconds=(5.0, 3.0), rate=(5.0, 5.0), small=(1000, 200), small_clients=(2, 2))
KNOBS.update(large=(5000, 500), storm=(10000, 1000), sat_rates=([50, 100, 200, 300], [50, 100]))
KNOBS.update(channels_streams=(4, 4), anchors=([*COMBINATIONS, *NODE_ANCHORS],) * 2, metrics_off=(1, 1))
CHANNEL = "public:bench"


def run(bench: Bench, k: dict) -> dict:
    nofile = raise_nofile()  # uWSGI and the clients inherit the limit
    with backlog(2 * k["storm"]) as (sysctls, listen):
        server = bench.server("ours", {**SERVER_ENV, "UWSGI_LISTEN": str(listen)})
        ours = {**run_ours(bench, k, server), "backlog_sysctls": sysctls}
    results = {"rlimit_nofile": nofile, "uwsgi_listen": listen, "ours": ours}
    if k["metrics_off"]:
        with bench.scope():
            quiet = bench.server("ours-metrics-off", {**SERVER_ENV, "OFFLOAD_METRICS": "0"})
            quiet.name = "ours-metrics-off"
            results["metrics_off"] = {"windows": small_and_saturation(bench, k, quiet, bench.meter(quiet), {})}
    redis = server.pids("redis")
    results["anchors"] = bench.anchors(k["anchors"], server.redis_url, lambda a: run_anchor(bench, k, a, redis))
    results["comparison"] = compare(results)
    return {**results, "verdict": verdict_of(results)}


def small_and_saturation(bench: Bench, k: dict, server, meter, out: dict, streams: int = 0) -> dict:
    """``small`` sockets: the fixed-rate window, then the saturation steps or, with ``streams`` (a Channels setup,
    hundreds of times slower), one window of that many closed-loop HTTP publish streams; their windows (``out``:
    connect time and RSS)."""
    windows, name = {}, server.name
    with bench.scope():
        bench.step(f"[{name}] connecting {k['small']}")
        probe = bench.subscribers(server, f"{name}-small-probe", 0, channel=CHANNEL)  # API timings wait for none
        probe.wait("ready", 60)
        clients, info = bench.connect(server, f"{name}-small", k["small"], k["small_clients"], channel=CHANNEL)
        out.update(small_connect_s=info["connect_s"], small_rss=info["idle_rss"])
        clients.insert(0, probe)
        bench.step(f"[{name}] fan-out {k['small']} x {k['rate']:g}/s")
        windows["fanout_small"] = bench.window(meter, "fanout_small", clients, k["seconds"], http=probe, rate=k["rate"])
        if streams:
            bench.step(f"[{name}] saturation: {streams} publish streams")
            how = {"http": probe, "first": windows["fanout_small"]["next"], "streams": streams}
            windows["sat"] = bench.window(meter, "sat", clients, k["sat_seconds"], **how)
        for rate in [] if streams else k["sat_rates"]:
            bench.step(f"[{name}] saturation: a publisher process at {rate}/s x {k['small']} sockets")
            first = windows[list(windows)[-1]]["next"]
            windows[f"sat_{rate}"] = saturation(bench, k, server, meter, clients, rate, first)
        bench.collect(clients, windows)
    return windows


def run_ours(bench: Bench, k: dict, server) -> dict:
    meter, out = bench.meter(server), {}
    windows = small_and_saturation(bench, k, server, meter, out)  # 1. fixed rate, then saturation steps
    with bench.scope():  # 2. idle memory, fixed rate, one broadcast reaching all
        bench.step(f"[ours] connecting {k['large']} (idle RSS)")
        clients, info = bench.connect(server, "ours-large", k["large"], connect_concurrency=200, channel=CHANNEL)
        out.update(large_connect_s=info["connect_s"], idle_rss=info["idle_rss"])
        bench.step(f"[ours] fan-out {k['large']} x {k['rate']:g}/s")
        how = {"http": clients[0], "rate": k["rate"]}
        w = windows["fanout_large"] = bench.window(meter, "fanout_large", clients, k["seconds"], **how)
        # as many again on 10 channels each, the first ones still open (no freed memory to reuse)
        bench.step(f"[ours] connecting {k['large']} more on 10 channels each (idle RSS)")
        more = {"channel": "public:idle-10", "extra_channels": 9, "connect_concurrency": 200}
        ten, info = bench.connect(server, "ours-large-10", k["large"], **more)
        out["idle_rss_10"] = info["idle_rss"]
        bench.collect([*clients, *ten], {"fanout_large": w})
    with bench.scope():  # 3. connect storm, then a fixed-rate window over all of them
        bench.step(f"[ours] connect storm: {k['storm']} at once")
        clients, storm = bench.storm(server, "ours-storm", k["storm"], meter, channel=CHANNEL)
        storm["counters"], storm["server_ms_per_connect"] = server.counters(), storm["ms_per_connect"]["server"]
        bench.step(f"[ours] fan-out {k['storm']} x {k['rate']:g}/s (offload.publish())")
        pub = bench.publisher(server, "ours-storm", channel=CHANNEL, rate=k["rate"], seconds=k["seconds"], first=0)
        w = windows["fanout_storm"] = bench.window(meter, "fanout_storm", clients, k["seconds"], pub=pub)
        bench.collect(clients, {"fanout_storm": w})
    return {**out, "storm": storm, "windows": windows}


def saturation(bench: Bench, k: dict, server, meter, clients: list, rate: int, first: int) -> dict:
    """A publisher process (:meth:`Bench.publisher`: ``offload.publish()``, or Redis PUBLISH for a Node.js anchor)
    at ``rate``/s while the probe (``clients[0]``) keeps timing the HTTP API."""
    how = {"channel": CHANNEL, "rate": rate, "seconds": k["sat_seconds"], "first": first}
    pub = bench.publisher(server, f"{server.name}-sat-{rate}", **how)
    after = first + rate * int(k["sat_seconds"] + 1)  # the probe numbers its publishes after the publisher's
    how = {"pub": pub, "http": clients[0], "first": after, "rate": k["rate"]}
    w = bench.window(meter, f"sat_{rate}", clients, k["sat_seconds"], **how)
    return {**w, "drain_s": bench.drain(clients, 60)}  # the backlog is gone before the next step


def run_anchor(bench: Bench, k: dict, anchor, redis: list[int]) -> dict:
    """What ours runs first (:func:`small_and_saturation`): a Node.js anchor's publisher PUBLISHes on Redis; a
    Channels setup gets HTTP publish streams instead."""
    out, streams = {}, 0 if anchor.name in NODE_ANCHORS else k["channels_streams"]
    windows = small_and_saturation(bench, k, anchor, bench.meter(anchor, redis), out, streams)
    return {"connect_s": out["small_connect_s"], "idle_rss": out["small_rss"], "windows": windows}


def _best_sat(ours: dict) -> dict:
    """The saturation step with the most deliveries/s."""
    steps = [w for name, w in ours["windows"].items() if name.startswith("sat_")]
    return max(steps, key=lambda w: w["broadcast"]["deliveries_per_s"], default={})


def _figures(sat: dict, small: dict, rss: dict) -> dict:
    """What ours and each anchor are compared on: deliveries/s and server µs per delivery at saturation,
    p99 of the fixed-rate window with ``small`` sockets, RSS per idle socket at ``small`` sockets."""
    cpu, rss = sat["server_us_per_delivery"], rss["per_socket_kib"]
    return dict(deliveries=sat["broadcast"]["deliveries_per_s"], cpu=cpu, p99=small["broadcast"]["p99"], rss=rss)


def compare(results: dict) -> dict:
    """How many times better ours is than each anchor, for every figure of :func:`_figures` (ours / anchor for
    deliveries/s, anchor / ours for the rest: above 1, ours is better), and than Channels' best setup (for each
    figure the setup nearest to ours)."""
    ours, best = results["ours"], _best_sat(results["ours"])
    if not best:
        return {}
    mine, per = _figures(best, ours["windows"]["fanout_small"], ours["small_rss"]), {}
    for combo, a in results["anchors"].items():
        if "windows" in a:
            theirs = _figures(a["windows"].get("sat") or _best_sat(a), a["windows"]["fanout_small"], a["idle_rss"])
            better = {n: (mine[n], theirs[n]) if n == "deliveries" else (theirs[n], mine[n]) for n in mine}
            per[combo] = {n: ratio(*pair) for n, pair in better.items()}
    if channels := [per[c] for c in per if c in COMBINATIONS]:
        per["channels-best"] = {n: min((r[n] for r in channels if r[n] is not None), default=None) for n in mine}
    return per


def verdict_of(results: dict) -> dict:
    ours, w, best = results["ours"], results["ours"]["windows"], _best_sat(results["ours"])
    fixed = [w[n]["broadcast"] for n in ("fanout_small", "fanout_large", "fanout_storm")]
    items = {"server CPU per delivery, saturated (us)": (best.get("server_us_per_delivery"), "<=", 2.5)}
    items["deliveries/s at saturation, 1,000 sockets"] = (best["broadcast"]["deliveries_per_s"], ">=", 160_000)
    cmp_ = results["comparison"].get("channels-best", {})
    items["x Channels' best (deliveries/s, same run)"] = (cmp_.get("deliveries"), ">=", 30)
    items["p99 at 10,000 sockets x 5 msgs/s (ms)"] = (w["fanout_storm"]["broadcast"]["p99"], "<=", 50)
    reach = w["fanout_large"]["broadcast"]["all_reached"]["p50"]
    items["one broadcast reaching all 5,000, median (ms)"] = (reach, "<=", 100)
    sat_api = max(x["publish"]["p99"] or 0 for n, x in w.items() if n.startswith("sat_"))
    items["HTTP publish API p99 while saturated (ms)"] = (sat_api, "<=", 100)
    items["RSS per idle socket, worker, 5,000 sockets (KiB)"] = (ours["idle_rss"]["per_socket_kib"], "<=", 7)
    items["RSS per idle socket, worker, 10,000 at once (KiB)"] = (ours["storm"]["idle_rss"]["per_socket_kib"], "<=", 7)
    ten = ours["idle_rss_10"]["per_socket_kib"] / ours["idle_rss"]["per_socket_kib"]
    items["RSS per idle socket on 10 channels / on 1 (x)"] = (round(ten, 2), "<=", 1.5)
    items["10,000 connects at once (s)"] = (ours["storm"]["connect_s"], "<=", 4)
    items["lost + duplicate, fixed-rate windows"] = (sum(b["lost"] + b["dup"] for b in fixed), "<=", 0)
    items["server CPU per delivery, metrics on vs off (%, median of the steps)"] = (metrics_cost(results), "", None)
    return report.verdict(items)


def metrics_cost(results: dict) -> float | None:
    """How much more server CPU per delivery ours takes in the saturation steps with metrics on (the default)
    than with ``OFFLOAD_METRICS=0``, in %: the median over the steps of on / off at the same rate (one step alone
    swings by tens of % on a shared box)."""
    on, off = results["ours"]["windows"], _off(results)
    steps = [n for n in off if n.startswith("sat_") and n in on]
    ratios = [ratio(on[n]["server_us_per_delivery"], off[n]["server_us_per_delivery"], 4) for n in steps]
    ratios = [x for x in ratios if x]
    return round(100 * (statistics.median(ratios) - 1), 1) if ratios else None


def _off(results: dict) -> dict:
    """The windows of the ``OFFLOAD_METRICS=0`` server (none when ``metrics_off`` was 0)."""
    return results.get("metrics_off", {}).get("windows", {})


def _kernel_pct(w: dict) -> float | None:
    """Kernel share of the server's CPU (on loopback a socket write includes the receiver's TCP input)."""
    server = w["cpu"]["groups"]["server"]
    return round(100 * server["sys_s"] / server["cpu_s"]) if server.get("cpu_s") else None


KERNEL = ("server kernel %", _kernel_pct)
COLUMNS = [*report.latency(), report.DELIVERIES, report.LOST, report.API_P99, report.SERVER_US]
COLUMNS += [report.cpu("server"), KERNEL, report.cpu("clients", "client %core"), report.cpu("Redis")]
COLUMNS += [report.cpu("publisher"), report.LAG]


def cpu_floors(results: dict) -> dict:
    """What the box allows at best: server and clients share its CPUs, so a broadcast to every socket cannot end
    before (server + client CPU it needs) / CPUs, nor a connect storm before (server + client + Redis CPU) / CPUs,
    however the work is scheduled. A figure near its floor is bound by the box, not by a wait in the server."""
    w, storm, cpus = results["ours"]["windows"]["fanout_storm"], results["ours"]["storm"], results["machine"]["cpus"]
    per = sum(w["cpu"]["groups"][x]["cpu_s"] for x in ("server", "clients")) / max(1, w["broadcast"]["publishes"])
    return {"broadcast_ms": round(1000 * per / cpus, 1), "storm_s": round(_cpu_s(storm) / cpus, 2)}


def _cpu_s(storm: dict) -> float:
    return sum(storm["cpu"]["groups"][x]["cpu_s"] for x in ("server", "clients", "Redis"))


def _rows(results: dict) -> list[tuple[str, dict]]:
    k, w = results["knobs"], results["ours"]["windows"]
    rows = [(f"ours, {k['small']:,} sockets x {k['rate']:g}/s (HTTP API)", w["fanout_small"])]
    rows += _saturation_rows(k, "ours", w, "offload.publish()")
    rows += _saturation_rows(k, "ours, metrics off", _off(results), "offload.publish()")
    rows.append((f"ours, {k['large']:,} sockets x {k['rate']:g}/s (HTTP API)", w["fanout_large"]))
    rows.append((f"ours, {k['storm']:,} sockets x {k['rate']:g}/s (offload.publish())", w["fanout_storm"]))
    for combo, a in results["anchors"].items():
        if "error" in a:
            rows.append((combo, a))
            continue
        rows.append((f"{a['label']}, {k['small']:,} x {k['rate']:g}/s", a["windows"]["fanout_small"]))
        rows += _saturation_rows(k, a["label"], a["windows"], "Redis PUBLISH")
        if "sat" in a["windows"]:
            rows.append((f"{a['label']}, saturation: HTTP publish streams", a["windows"]["sat"]))
    return rows


def _saturation_rows(k: dict, label: str, windows: dict, how: str) -> list[tuple[str, dict]]:
    rows = []
    for rate in (r for r in k["sat_rates"] if f"sat_{r}" in windows):
        offered = windows[f"sat_{rate}"]["publisher"]["publishes_per_s"] * k["small"]
        rows.append((f"{label}, saturation: {how} {rate}/s (offered {offered:,.0f}/s)", windows[f"sat_{rate}"]))
    return rows


TEXT = """one uWSGI worker (gevent), embedded Redis shared with the anchors (one process each); windows of {seconds} s
(saturation {sat_seconds} s: ours and the Node.js anchors from a publisher process, `offload.publish()` or Redis
PUBLISH of the envelope; {channels_streams} HTTP publish streams against Channels). Latency = arrival - publish time of
every delivery; deliveries/s counted by arrival inside the window; CPU from /proc over the window."""
RATIOS = """**Ratios: how many times better ours is** (same run; ours / anchor for deliveries/s, anchor / ours for the
rest: above 1, ours is better; fan-out p99 and RSS per idle socket at {small} sockets, ours {p99} ms and {rss} KiB).
Metrics cost: ours takes {cost}% more server CPU per delivery in the saturation steps (median over the steps of
on / off at the same rate) with metrics on than with `OFFLOAD_METRICS=0`."""
RATIO_HEADS = {"deliveries": "deliveries/s at saturation", "cpu": "server CPU per delivery", "p99": "fan-out p99"}
RATIO_COLUMNS = [(head, lambda r, n=n: r[n]) for n, head in {**RATIO_HEADS, "rss": "RSS per idle socket"}.items()]
STORM = """Connect storm: {connect_s} s, server CPU {server_ms_per_connect} ms per connect (server, clients and Redis
{cpu_s} s of CPU); retries: {retries}; uWSGI: {counters}; kernel backlog limits (old, new): {sysctls}.

**CPU floors of this box** (server and clients share its {cpus} CPUs; `cpu_floors`): one broadcast to all {storm}
sockets needs {broadcast_ms} ms of the machine (measured p99 {p99} ms); the connect storm {storm_s} s."""


def markdown(results: dict) -> str:
    k, ours, storm = results["knobs"], results["ours"], results["ours"]["storm"]
    mem = [("ours", ours["large_connect_s"], ours["idle_rss"], k["large"])]
    mem.append(("ours, 10 channels per socket", None, ours["idle_rss_10"], k["large"]))
    mem.append(("ours, connect storm (all at once)", storm["connect_s"], storm["idle_rss"], k["storm"]))
    anchors = [a for a in results["anchors"].values() if "idle_rss" in a]
    mem += [(a["label"], a["connect_s"], a["idle_rss"], k["small"]) for a in anchors]
    per = ("per_socket_kib", "tree_per_socket_kib")  # the worker alone; uWSGI's whole tree (one process: the same)
    mem = [[label, f"{n:,}", *(cell(rss.get(x)) for x in per), cell(s)] for label, s, rss, n in mem]
    lines = [*report.heading(results, "Fan-out benchmark", report.fill(TEXT, k))]
    lines.append(report.columns_table(COLUMNS, _rows(results)))
    head = ["idle sockets", "sockets", "RSS per socket, worker (KiB)", "whole tree (KiB)", "connect time (s)"]
    lines += ["", report.table(head, mem), ""]
    if results["comparison"]:
        labels = {c: a.get("label", c) for c, a in results["anchors"].items()}  # a failed anchor: its name
        labels["channels-best"] = "Channels 4, best setup"
        rows = [(labels[c], r) for c, r in results["comparison"].items()]
        figures = {"rss": ours["small_rss"]["per_socket_kib"], "cost": metrics_cost(results)}
        figures["p99"] = ours["windows"]["fanout_small"]["broadcast"]["p99"]
        lines += [report.fill(RATIOS, k, **figures), "", report.columns_table(RATIO_COLUMNS, rows, "anchor"), ""]
    figures = {**storm, **cpu_floors(results), "cpu_s": _cpu_s(storm), "cpus": results["machine"]["cpus"]}
    figures.update(retries=str(storm["connect_errors"] or "none"), sysctls=str(ours["backlog_sysctls"] or "unchanged"))
    figures.update(counters=str(storm["counters"]), p99=ours["windows"]["fanout_storm"]["broadcast"]["p99"])
    lines += [report.fill(STORM, {"storm": k["storm"]}, **figures), ""]
    return "\n".join(lines + report.closing(results, "target (one worker)")) + "\n"


def plot(results: dict) -> dict:
    rows = [(title.replace("Channels 4 + ", ""), w) for title, w in _rows(results) if "broadcast" in w]
    fixed = {title: w["broadcast"] for title, w in rows if "saturation" not in title}
    sat = {title.split(" (")[0].replace("saturation: ", ""): w for title, w in rows if "saturation" in title}
    panels = [report.cdf(f"fan-out latency at {results['knobs']['rate']:g} msgs/s", fixed)]
    panels.append(report.bars_of("saturation", "deliveries/s (log)", sat, lambda w: w["broadcast"]["deliveries_per_s"]))
    cpu = report.bars_of("server CPU per delivery, saturated", "µs (log)", sat, lambda w: w["server_us_per_delivery"])
    title = f"fan-out {results['started']}: ours (blue) vs Django Channels 4 and Node.js (red)"
    return {"title": title, "panels": [*panels, cpu]}


def warnings(results: dict) -> list[str]:
    out = [f"{c}: failed: {a['error'][:300]}" for c, a in results["anchors"].items() if "error" in a]
    every = [("ours", results["ours"]["windows"]), ("ours, metrics off", _off(results))]
    every += [(c, a.get("windows", {})) for c, a in results["anchors"].items()]
    for label, windows in every:
        for n, w in windows.items():  # losses of saturation steps and of Channels are figures, not doubts
            out += report.window_warnings(f"{label} {n}", w, lost=label.startswith("ours") and not n.startswith("sat_"))
    return out
