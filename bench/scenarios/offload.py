"""Offloading on vs off: websocket broadcast and view latency under heavy load.
What it runs, step by step, its knobs (``KNOBS``) and its targets: ``bench/README.md``, section ``offload``."""

from __future__ import annotations

import time

from .. import report
from ..harness import Bench
from ..report import cell
from ..server import make_file
from ..stats import median_merge, ratio

PREFIX = ""  # BENCH_SECONDS, BENCH_SUBSCRIBERS, ...
KNOBS = dict(seconds=(20.0, 10.0), warmup=(5.0, 3.0), settle=(3.0, 3.0), subscribers=(1000, 100), rate=(10.0, 10.0))
KNOBS.update(probe_ms=(100.0, 100.0), downloads=(50, 5), file_mb=(100, 10), download_kbps=(1024, 1024), tasks=(4, 4))
KNOBS.update(task_rows=(200_000,) * 2, repeats=(2, 1), modes=(["offload", "inline"],) * 2, connect_concurrency=(50, 50))
MODES = {"offload": ("offloading", {}), "inline": ("offloading disabled", {"OFFLOAD_INLINE": "1"})}
# one spooler per task (uwsgi.ini takes the count only from uWSGI's own variable)
SERVER_ENV = {"WORKERS": "1", "CORES": "2000", "UWSGI_SPOOLER_PROCESSES": "4"}
SERVER_ENV["OFFLOAD_MAX_CONNECTIONS_PER_IP"] = "1000000"
CHANNEL, VIEW_PATH, DOWNLOAD_NAME, TARGET = "public:bench", "/accounts/login/", "big.bin", 2.0
KINDS = ("broadcast", "view")


def derived(k: dict) -> dict:
    """Tasks outlast the loaded window (the view caps them at 60 s); no download finishes inside it."""
    limit = k["file_mb"] * 2**20 / ((k["settle"] + k["seconds"]) * 1.5)
    task_seconds = min(60.0, k["settle"] + k["seconds"] + 10)
    return {"task_seconds": task_seconds, "download_bps": int(min(k["download_kbps"] * 1024, limit))}


def run(bench: Bench, k: dict) -> dict:
    if not 0 < k["seconds"] <= 50:
        raise SystemExit("BENCH_SECONDS is at most 50: report tasks stop after 60 s (view cap)")
    bench.step(f"writing a {k['file_mb']} MiB file")
    big = make_file(bench.work / "files" / DOWNLOAD_NAME, k["file_mb"])
    runs: dict[str, list] = {mode: [] for mode in k["modes"]}
    for rep in range(k["repeats"]):
        for mode in k["modes"] if rep % 2 == 0 else k["modes"][::-1]:  # alternate: no order bias
            with bench.scope():
                runs[mode].append(run_mode(bench, k, mode, rep, big))
    summary = {mode: median_merge(results) for mode, results in runs.items()}
    items = {}
    for m, s in summary.items():
        s["ratios"] = {f"{x}_{q}": ratio(s["loaded"][x][q], s["idle"][x][q]) for x in KINDS for q in ("p50", "p99")}
        for x in KINDS:  # inline: for comparison, no target
            items[f"{MODES[m][0]}: {x} p99, loaded / idle"] = (s["ratios"][f"{x}_p99"], "<=" * (m == "offload"), TARGET)
    return {"derived": derived(k), "runs": runs, "summary": summary, "verdict": report.verdict(items)}


def run_mode(bench: Bench, k: dict, mode: str, rep: int, big) -> dict:
    """One server: idle window, then loaded window."""
    label, name = f"[{mode} {rep + 1}/{k['repeats']}]", f"{mode}-{rep}"
    server = bench.server(name, {**SERVER_ENV, **MODES[mode][1]}, [big])
    session = server.login()
    groups = {f"uWSGI {role}": lambda role=role: server.pids(role) for role in ("worker", "spooler", "master")}
    meter = bench.meter(server, labels=("probe client", "load client"), groups=groups)
    bench.step(f"{label} connecting {k['subscribers']} websockets")
    how = {"channel": CHANNEL, "probe_path": VIEW_PATH, "probe_ms": k["probe_ms"]}
    how["connect_concurrency"] = k["connect_concurrency"]
    probe = bench.subscribers(server, f"{name}-probe", k["subscribers"], "probe client", **how)
    ready = probe.wait("ready", 180)
    probe.send("publish", rate=k["rate"])
    bench.step(f"{label} warm-up (publishing)")
    time.sleep(k["warmup"])
    windows = {}
    for window in ("idle", "loaded"):
        if window == "loaded":
            bench.step(f"{label} starting {k['downloads']} downloads + {k['tasks']} tasks")
            load, load_start, counters = start_load(bench, k, server, session, name)
            time.sleep(k["settle"])
        bench.step(f"{label} {window} window")
        before = server.counters()
        windows[window] = bench.window(meter, window, [probe], k["seconds"])
        windows[window]["server"] = {"before": before, "after": server.counters()}
    bench.step(f"{label} stopping")
    load.send("stop")
    load_summary = load.wait("summary", 60)
    bench.collect([probe], windows)
    windows["loaded"]["load"] = load_figures(load_summary, windows["loaded"], counters, server.counters())
    summary = {key: load_summary[key] for key in ("downloads", "reports")}
    return {"mode": mode, "connect_s": ready["connect_s"], **windows, "load_start": load_start, "load_summary": summary}


def start_load(bench: Bench, k: dict, server, session: dict, name: str):
    """The load client, started: (it, its ``loaded`` event, uWSGI counters before)."""
    counters = server.counters()
    d, how = derived(k), dict(path=f"/downloads/{DOWNLOAD_NAME}", downloads=k["downloads"], tasks=k["tasks"], **session)
    how.update(rate_bps=d["download_bps"], rcvbuf=64 * 1024, task_seconds=d["task_seconds"], task_rows=k["task_rows"])
    load = bench.client("load", "load client", f"{name}-load", host=server.host, port=server.port, **how)
    load.send("start")
    return load, load.wait("loaded", 90), counters


def load_figures(load: dict, window: dict, before: dict, after: dict) -> dict:
    """Downloads in flight, their throughput and running tasks, inside the window."""
    start, end = window["start_ns"], window["end_ns"]
    samples = [s for s in load["samples"] if start <= s[0] <= end]
    events = [e for e in load["task_events"] if start <= e[0] < end]
    seconds = (samples[-1][0] - samples[0][0]) / 1e9 if len(samples) > 1 else 0
    out = {"downloads_in_flight_min": min((s[1] for s in samples), default=None), "task_progress_events": len(events)}
    out["download_mb_per_s"] = round((samples[-1][2] - samples[0][2]) / seconds / 2**20, 1) if seconds else None
    out["tasks_progressing"] = len({e[1] for e in events if e[2] == "running"})
    out["download_requests"] = load["downloads"]["statuses"].get("200", 0)
    # uWSGI counts a request as offloaded when it hands it over (at the start of a download)
    return {**out, "offloaded_requests": after.get("offloaded_requests", 0) - before.get("offloaded_requests", 0)}


LATENCY_ROWS = [  # (title, figure of a window)
    ("broadcast p50 (ms)", lambda w: w["broadcast"]["p50"]),
    ("**broadcast p99 (ms)**", lambda w: w["broadcast"]["p99"]),
    ("broadcast max (ms)", lambda w: w["broadcast"]["max"]),
    ("view p50 (ms)", lambda w: w["view"]["p50"]),
    ("**view p99 (ms)**", lambda w: w["view"]["p99"]),
    ("publish API p99 (ms)", lambda w: w["publish"]["p99"]),
    ("deliveries/s", lambda w: w["broadcast"]["deliveries_per_s"]),
    ("expected deliveries/s", lambda w: w["broadcast"]["expected_per_s"]),
    ("lost / duplicate deliveries", lambda w: f"{w['broadcast']['lost']} / {w['broadcast']['dup']}"),
    ("view probes (failed)", lambda w: f"{w['view']['n']} ({sum(w['view']['failed'].values())})"),
    ("client loop lag p99 (ms)", lambda w: w["client_loop_lag"]["p99"]),
]
LOAD = {"downloads in flight, min": "downloads_in_flight_min", "download throughput (MiB/s)": "download_mb_per_s"}
LOAD.update({"tasks progressing": "tasks_progressing", "task progress messages": "task_progress_events"})
LOAD["download requests (200)"], LOAD["... of them offloaded (uWSGI stats)"] = "download_requests", "offloaded_requests"
LOAD_ROWS = [(title, lambda w, key=key: w["load"][key]) for title, key in LOAD.items()]
LOAD_ROWS.append(("worker RSS at end (MiB)", lambda w: w["server"]["after"].get("worker_rss_mb")))


def _columns(summary: dict, ratios: bool = True) -> list[tuple]:
    """idle, loaded (and loaded/idle) of each mode: the cell of a row is ``column(row's getter)``."""
    cols = []
    for mode, s in ((m, summary[m]) for m in MODES if m in summary):
        cols += [(f"{MODES[mode][0]}: {w}", lambda get, s=s, w=w: get(s[w])) for w in ("idle", "loaded")]
        if ratios:
            cols.append(("loaded/idle", lambda get, s=s: _ratio(get(s["loaded"]), get(s["idle"]))))
    return cols


def _ratio(loaded, idle) -> str:
    return cell(ratio(loaded, idle), "x") if isinstance(loaded, (int, float)) else ""


TEXT = """{subscribers} websocket subscribers, {rate} broadcasts/s, view probe `GET {view}` every {probe_ms} ms; load =
{downloads} slow downloads of a {file_mb} MiB file at {kib} KiB/s each + {tasks} report tasks ({task_rows} rows over
{task_seconds} s). Windows of {seconds} s, {repeats} repeat(s), medians. One uWSGI worker (gevent, 2000 cores),
embedded Redis. Target: p99 broadcast and view latency loaded within {target}x of idle with offloading."""


def markdown(results: dict) -> str:
    k, d, summary = results["knobs"], results["derived"], results["summary"]
    groups = next(iter(summary.values()))["loaded"]["cpu"]["groups"]
    cpu_rows = [(g, lambda w, g=g: report.cpu(g)[1](w)) for g in groups]
    cpu_rows.append(("machine busy (% of all cores)", lambda w: w["cpu"]["machine_pct"]))
    loaded = [(MODES[m][0], lambda get, m=m: get(summary[m]["loaded"])) for m in MODES if m in summary]
    text = report.fill(TEXT, {**k, **d, "kib": d["download_bps"] // 1024, "view": VIEW_PATH, "target": TARGET})
    lines = [*report.heading(results, "Offloading benchmark", text)]
    lines.append(report.grid("figure", LATENCY_ROWS, _columns(summary)))
    lines.append("")
    lines += [report.grid("during the loaded window", LOAD_ROWS, loaded), ""]
    lines += [report.grid("CPU, % of one core", cpu_rows, _columns(summary, ratios=False)), ""]
    return "\n".join(lines + report.closing(results)) + "\n"


def plot(results: dict) -> dict:
    curves = {f"{MODES[m][0]}, {w}": s[w] for m, s in results["summary"].items() for w in ("idle", "loaded")}
    style = lambda name: "-" if name.endswith("loaded") else ":"  # noqa: E731
    ratios = {f"{MODES[m][0]}: {n}": v for m, s in results["summary"].items() for n, v in s["ratios"].items()}
    title = f"offload benchmark {results['started']}: {results['knobs']['subscribers']} subscribers"
    panels = [report.cdf("websocket broadcast latency", {n: w["broadcast"] for n, w in curves.items()}, style)]
    panels.append(report.cdf(f"view latency (GET {VIEW_PATH})", {n: w["view"] for n, w in curves.items()}, style))
    panels.append(report.timeline("broadcast p99 per second", curves, style))
    return {"title": title, "panels": [*panels, report.bars("loaded / idle", "ratio (log)", ratios, target=TARGET)]}


def warnings(results: dict) -> list[str]:
    k, out = results["knobs"], []
    for mode, runs in results["runs"].items():
        for number, r in enumerate(runs, 1):
            for name in ("idle", "loaded"):
                out += report.window_warnings(f"{mode} run {number} {name}", r[name], "probe client")
            load, where = r["loaded"]["load"], f"{mode} run {number}"
            if (load["downloads_in_flight_min"] or 0) < k["downloads"]:
                out.append(f"{where}: at times only {load['downloads_in_flight_min']} of {k['downloads']} downloads")
            if load["tasks_progressing"] < k["tasks"]:
                out.append(f"{where}: only {load['tasks_progressing']} of {k['tasks']} tasks progressed in the window")
    return out
