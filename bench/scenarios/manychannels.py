"""Many channels: ``subscribers`` websockets over ``channels`` channels on one worker; Channels 4 as anchor.
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``manychannels``."""

from __future__ import annotations

from .. import report
from ..anchor import COMBINATIONS
from ..harness import SERVER_ENV, Bench, raise_nofile
from ..stats import ratio

PREFIX = "MC_"
KNOBS = dict(subscribers=(10000, 1000), channels=(1000, 100), rate=(1.0, 1.0), seconds=(10.0, 5.0))
KNOBS.update(api_rate=(250.0, 25.0), api_seconds=(10.0, 5.0), connect_concurrency=(200, 200), drain=(20.0, 20.0))
KNOBS.update(anchors=(list(COMBINATIONS),) * 2)


def run(bench: Bench, k: dict) -> dict:
    nofile, total, n = raise_nofile(), k["rate"] * k["channels"], k["subscribers"]
    server = bench.server("ours", SERVER_ENV)
    redis, steps = server.pids("redis"), {"publish": (k["seconds"], "pub", {"rate": total, "concurrency": 64})}
    api = {"api": (k["api_seconds"], "http", {"rate": k["api_rate"]})} if k["api_seconds"] else {}
    ours = windows_of(bench, k, server, redis, n, {**steps, **api})
    ours["counters"] = server.counters()
    anchors = bench.anchors(k["anchors"], server.redis_url, lambda a: windows_of(bench, k, a, redis, n, steps))
    results = {"rlimit_nofile": nofile, "ours": ours, "channels": anchors}
    results["comparison"], w = compare(results), ours["windows"]["publish"]["broadcast"]
    items = {f"p99, {ours['sockets']:,} sockets over {k['channels']:,} channels (ms)": (w["p99"], "<=", 50)}
    items["lost + duplicate (offload.publish() window)"] = (w["lost"] + w["dup"], "<=", 0)
    items["RSS per idle connection (KiB)"] = (ours["idle_rss"]["per_socket_kib"], "<=", 20)
    return {**results, "verdict": report.verdict(items)}


def windows_of(bench: Bench, k: dict, target, redis: list[int], n: int, steps: dict) -> dict:
    """Connect ``n`` subscribers to ``target`` over ``channels`` channels, then each step alone, drained after.
    ``steps``: ``{window: (seconds, via, how)}``, via ``pub`` (a publisher process, ``how`` its config) or ``http``
    (an HTTP client publishing at ``rate`` or in ``streams``; also the publish scenario's)."""
    meter, first, windows = bench.meter(target, redis), 0, {}
    with bench.scope():
        bench.step(f"[{target.name}] connecting {n:,} over {k['channels']:,} channels")
        how = {"connect_concurrency": k.get("connect_concurrency", 100), "connect_timeout": 10.0}
        (subs,), out = bench.connect(target, target.name, n, channels=k["channels"], **how)
        for name, (seconds, via, how) in steps.items():
            bench.step(f"[{target.name}] {name}, {seconds:g} s, {via}: {how}")
            if via == "http":
                http = bench.subscribers(target, f"{target.name}-{name}", 0, "publisher", channels=k["channels"])
                http.wait("ready", 60)
                w = bench.window(meter, name, [subs], seconds, http=http, first=first, **how)
                bench.stop(http)
            else:
                how = {**how, "channels": k["channels"], "seconds": seconds, "first": first}
                pub = bench.publisher(target, f"{target.name}-{name}", **how)
                w = bench.window(meter, name, [subs], seconds, pub=pub)
            w["drain_s"], first, windows[name] = bench.drain([subs], k["drain"]), w["next"], w
        out["misrouted"] = bench.collect([subs], windows)["misrouted"]
    return {**out, "windows": windows}


def compare(results: dict) -> dict:
    """Ours against Channels' best setup (the one that delivered the most: an overloaded core layer drops
    messages, a low p99 of what it kept is no win), same rate; CPU and memory against any setup's best."""
    ok = {combo: a for combo, a in results["channels"].items() if "windows" in a}
    if not ok:
        return {}
    delivered = {c: a["windows"]["publish"]["broadcast"] for c, a in ok.items()}
    ours, best = results["ours"], max(ok, key=lambda c: delivered[c]["expected"] - delivered[c]["lost"])
    o, t = ours["windows"]["publish"], ok[best]["windows"]["publish"]
    us = min(a["windows"]["publish"]["server_us_per_delivery"] or 1e12 for a in ok.values())
    kib = min(a["idle_rss"]["per_socket_kib"] or 1e12 for a in ok.values())
    scale = "same scale" if ok[best]["sockets"] == ours["sockets"] else "**different scales**"
    out = {"channels_best": best, "same_scale": scale}
    out.update({f"{q}_ratio": ratio(t["broadcast"][q], o["broadcast"][q], 1) for q in ("p50", "p99")})
    out.update(deliveries_ratio=ratio(o["broadcast"]["deliveries_per_s"], t["broadcast"]["deliveries_per_s"], 1))
    out.update(cpu_ratio=ratio(us, o["server_us_per_delivery"], 1), channels_best_us_per_delivery=us)
    out.update(rss_ratio=ratio(kib, ours["idle_rss"]["per_socket_kib"], 1), channels_best_rss_kib=kib)
    return {**out, "connect_ratio": ratio(ok[best]["connect_s"], ours["connect_s"], 1)}


def _worst(w: dict) -> str:
    return "{max_lost_per_subscriber} / {max_dup_per_subscriber}".format_map(w["broadcast"])


WORST = ("worst subscriber lost / dup", _worst)
PUBLISHES = ("publishes/s", lambda w: w["publisher"]["publishes_per_s"])
COLUMNS = [PUBLISHES, report.DELIVERIES, *report.latency(), report.LOST]
COLUMNS += [WORST, report.cpu("server"), report.SERVER_US, report.cpu("clients", "client %core"), report.cpu("Redis")]
COLUMNS += [report.cpu("publisher"), report.DRAIN]
MEMORY = [("sockets", lambda a: f"{a['sockets']:,}"), ("connect time (s)", lambda a: a["connect_s"])]
MEMORY += [("RSS per socket (KiB)", lambda a: a["idle_rss"]["per_socket_kib"])]
MEMORY += [("connect retries", lambda a: str(a["connect_errors"] or "none"))]
TITLES = {"publish": "offload.publish() from a process", "api": "HTTP publish API (open loop)"}
CHANNELS_TITLES = {"publish": "group_send from a process", "api": "HTTP publish view"}
TEXT = """one uWSGI worker (gevent), embedded Redis shared with the Channels servers. Subscriber i listens on
`public:mc-<i % {channels}>`; {rate} msg/s on every channel, round robin ({total} publishes/s), windows of {seconds} s
(HTTP API: {api_rate}/s for {api_seconds} s). Lost/dup counted per subscriber after the backlog drained (at most
{drain} s); CPU from /proc over the publisher's run."""
RATIOS = """**Ratios** (ours / Channels' best setup, {channels_best}, same run, {same_scale}): p50 {p50_ratio}x lower,
p99 {p99_ratio}x lower, deliveries/s {deliveries_ratio}x; server CPU per delivery {cpu_ratio}x less (Channels' best
{channels_best_us_per_delivery} µs); memory per socket {rss_ratio}x less (Channels' best {channels_best_rss_kib} KiB);
connect time {connect_ratio}x shorter."""


def setups(results: dict) -> list[tuple[str, dict, dict]]:
    """(label, setup, the titles of its windows) of ours and every Channels setup."""
    theirs = [(a.get("label", c), a, CHANNELS_TITLES) for c, a in results["channels"].items()]
    return [("ours", results["ours"], TITLES), *theirs]


def markdown(results: dict) -> str:
    k, cmp_ = results["knobs"], results["comparison"]
    rows = [(f"{label}, {t[n]}", w) for label, a, t in setups(results) for n, w in a.get("windows", {}).items()]
    rows += [(c, a) for c, a in results["channels"].items() if "error" in a]
    mem = [(label, a) for label, a, _ in setups(results) if "windows" in a]
    text = report.fill(TEXT, {**k, "total": k["rate"] * k["channels"]})
    lines = [*report.heading(results, "Many channels", text), report.columns_table(COLUMNS, rows), ""]
    lines += [report.columns_table(MEMORY, mem, "setup"), ""]
    lines += [report.fill(RATIOS, **cmp_), ""] if cmp_ else []
    lines += [f"uWSGI after the run: {results['ours']['counters']}.", ""]
    return "\n".join(lines + report.closing(results, "target (one worker)")) + "\n"


def plot(results: dict) -> dict:
    windows = {f"{label} {n}": w for label, a, _ in setups(results) for n, w in a.get("windows", {}).items()}
    memory = {label: a["idle_rss"]["per_socket_kib"] for label, a, _ in setups(results) if "windows" in a}
    style = lambda n: "--" if n.endswith("api") else "-"  # noqa: E731
    panels = [report.cdf("delivery latency", {n: w["broadcast"] for n, w in windows.items()}, style)]
    panels.append(report.bars("delivery p99", "ms (log)", {n: w["broadcast"]["p99"] for n, w in windows.items()}))
    cpu = {n: w["server_us_per_delivery"] for n, w in windows.items()}
    panels.append(report.bars("server CPU per delivery", "µs (log)", cpu))
    panels.append(report.bars("server memory per idle socket", "KiB", memory, log=False))
    return {"title": f"many channels {results['started']}: ours (blue) vs Django Channels 4 (red)", "panels": panels}


def setup_warnings(label: str, a: dict, k: dict, rates: dict[str, float]) -> list[str]:
    """Each window's doubts, and a publisher below its rate (``rates`` by window), failed publishes, a backlog
    still arriving after ``drain``; a setup that failed, deliveries to a socket of another channel."""
    out = [f"{label}: failed: {a['error'][:300]}"] if "error" in a else []
    out += [f"{label}: {a['misrouted']} deliveries reached a socket of another channel"] if a.get("misrouted") else []
    for name, w in a.get("windows", {}).items():
        where, pub, rate = f"{label} {name}", w["publisher"], rates.get(name, 0)
        out += report.window_warnings(where, w, lost=label == "ours")
        if w["open_sockets"] < a["sockets"]:
            out.append(f"{where}: only {w['open_sockets']:,} of {a['sockets']:,} websockets open at the end")
        if pub["publishes_per_s"] < 0.95 * rate:
            out.append(f"{where}: publisher reached {pub['publishes_per_s']:,.0f} of {rate:,.0f} publishes/s")
        if pub["failed"]:
            out.append(f"{where}: {len(pub['failed'])} publishes failed {pub['errors']}")
        if w["drain_s"] >= k["drain"]:
            out.append(f"{where}: backlog still arriving after {k['drain']:g} s: late deliveries count as lost")
    return out


def warnings(results: dict) -> list[str]:
    k = results["knobs"]
    rates = {"publish": k["rate"] * k["channels"], "api": k["api_rate"]}
    return [x for label, a, _ in setups(results) for x in setup_warnings(label, a, k, rates)]
