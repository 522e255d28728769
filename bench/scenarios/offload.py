"""Offloading on vs off: websocket broadcast and view latency under heavy load.

Load: ``downloads`` slow clients reading a large protected file, ``tasks``
report tasks running, ``subscribers`` websockets getting ``rate`` messages/s.
Measured in two windows per server (idle: subscribers + publisher + view
probe only; loaded: the same plus the load), on two servers started in the
same run: ``offload`` (X-Sendfile through offload threads, tasks in the
spooler) and ``inline`` (``OFFLOAD_INLINE=1``: the file streamed by a Python
generator, the task run inside the POST view). Each mode is compared with
its own idle figures, so the ratios do not depend on the other server.

Target (the issue): with offloading, p99 broadcast latency and p99 view
latency stay within 2x of idle.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..clients import ClientProcess
from ..config import BenchConfig
from ..cpu import CpuMeter
from ..progress import Progress
from ..report import cell, table, warning_lines
from ..server import BenchServer, make_file
from ..stats import median_merge, ratio

NAME = "offload"
MODES = {
    "offload": {"label": "offloading", "env": {}},
    "inline": {"label": "offloading disabled", "env": {"OFFLOAD_INLINE": "1"}},
}
SERVER_ENV = {
    "WORKERS": "1",
    "CORES": "2000",
    # one spooler per task (uwsgi.ini takes the count only from uWSGI's own variable)
    "UWSGI_SPOOLER_PROCESSES": "4",
    # every subscriber comes from 127.0.0.1: lift the per-IP connection limit (default 200)
    "OFFLOAD_MAX_CONNECTIONS_PER_IP": "1000000",
}
CHANNEL = "public:bench"
VIEW_PATH = "/accounts/login/"
DOWNLOAD_NAME = "big.bin"
TARGET = 2.0


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    per_mode = [
        ("start", 6.0),
        ("connect", 2 + cfg.subscribers / 250),
        ("warmup", cfg.warmup),
        ("idle", cfg.seconds + 0.5),
        ("load", cfg.settle + 2),
        ("loaded", cfg.seconds + 0.5),
        ("stop", 6.0),
    ]
    return [("file", 1 + cfg.file_mb / 300)] + per_mode * (len(cfg.modes) * cfg.repeats)


def _wait(seconds: float, progress: Progress) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
        progress.draw()


def _window(probe: ClientProcess, name: str, cfg: BenchConfig, meter: CpuMeter, server: BenchServer, progress):
    """Open one measuring window; CPU and uWSGI counters are read at its edges."""
    counters_before = server.counters()
    probe.send("window", name=name, seconds=cfg.seconds)
    probe.wait("window_started", 10)
    cpu_before = meter.snapshot()
    ended = probe.wait("window_ended", cfg.seconds + 60, lambda _: progress.draw())
    cpu_after = meter.snapshot()
    counters_after = server.counters()
    return {
        "cpu": CpuMeter.delta(cpu_before, cpu_after),
        "server": {"before": counters_before, "after": counters_after},
        "open_sockets_at_end": ended["open_sockets"],
    }


def _load_figures(load_summary: dict, window: dict) -> dict:
    """Downloads in flight, their throughput and running tasks, inside the window."""
    start, end = window["start_ns"], window["end_ns"]
    samples = [s for s in load_summary["samples"] if start <= s[0] <= end]
    events = [e for e in load_summary["task_events"] if start <= e[0] < end]
    out = {
        "downloads_in_flight_min": min((s[1] for s in samples), default=None),
        "downloads_in_flight_max": max((s[1] for s in samples), default=None),
        "download_mb_per_s": None,
        "tasks_progressing": len({e[1] for e in events if e[2] == "running"}),
        "task_progress_events": len(events),
        "tasks_done_in_window": len({e[1] for e in events if e[2] == "done"}),
    }
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        seconds = (samples[-1][0] - samples[0][0]) / 1e9
        out["download_mb_per_s"] = round((samples[-1][2] - samples[0][2]) / seconds / 2**20, 1)
    return out


def run_mode(cfg: BenchConfig, mode: str, rep: int, work: Path, logs: Path, big: Path, progress: Progress) -> dict:
    """One server: idle window, then loaded window; everything stopped on the way out."""
    label = f"[{mode} {rep + 1}/{cfg.repeats}]"
    server = BenchServer(work / f"var-{mode}-{rep}", {**SERVER_ENV, **MODES[mode]["env"]}, [big])
    probe = load = None
    progress.step(f"{label} starting uWSGI")
    try:
        server.start()
        session = server.login("alice")
        deadline = cfg.warmup + cfg.settle + 2 * cfg.seconds + 300
        probe = ClientProcess(
            cfg.client_python,
            "probe",
            {
                "host": server.host,
                "port": server.port,
                "channel": CHANNEL,
                "api_key": server.live.api_key,
                "subscribers": cfg.subscribers,
                "rate": cfg.rate,
                "probe_path": VIEW_PATH,
                "probe_ms": cfg.probe_ms,
                "connect_concurrency": cfg.connect_concurrency,
                "deadline_s": deadline,
            },
            logs / f"{mode}-{rep}-probe.log",
        )
        progress.step(f"{label} connecting {cfg.subscribers} websockets")
        ready = probe.wait("ready", 180, lambda _: progress.draw())
        meter = CpuMeter(
            {
                "uWSGI worker": lambda: server.pids("worker"),
                "spoolers": lambda: server.pids("spooler"),
                "uWSGI master": lambda: server.pids("master"),
                "Redis": lambda: server.pids("redis"),
                "probe client": lambda: [probe.pid],
                "load client": lambda: [load.pid] if load else [],
                "orchestrator": lambda: [os.getpid()],
            }
        )
        progress.step(f"{label} warm-up (publishing)")
        _wait(cfg.warmup, progress)
        progress.step(f"{label} idle window")
        idle = _window(probe, "idle", cfg, meter, server, progress)

        progress.step(f"{label} starting {cfg.downloads} downloads + {cfg.tasks} tasks")
        counters_before_load = server.counters()
        load = ClientProcess(
            cfg.client_python,
            "load",
            {
                "host": server.host,
                "port": server.port,
                **session,
                "path": f"/downloads/{DOWNLOAD_NAME}",
                "downloads": cfg.downloads,
                "rate_bps": cfg.download_bytes_per_s,
                "rcvbuf": 64 * 1024,
                "tasks": cfg.tasks,
                "task_seconds": cfg.task_seconds,
                "task_rows": cfg.task_rows,
                "deadline_s": deadline,
            },
            logs / f"{mode}-{rep}-load.log",
        )
        load.send("start")
        loaded_event = load.wait("loaded", 90, lambda _: progress.draw())
        _wait(cfg.settle, progress)
        progress.step(f"{label} loaded window")
        loaded = _window(probe, "loaded", cfg, meter, server, progress)

        progress.step(f"{label} stopping")
        load.send("stop")
        load_summary = load.wait("summary", 60)
        counters_after_load = server.counters()
        probe.send("stop")
        probe_summary = probe.wait("summary", 60)
    finally:
        for client in (load, probe):
            if client is not None:
                client.close()
        server.stop(log_copy=logs / f"{mode}-{rep}-uwsgi.log")

    windows = probe_summary["windows"]
    idle.update(windows["idle"])
    loaded.update(windows["loaded"])
    loaded["load"] = _load_figures(load_summary, windows["loaded"])
    # uWSGI counts a request as offloaded when it hands it over (at the start of a download)
    loaded["load"]["offloaded_requests"] = counters_after_load.get("offloaded_requests", 0) - counters_before_load.get(
        "offloaded_requests", 0
    )
    loaded["load"]["download_requests"] = load_summary["downloads"]["statuses"].get("200", 0)
    return {
        "mode": mode,
        "connect_s": ready["connect_s"],
        "idle": idle,
        "loaded": loaded,
        "load_start": loaded_event,
        "load_summary": {k: load_summary[k] for k in ("downloads", "reports")},
        "probe_total": probe_summary["total"],
    }


def verdict(summary: dict) -> dict:
    """loaded/idle ratios of p50/p99 broadcast and view latency per mode, and the target."""
    out = {}
    for mode, result in summary.items():
        ratios = {
            f"{kind}_{q}": ratio(result["loaded"][kind][q], result["idle"][kind][q])
            for kind in ("broadcast", "view")
            for q in ("p50", "p99")
        }
        met = all(r is not None and r <= TARGET for r in (ratios["broadcast_p99"], ratios["view_p99"]))
        out[mode] = {"ratios": ratios, "target": TARGET, "met": met}
    return out


def run(cfg: BenchConfig, work: Path, logs: Path, progress: Progress) -> dict:
    progress.step(f"writing a {cfg.file_mb} MiB file")
    big = make_file(work / "files" / DOWNLOAD_NAME, cfg.file_mb)
    runs: dict[str, list] = {mode: [] for mode in cfg.modes}
    for rep in range(cfg.repeats):
        order = cfg.modes if rep % 2 == 0 else list(reversed(cfg.modes))  # alternate: no order bias
        for mode in order:
            runs[mode].append(run_mode(cfg, mode, rep, work, logs, big, progress))
    summary = {mode: median_merge(results) for mode, results in runs.items()}
    return {"scenario": NAME, "runs": runs, "summary": summary, "verdict": verdict(summary)}


# -- Markdown ---------------------------------------------------------------


def _lost(window: dict) -> str:
    b = window["broadcast"]
    return f"{b['lost']} / {b['dup']}"


def markdown(results: dict) -> str:
    summary, verdicts, cfg = results["summary"], results["verdict"], results["config"]
    modes = [m for m in MODES if m in summary]
    head = ["figure"]
    for mode in modes:
        name = MODES[mode]["label"]
        head += [f"{name}: idle", f"{name}: loaded", "loaded/idle"]

    def row(title: str, get, fmt=cell, with_ratio=True) -> list[str]:
        cells = [title]
        for mode in modes:
            idle, loaded = get(summary[mode]["idle"]), get(summary[mode]["loaded"])
            cells += [fmt(idle), fmt(loaded)]
            cells.append(cell(ratio(loaded, idle), suffix="x") if with_ratio else "")
        return cells

    latency_rows = [
        row("broadcast p50 (ms)", lambda w: w["broadcast"]["p50"]),
        row("**broadcast p99 (ms)**", lambda w: w["broadcast"]["p99"]),
        row("broadcast max (ms)", lambda w: w["broadcast"]["max"]),
        row("view p50 (ms)", lambda w: w["view"]["p50"]),
        row("**view p99 (ms)**", lambda w: w["view"]["p99"]),
        row("publish API p99 (ms)", lambda w: w["publish"]["p99"]),
        row("deliveries/s", lambda w: w["broadcast"]["deliveries_per_s"], with_ratio=False),
        row("expected deliveries/s", lambda w: w["broadcast"]["expected_per_s"], with_ratio=False),
        row("lost / duplicate deliveries", _lost, fmt=str, with_ratio=False),
        row("view probes (failed)", lambda w: f"{w['view']['n']} ({sum(w['view']['failed'].values())})", str, False),
        row("client loop lag p99 (ms)", lambda w: w["client_loop_lag"]["p99"], with_ratio=False),
    ]

    load_head = ["during the loaded window", *(MODES[m]["label"] for m in modes)]
    load_rows = []
    for title, get in (
        (f"downloads in flight, min (of {cfg['downloads']})", lambda r: r["loaded"]["load"]["downloads_in_flight_min"]),
        ("download throughput (MiB/s)", lambda r: r["loaded"]["load"]["download_mb_per_s"]),
        (f"tasks progressing (of {cfg['tasks']})", lambda r: r["loaded"]["load"]["tasks_progressing"]),
        ("task progress messages", lambda r: r["loaded"]["load"]["task_progress_events"]),
        ("download requests (200)", lambda r: r["loaded"]["load"]["download_requests"]),
        ("... of them offloaded (uWSGI stats)", lambda r: r["loaded"]["load"]["offloaded_requests"]),
        ("spooler processes", lambda r: r["loaded"]["server"]["after"].get("spooler_processes")),
        ("worker RSS at end (MiB)", lambda r: r["loaded"]["server"]["after"].get("worker_rss_mb")),
    ):
        load_rows.append([title, *(cell(get(summary[m])) for m in modes)])

    groups = list(summary[modes[0]]["loaded"]["cpu"]["groups"])
    cpu_head = ["CPU, % of one core", *(f"{MODES[m]['label']}: {w}" for m in modes for w in ("idle", "loaded"))]
    cpu_rows = [
        [g, *(cell(summary[m][w]["cpu"]["groups"][g]["core_pct"]) for m in modes for w in ("idle", "loaded"))]
        for g in groups
    ]
    cpu_rows.append(
        [
            "machine busy (% of all cores)",
            *(cell(summary[m][w]["cpu"]["machine_pct"]) for m in modes for w in ("idle", "loaded")),
        ]
    )

    lines = [
        f"## Offloading benchmark, {results['started']}",
        "",
        f"`{results['command']}` on {results['machine']['cpus']} CPUs, commit {results['machine']['commit']}: "
        f"{cfg['subscribers']} websocket subscribers, {cfg['rate']:g} broadcasts/s, view probe "
        f"`GET {VIEW_PATH}` every {cfg['probe_ms']:g} ms; load = {cfg['downloads']} slow downloads of a "
        f"{cfg['file_mb']} MiB file at {results['derived']['download_kib_per_s']} KiB/s each + {cfg['tasks']} report "
        f"tasks ({cfg['task_rows']:,} rows over {results['derived']['task_seconds']:g} s). "
        f"Windows of {cfg['seconds']:g} s; {cfg['repeats']} repeat(s), medians shown. One uWSGI worker "
        f"(gevent, {SERVER_ENV['CORES']} cores), embedded Redis.",
        "",
        table(head, latency_rows),
        "",
        table(load_head, load_rows),
        "",
        table(cpu_head, cpu_rows),
        "",
        f"**Target** (p99 broadcast and p99 view latency loaded within {TARGET:g}x of idle, with offloading):",
        "",
    ]
    per_run = {
        mode: ", ".join(
            f"{cell(ratio(r['loaded']['broadcast']['p99'], r['idle']['broadcast']['p99']), suffix='x')}"
            f" / {cell(ratio(r['loaded']['view']['p99'], r['idle']['view']['p99']), suffix='x')}"
            for r in results["runs"][mode]
        )
        for mode in modes
    }
    for mode in modes:
        v = verdicts[mode]
        r = v["ratios"]
        state = "met" if v["met"] else "NOT met"
        if mode == "inline":
            state = "for comparison (no target)"
        lines.append(
            f"* {MODES[mode]['label']}: broadcast p99 {cell(r['broadcast_p99'], suffix='x')}, "
            f"view p99 {cell(r['view_p99'], suffix='x')} of idle: {state} "
            f"(each run, broadcast / view p99: {per_run[mode]})"
        )
    lines += warning_lines(results.get("warnings"))
    return "\n".join(lines) + "\n"


def warnings(results: dict) -> list[str]:
    """Things that make a figure doubtful, per run: the reader should see them next to it."""
    cfg, out = results["config"], []
    for mode, runs in results["runs"].items():
        for number, result in enumerate(runs, 1):
            for name in ("idle", "loaded"):
                w, where = result[name], f"{mode} run {number} {name}"
                b, lag, cpu = w["broadcast"], w["client_loop_lag"]["p99"] or 0, w["cpu"]["groups"]
                if b["lost"] or b["dup"]:
                    out.append(f"{where}: {b['lost']} lost, {b['dup']} duplicate deliveries")
                if w["disconnects"]["count"]:
                    out.append(f"{where}: {w['disconnects']['count']} websockets closed {w['disconnects']['codes']}")
                if lag > 20:
                    out.append(f"{where}: the probe client's event loop lagged (p99 {lag} ms)")
                if cpu["probe client"]["core_pct"] > 70:
                    out.append(f"{where}: the probe client used {cpu['probe client']['core_pct']:.0f}% of a core")
                if cpu["other"]["core_pct"] > 20:
                    out.append(f"{where}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
            load, where = result["loaded"]["load"], f"{mode} run {number}"
            if (load["downloads_in_flight_min"] or 0) < cfg["downloads"]:
                out.append(f"{where}: at times only {load['downloads_in_flight_min']} of {cfg['downloads']} downloads")
            if load["tasks_progressing"] < cfg["tasks"]:
                out.append(
                    f"{where}: only {load['tasks_progressing']} of {cfg['tasks']} tasks progressed in the window"
                )
    return out
