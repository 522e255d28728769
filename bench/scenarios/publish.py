"""Publish throughput, closed loop: ``offload.publish()`` and the HTTP API vs Channels' publish paths.
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``publish``."""

from __future__ import annotations

from .. import report
from ..anchor import COMBINATIONS
from ..harness import SERVER_ENV, Bench, raise_nofile
from ..stats import ratio
from .manychannels import setup_warnings, setups, windows_of

PREFIX = "PUB_"
KNOBS = dict(subscribers=(1000, 200), channels=(1000, 200), seconds=(5.0, 3.0), concurrency=(16, 16))
KNOBS.update(drain=(20.0, 20.0), py_modes=(["gevent", "threads"],) * 2, anchors=(list(COMBINATIONS),) * 2)
TITLES = {"py_gevent": "offload.publish(), greenlets (gevent)", "py_threads": "offload.publish(), threads"}
TITLES.update(http="HTTP publish API", group_send="group_send from a process")
CHANNELS_HTTP = "HTTP publish view (async, group_send)"


def run(bench: Bench, k: dict) -> dict:
    nofile, n, c, s = raise_nofile(), k["subscribers"], k["concurrency"], k["seconds"]
    server = bench.server("ours", SERVER_ENV)
    redis, http = server.pids("redis"), {"http": (s, "http", {"streams": c})}
    py = {f"py_{mode}": (s, "pub", {"mode": mode, "concurrency": c}) for mode in k["py_modes"]}  # greenlets, threads
    ours = windows_of(bench, k, server, redis, n, {**py, **http})
    theirs = {**http, "group_send": (s, "pub", {"concurrency": c})}
    anchors = bench.anchors(k["anchors"], server.redis_url, lambda a: windows_of(bench, k, a, redis, n, theirs))
    results = {"rlimit_nofile": nofile, "ours": ours, "channels": anchors, "verdict": {}}  # no target: figures, ratios
    return {**results, "comparison": compare(results)}


def _rate(w: dict) -> float:
    return w["publisher"]["publishes_per_s"] or 0.0


def compare(results: dict) -> dict:
    """Ours / Channels' best, per kind of path: from Python (offload.publish vs group_send) and over HTTP."""
    ours, ok = results["ours"]["windows"], {c: a["windows"] for c, a in results["channels"].items() if "windows" in a}
    py, out = max((n for n in ours if n.startswith("py_")), key=lambda n: _rate(ours[n]), default=None), {}
    for kind, mine, theirs in (("python", py, "group_send"), ("http", "http", "http")):
        if mine and ok:
            best = max(ok, key=lambda c: _rate(ok[c][theirs]))
            o, t = ours[mine], ok[best][theirs]
            x = out[kind] = {"ours": mine, "channels_best": best, "ours_per_s": _rate(o), "channels_per_s": _rate(t)}
            # what the subscribers got meanwhile: a path faster than its server delivers only builds a backlog
            x["ours_deliveries"], x["channels_deliveries"] = (w["broadcast"]["deliveries_per_s"] for w in (o, t))
            x["throughput_ratio"] = ratio(_rate(o), _rate(t))
            x["deliveries_ratio"] = ratio(x["ours_deliveries"], x["channels_deliveries"])
            for q in ("p50", "p99"):
                x[f"{q}_ratio"] = ratio(t["publisher"]["latency"][q], o["publisher"]["latency"][q])
    return out


COLUMNS = [("publishes/s", _rate), *report.latency(lambda w: w["publisher"]["latency"], "call ")]
COLUMNS += [("failed", lambda w: len(w["publisher"]["failed"])), report.DELIVERIES]
COLUMNS += [(f"delivery {q} ms", lambda w, q=q: w["broadcast"][q]) for q in ("p50", "p99")]
COLUMNS += [report.LOST, report.cpu("server"), report.cpu("Redis"), report.cpu("publisher")]
COLUMNS += [report.cpu("clients", "subscriber client %core"), report.DRAIN]
TEXT = """one uWSGI worker (gevent), embedded Redis shared with the Channels servers; {subscribers} websockets over
{channels} channels (`public:mc-<i>`), publishes round robin over them. Each path runs alone for {seconds} s with
{concurrency} callers in a closed loop (the next call as soon as the previous returned); publishes/s = successful calls
/ (first call to last return). Deliveries counted after the backlog drained (at most {drain} s)."""
RATIO = """**Ratio {kind}**: ours ({ours}) {ours_per_s}/s vs Channels' best ({channels_best}) {channels_per_s}/s =
{throughput_ratio}x the publishes/s; call latency p50 {p50_ratio}x, p99 {p99_ratio}x (Channels / ours: above 1 = ours
faster); deliveries/s while publishing {ours_deliveries} vs {channels_deliveries} = {deliveries_ratio}x."""
KINDS = {"python": "from Python (offload.publish() vs group_send)", "http": "over HTTP (API vs publish view)"}


def _rows(results: dict) -> list[tuple[str, dict]]:
    theirs = {**TITLES, "http": CHANNELS_HTTP}
    rows = [(x, a, TITLES if x == "ours" else theirs) for x, a, _ in setups(results)]
    rows = [(f"{x}, {titles[n]}", w) for x, a, titles in rows for n, w in a.get("windows", {}).items()]
    return rows + [(c, a) for c, a in results["channels"].items() if "error" in a]


def markdown(results: dict) -> str:
    text = report.fill(TEXT, results["knobs"])
    lines = [*report.heading(results, "Publish throughput", text)]
    lines.append(report.columns_table(COLUMNS, _rows(results), "path"))
    lines += [x for kind, c in results["comparison"].items() for x in ("", report.fill(RATIO, kind=KINDS[kind], **c))]
    return "\n".join([*lines, *report.closing(results)]) + "\n"


def plot(results: dict) -> dict:
    windows = {title.replace("Channels 4 + ", ""): w for title, w in _rows(results) if "windows" not in w}
    style = lambda n: "--" if "HTTP" in n else ":" if "threads" in n else "-"  # noqa: E731
    calls = f"publishes/s, {results['knobs']['concurrency']} callers, closed loop"
    panels = [report.bars(calls, "publishes/s (log)", {n: _rate(w) for n, w in windows.items()})]
    panels.append(report.bars_of("call latency p99", "ms (log)", windows, lambda w: w["publisher"]["latency"]["p99"]))
    panels.append(report.cdf("delivery latency", {n: w["broadcast"] for n, w in windows.items()}, style))
    return {"title": f"publish throughput {results['started']}: ours (blue) vs Channels 4 (red)", "panels": panels}


def warnings(results: dict) -> list[str]:
    return [x for label, a, _ in setups(results) for x in setup_warnings(label, a, results["knobs"], {})]
