"""Slow consumers: do clients that never read hurt the others, or the worker's memory?
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``backpressure``."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from .. import report
from ..harness import SERVER_ENV, Bench, raise_nofile
from ..report import cell
from ..server import rss_kib
from ..stats import median_merge, ratio, spread

PREFIX = "BACKPRESSURE_"
KNOBS = dict(fast=(1000, 100), stalled=(10, 10), returning=(5, 5), seconds=(20.0, 20.0), repeats=(2, 1))
KNOBS.update(rate=(20.0, 20.0), payload=(16384,) * 2, queue=(50, 50), rcvbuf=(4096, 4096))
KNOBS.update(warmup=(3.0, 3.0), pause=(2.0, 2.0))
CHANNEL, TARGET = "public:backpressure", 1.5
#: worker RSS in a stalled window may exceed the baseline's max by one queue of frames plus this (MiB)
RSS_SLACK_MIB = 4.0
#: the server's log lines when it drops a socket by a timer, not by the queue limit
TIMER_DROPS = re.compile(r"websocket peer (stopped reading for|did not answer a ping)")


class RssSampler:
    """The worker's RSS every ``period`` s on a thread: ``samples`` are ``[seconds since the start, MiB]``."""

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.pid, self.period, self.samples, self.started = pid, period, [], time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def _run(self) -> None:
        while not self._stop.wait(self.period if self.samples else 0):
            if (kib := rss_kib(self.pid)) is not None:
                self.samples.append([self.now(), round(kib / 1024, 2)])

    def between(self, start: float, end: float) -> dict:
        """Start, max and end of the samples from ``start`` to ``end`` (seconds since the start)."""
        mib = [v for t, v in self.samples if start <= t <= end] or [0.0]
        return {"start_mib": mib[0], "max_mib": max(mib), "end_mib": mib[-1]}

    def stop(self) -> list[list[float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def run(bench: Bench, k: dict) -> dict:
    nofile, env = raise_nofile(), {**SERVER_ENV, "OFFLOAD_MAX_QUEUED_BYTES": str(k["queue"] * (k["payload"] + 128))}
    server = bench.server("ours", env)
    worker, groups = server.pid, ("fast client", "stalled client")
    meter = bench.meter(server, labels=groups)
    bench.step(f"connecting {k['fast']} fast subscribers")
    rss_idle = rss_kib(worker)
    fast = bench.subscribers(server, "fast", k["fast"], "fast client", channel=CHANNEL, payload=k["payload"])
    # a returning socket reads again this many messages after its server-side kernel buffer filled:
    # the queue limit plus about half a second, well inside the server's 2 s closing grace
    how = {"rcvbuf": k["rcvbuf"], "resume_after": k["queue"] + max(3, round(k["rate"] / 2)), "channel": CHANNEL}
    stalled = bench.client("stalled", "stalled client", "stalled", host=server.host, port=server.port, **how)
    ready = fast.wait("ready", 180)
    bench.step(f"warm-up: {k['rate']:g} x {k['payload'] // 1024} KiB messages/s")
    fast.send("publish", first=0, rate=k["rate"], seconds=k["warmup"])
    first = fast.wait("published", k["warmup"] + 60)["count"]
    rss, windows = RssSampler(worker), {}
    for rep in range(k["repeats"]):
        for kind in ("baseline", "stalled") if rep % 2 == 0 else ("stalled", "baseline"):  # no order bias
            name, start, log_start = f"{kind}_{rep + 1}", rss.now(), len(server.live.log_text())
            bench.step(f"[{rep + 1}/{k['repeats']}] {kind}: {k['fast']} fast" + " + stalled" * (kind == "stalled"))
            w = windows[name] = window(bench, k, meter, fast, kind == "stalled" and stalled, name, first)
            drops = len(TIMER_DROPS.findall(server.live.log_text()[log_start:]))
            w.update(kind=kind, run_s=[start, rss.now()], timer_drops=drops, rss=rss.between(start, rss.now()))
            first = w["next"]
            time.sleep(k["pause"])  # backlogs gone: the next window starts clean
    rss_run = {"samples": rss.stop()}
    bench.collect([fast], windows)
    results = {"server_env": env, "rlimit_nofile": nofile, "connect_s": ready["connect_s"], "rss_run": rss_run}
    results.update(rss_idle_mib=round(rss_idle / 1024, 1) if rss_idle else None, windows=windows)
    return {**results, "summary": (s := summarize(results, k)), "verdict": verdict_of(results, s, k)}


def window(bench: Bench, k: dict, meter, fast, stalled, name: str, first: int) -> dict:
    """One window of publishes; with ``stalled``, its sockets are opened just before and reported after."""
    if stalled:
        stalled.send("stall", name=name, count=k["stalled"], returning=k["returning"])
    w = bench.window(meter, name, [fast], k["seconds"], http=fast, first=first, rate=k["rate"])
    if stalled:
        opened = stalled.wait("stalled", 30)
        stalled.send("release")
        released = stalled.wait("released", 60)
        w["stalled"] = stalled_figures(released["sockets"], k["stalled"], k["seconds"])
        w["stalled"].update(sockets=released["sockets"], witness_messages=released["witness_messages"])
        w["stalled"].update(errors=opened["errors"], rcvbuf=opened["rcvbuf"])
    return w


def _ending(r: dict) -> str:
    """How a stalled socket's stream ended when it read again: ``1008 slow consumer``, ``no close frame``."""
    if (d := r["drain"]) is None:
        return "not read"
    if d["close_code"] is None:
        return f"no close frame ({d['ended']})"
    return f"{d['close_code']} {d['close_reason']}".strip()


def stalled_figures(sockets: list[dict], wanted: int | None, seconds: float) -> dict:
    """What happened to stalled sockets: how many the server closed in time, when (min/median/max), how they ended."""
    closed = [r for r in sockets if r["dropped_s"] is not None and r["dropped_s"] <= seconds + 1]
    out = {"wanted": wanted, "subscribed": len(sockets), "returning": sum(r["returning"] for r in sockets)}
    out.update(closed_by_server=len(closed), endings=dict(Counter(map(_ending, sockets))))
    out["server_kernel_mib_max"] = round(max([r["server_tx_queue_max"] for r in sockets] or [0]) / 2**20, 2)
    for field in ("kernel_full_s", "resumed_s", "close_frame_s", "dropped_s"):
        out[field] = spread(r[field] for r in sockets if r[field] is not None)
    return out


def summarize(results: dict, k: dict) -> dict:
    """Medians per kind of window; the stalled sockets of all stalled windows, by group."""
    out, windows = {}, list(results["windows"].values())
    for kind in ("baseline", "stalled"):
        ws = [w for w in windows if w["kind"] == kind]
        x = median_merge([{"p50": w["broadcast"]["p50"], "p99": w["broadcast"]["p99"], "rss": w["rss"]} for w in ws])
        x.update(windows=len(ws), lost=sum(w["broadcast"]["lost"] + w["broadcast"]["dup"] for w in ws))
        x.update(disconnects=sum(w["disconnects"]["count"] for w in ws), timer_drops=sum(w["timer_drops"] for w in ws))
        out[kind] = x
    sockets = [r for w in windows for r in w.get("stalled", {}).get("sockets", [])]
    out["all_stalled"] = stalled_figures(sockets, k["stalled"] * k["repeats"], k["seconds"])
    groups = {"never read again": False, "read again after the limit": True}
    out["groups"] = {g: [r for r in sockets if r["returning"] is x] for g, x in groups.items()}
    out["groups"] = {g: stalled_figures(them, None, k["seconds"]) for g, them in out["groups"].items()}
    # memory that stays: the last window's peak against the first one's
    out["rss_drift_mib"] = round(windows[-1]["rss"]["max_mib"] - windows[0]["rss"]["max_mib"], 1)
    out["p99_ratio"] = ratio(out["stalled"]["p99"], out["baseline"]["p99"])
    return out


def verdict_of(results: dict, s: dict, k: dict) -> dict:
    stalled_rss = max(w["rss"]["max_mib"] for w in results["windows"].values() if w["kind"] == "stalled")
    slow = s["groups"]["read again after the limit"]["endings"].get("1008 slow consumer", 0)
    items = {"fast p99, stalled / baseline (medians)": (s["p99_ratio"], "<=", TARGET)}
    items["fast deliveries lost + duplicate (all windows)"] = (s["baseline"]["lost"] + s["stalled"]["lost"], "<=", 0)
    items["fast sockets closed (all windows)"] = (s["baseline"]["disconnects"] + s["stalled"]["disconnects"], "<=", 0)
    closed, timers = s["all_stalled"], s["baseline"]["timer_drops"] + s["stalled"]["timer_drops"]
    items["stalled sockets closed by the server in the window"] = (closed["closed_by_server"], ">=", closed["wanted"])
    items["returning stalled sockets that read close 1008 'slow consumer'"] = (slow, ">=", closed["returning"])
    excess, bound = stalled_rss - s["baseline"]["rss"]["max_mib"], RSS_SLACK_MIB + k["queue"] * k["payload"] / 2**20
    items["worker RSS in stalled windows above the baseline max (MiB)"] = (round(excess, 1), "<=", round(bound, 1))
    items["sockets dropped by the server's timers instead of the queue limit"] = (timers, "<=", 0)
    return report.verdict(items)


def _spread(x: dict) -> str:
    return "—" if x["median"] is None else " / ".join(cell(x[q]) for q in ("min", "median", "max"))


def _stalled(get):
    return lambda w: get(w["stalled"]) if "stalled" in w else "—"


def _rss(w: dict) -> str:
    return " / ".join(cell(w["rss"][f"{x}_mib"]) for x in ("start", "max", "end"))


RSS = ("worker RSS start / max / end MiB", _rss)
CLOSED = ("stalled closed by server", _stalled(lambda s: f"{s['closed_by_server']} / {s['wanted']}"))
COLUMNS = [*report.latency(prefix="fast "), report.DELIVERIES, report.LOST, report.API_P99, RSS, CLOSED]
COLUMNS += [("closed after s (min / median / max)", _stalled(lambda s: _spread(s["dropped_s"])))]
COLUMNS += [report.cpu("server"), report.cpu("fast client"), report.cpu("Redis"), report.cpu("other"), report.LAG]
STALLED_ROWS = [("sockets", lambda g: g["subscribed"]), ("closed in the window", lambda g: g["closed_by_server"])]
AFTER = {"server kernel buffer full": "kernel_full_s", "read again": "resumed_s", "close frame read": "close_frame_s"}
AFTER["server closed its end"] = "dropped_s"
STALLED_ROWS += [(f"{title} after s", lambda g, f=f: _spread(g[f])) for title, f in AFTER.items()]
STALLED_ROWS += [("how their stream ended", lambda g: ", ".join(f"{e}: {n}" for e, n in g["endings"].items()))]
TEXT = """one uWSGI worker (gevent), embedded Redis, `OFFLOAD_MAX_QUEUED_BYTES={queue_bytes}` ({queue} messages).
{fast} fast subscribers on `{channel}`, {rate} messages/s of {payload} bytes through `POST /api/publish/`; stalled
windows add {stalled} websockets (SO_RCVBUF {rcvbuf}) that stop reading once subscribed. Windows of {seconds} s,
baseline and stalled alternating, {repeats} of each. Medians: fast p99 {base_p99} ms baseline, {stal_p99} ms stalled
(**{p99_ratio}x**), p50 {base_p50} / {stal_p50} ms; worker RSS max {base_rss} / {stalled_rss} MiB."""
STALLED_TEXT = """The server's kernel absorbs up to {kernel_mib} MiB per stalled socket (kernel memory, not worker RSS)
before the worker queues {queue} messages, closes with 1008 and drops the socket after its 2 s closing grace; a client
that never reads again cannot see that close frame (it is queued behind the bytes it never read). Drops by the
server's timers in stalled windows: {timer_drops}. Worker RSS: idle {rss_idle} MiB before connecting; the last
window's peak is {drift} MiB above the first one's."""


def markdown(results: dict) -> str:
    k, s = results["knobs"], results["summary"]
    b, st = s["baseline"], s["stalled"]
    medians = {f"{x[:4]}_{q}": s[x][q] for x in ("baseline", "stalled") for q in ("p50", "p99")}
    medians.update(base_rss=b["rss"]["max_mib"], stalled_rss=st["rss"]["max_mib"], p99_ratio=s["p99_ratio"])
    medians.update(channel=CHANNEL, queue_bytes=results["server_env"]["OFFLOAD_MAX_QUEUED_BYTES"])
    text = report.fill(TEXT, k, **medians)
    lines = [*report.heading(results, "Slow-consumer benchmark", text)]
    lines += [report.columns_table(COLUMNS, list(results["windows"].items())), ""]
    groups = [(g, lambda get, x=x: get(x)) for g, x in s["groups"].items()]
    lines += [report.grid("stalled sockets, all stalled windows (min / median / max)", STALLED_ROWS, groups), ""]
    figures = {"kernel_mib": s["all_stalled"]["server_kernel_mib_max"], "rss_idle": results["rss_idle_mib"]}
    figures.update(queue=k["queue"], timer_drops=st["timer_drops"], drift=s["rss_drift_mib"])
    lines += [report.fill(STALLED_TEXT, **figures), ""]
    return "\n".join(lines + report.closing(results)) + "\n"


def plot(results: dict) -> dict:
    k, windows, rss = results["knobs"], results["windows"], results["rss_run"]["samples"]
    sockets = [r for w in windows.values() for r in w.get("stalled", {}).get("sockets", [])]
    drops = [r["dropped_s"] for r in sockets if r["dropped_s"]]
    style = lambda name: "-" if name.startswith("baseline") else "--"  # noqa: E731
    memory = {"kind": "lines", "title": f"worker RSS over the run (queue limit {k['queue']} messages)", "ylabel": "MiB"}
    memory.update(xlabel="second of the run (lines: windows start)", marks=[w["run_s"][0] for w in windows.values()])
    memory["series"] = [{"label": "worker RSS", "x": [x[0] for x in rss], "y": [x[1] for x in rss]}]
    title = f"{k['fast']:,} fast subscribers, {k['rate']:g} x {k['payload'] // 1024} KiB msgs/s"
    panels = [report.cdf(title, {n: w["broadcast"] for n, w in windows.items()}, style)]
    panels.append(report.timeline("fast p99 per second (lines: a stalled socket closed)", windows, style, drops))
    title = f"slow consumers {results['started']}: fast p99 stalled / baseline {results['summary']['p99_ratio']}x"
    return {"title": f"{title} (target <= {TARGET}x)", "panels": [*panels, memory]}


def warnings(results: dict) -> list[str]:
    out = []
    for name, w in results["windows"].items():
        out += report.window_warnings(name, w, "fast client")
        st = w.get("stalled", {"subscribed": 0, "wanted": 0, "closed_by_server": 0})
        if st["subscribed"] < st["wanted"]:
            out.append(f"{name}: only {st['subscribed']} of {st['wanted']} stalled sockets subscribed")
        if st["closed_by_server"] < st["subscribed"]:
            out.append(f"{name}: {st['subscribed'] - st['closed_by_server']} stalled sockets still open at the end")
    return out
