"""Fan-out on one channel: latency, saturation, memory, connect storm; Channels 4 as anchor.

One uWSGI worker (gevent, embedded Redis, ``offload.testing.LiveServer``)
and, in the same run against the same Redis with the same load client, the
four Django Channels 4 setups of ``bench/channels_anchor`` (daphne/uvicorn x
RedisChannelLayer/RedisPubSubChannelLayer). Steps (``BENCH_FANOUT_*`` knobs):

1. ours, 1,000 sockets: a fixed-rate window (5 msgs/s through the HTTP API),
   then saturation steps: a separate process publishes through Redis exactly
   as ``offload.publish()`` does (EVALSHA of ``offload/lua/publish.lua``) at
   increasing rates while the client keeps timing the HTTP API at 5/s;
2. ours, 5,000 sockets: worker RSS before/after connecting (idle memory per
   socket), a fixed-rate window, and the time for one broadcast to reach all;
3. ours, connect storm: 10,000 websockets opened at once by two client
   processes, then a fixed-rate window over all 10,000 (Redis publisher);
4. each Channels setup, 1,000 sockets: the same fixed-rate window, then a
   saturation window (HTTP API in closed-loop streams: Channels has no other
   publish path).

CPU of the worker (or the Channels process), Redis, publisher and clients is
read from /proc for every window, so a client-bound figure is recognisable.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from ..channels_anchor.server import COMBINATIONS, ChannelsServer
from ..clients import ClientProcess
from ..config import PROJECT_DIR, BenchConfig
from ..cpu import CpuMeter
from ..progress import Progress
from ..report import cell, latency_cells, table, verdict_table, warning_lines
from ..server import BenchServer

NAME = "fanout"
CHANNEL = "public:bench"
EXTERNAL_BASE = 1_000_000  # bench/loadclient/fanout.py
HISTORY = {"prefix": "offload:", "history_size": 100, "history_ttl": 3600}  # project/settings.py "public"


def _somaxconn() -> str:
    try:
        return Path("/proc/sys/net/core/somaxconn").read_text().strip()
    except OSError:
        return "1024"


SERVER_ENV = {
    "WORKERS": "1",
    "CORES": "2000",
    "OFFLOAD_MAX_CONNECTIONS_PER_IP": "1000000",
    "OFFLOAD_STATS_INTERVAL": "0",
    "UWSGI_LISTEN": _somaxconn(),
}


def knobs() -> dict:
    env = os.environ
    return {
        "seconds": float(env.get("BENCH_FANOUT_SECONDS", 10)),
        "sat_seconds": float(env.get("BENCH_FANOUT_SAT_SECONDS", 5)),
        "rate": float(env.get("BENCH_FANOUT_RATE", 5)),
        "small": int(env.get("BENCH_FANOUT_SMALL", 1000)),
        "small_clients": int(env.get("BENCH_FANOUT_SMALL_CLIENTS", 2)),
        "large": int(env.get("BENCH_FANOUT_LARGE", 5000)),
        "storm": int(env.get("BENCH_FANOUT_STORM", 10000)),
        "sat_rates": [int(x) for x in env.get("BENCH_FANOUT_SAT_RATES", "50,100,200,300").split(",") if x],
        "channels_streams": int(env.get("BENCH_FANOUT_CHANNELS_STREAMS", 4)),
        "anchors": [
            x for x in env.get("BENCH_FANOUT_ANCHORS", ",".join(f"{s}-{la}" for s, la in COMBINATIONS)).split(",") if x
        ],
    }


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    k = knobs()
    ours = [
        ("start", 6.0),
        ("connect small", 4.0),
        ("fanout small", k["seconds"] + 3),
        *[("saturation", k["sat_seconds"] + 3)] * len(k["sat_rates"]),
        ("connect large", 10.0),
        ("fanout large", k["seconds"] + 4),
        ("storm", 10.0),
        ("fanout storm", k["seconds"] + 6),
    ]
    anchor = [("start", 4.0), ("connect", 8.0), ("fanout", k["seconds"] + 3), ("saturation", k["sat_seconds"] + 6)]
    return ours + anchor * len(k["anchors"]) + [("stop", 5.0)]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Publisher:
    """``bench/redis_publisher.py`` in the project venv: offload.publish() minus Django."""

    def __init__(self, redis_url: str, rate: float, seconds: float, first_seq: int, log: Path) -> None:
        config = {"redis_url": redis_url, "channel": CHANNEL, "rate": rate, "seconds": seconds, "first_seq": first_seq}
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.redis_publisher", json.dumps({**config, **HISTORY})],
            cwd=PROJECT_DIR,
            stdout=subprocess.PIPE,
            stderr=open(log, "ab"),  # the child owns it
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self, timeout: float) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        return json.loads(out.decode().strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _client(cfg: BenchConfig, name: str, host: str, port: int, api_key: str, n: int, logs: Path, **extra):
    config = {
        "host": host,
        "port": port,
        "channel": CHANNEL,
        "api_key": api_key,
        "subscribers": n,
        "connect_concurrency": extra.pop("connect_concurrency", 100),
        "deadline_s": 600,
        **extra,
    }
    return ClientProcess(cfg.client_python, "fanout", config, logs / f"{name}-client.log")


def _window(clients, meter: CpuMeter, name: str, seconds: float, progress: Progress, **cmds) -> dict:
    """One window on every client (the first publishes through HTTP if asked); CPU across it."""
    for i, c in enumerate(clients):
        c.send("window", name=name, seconds=seconds, **(cmds if i == 0 else {}))
    for c in clients:
        c.wait("window_started", 60)
    before = meter.snapshot()
    ended = [c.wait("window_ended", seconds + 60, lambda _: progress.draw()) for c in clients]
    after = meter.snapshot()
    for c in clients[1:]:  # subscriber-only processes count the first one's HTTP publishes
        c.send("expect", name=name, seqs=ended[0].get("published_ok", []))
    return {"cpu": CpuMeter.delta(before, after), "open_sockets": sum(e["open_sockets"] for e in ended)}


def _drain(clients, progress: Progress, limit: float = 60.0) -> float:
    """Wait until no client receives anything for 0.5 s (a saturation step's backlog); seconds taken."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < limit:
        counts = []
        for c in clients:
            c.send("ping")
            counts.append(c.wait("pong", limit, lambda _: progress.draw())["arrivals"])
        if counts == last:
            break
        last = counts
        time.sleep(0.5)
    return round(time.monotonic() - started, 2)


def _finish(clients, windows: dict[str, dict]) -> list[dict]:
    """Stop the clients and merge their per-window figures into ``windows``."""
    summaries = []
    for c in clients:
        c.send("stop")
    for c in clients:
        summaries.append(c.wait("summary", 120))
    for name, w in windows.items():
        parts = [s["windows"][name] for s in summaries if name in s["windows"]]
        w.update(parts[0])
        if len(parts) > 1:  # several client processes: add counts, take the worst percentiles
            b = w["broadcast"]
            for key in ("expected", "lost", "dup", "arrived_in_window", "deliveries_per_s", "n"):
                b[key] = round(sum(p["broadcast"][key] for p in parts), 1)
            for key in ("p50", "p90", "p99", "p999", "max"):
                values = [p["broadcast"][key] for p in parts if p["broadcast"][key] is not None]
                b[key] = max(values) if values else None
            b["merged_from"] = len(parts)
    return summaries


def _per_delivery(window: dict, group: str) -> float | None:
    arrived = window["broadcast"]["arrived_in_window"]
    used = window["cpu"]["groups"][group]["cpu_s"]
    return round(used / arrived * 1e6, 3) if arrived else None


def run_ours(cfg: BenchConfig, k: dict, work: Path, logs: Path, progress: Progress) -> tuple[dict, str]:
    server = BenchServer(work / "var-ours", dict(SERVER_ENV))
    out: dict = {"windows": {}}
    clients: list[ClientProcess] = []
    publisher: Publisher | None = None
    progress.step("[ours] starting uWSGI (1 worker)")
    server.start()
    redis_url = f"unix://{server.var_dir / 'redis.sock'}"
    worker = server.pids("worker")[0]
    meter = CpuMeter(
        {
            "server": lambda: [worker],
            "Redis": lambda: server.pids("redis"),
            "clients": lambda: [c.pid for c in clients],
            "publisher": lambda: [publisher.pid] if publisher else [],
            "orchestrator": lambda: [os.getpid()],
        }
    )
    host, port, key = server.host, server.port, server.live.api_key
    try:
        # -- 1,000 sockets: fixed rate, then saturation steps
        progress.step(f"[ours] connecting {k['small']}")
        rss0 = rss_kib(worker)
        # a publish probe of its own (its API timings wait for no subscriber's
        # work), then the subscribers spread over several processes: one load
        # client cannot take a saturated worker's deliveries
        parts = k["small_clients"]
        clients = [_client(cfg, "ours-small-probe", host, port, key, 0, logs)] + [
            _client(cfg, f"ours-small{i}", host, port, key, k["small"] // parts + (i < k["small"] % parts), logs)
            for i in range(parts)
        ]
        readies = [c.wait("ready", 120, lambda _: progress.draw()) for c in clients]
        out["small_connect_s"] = max(r["connect_s"] for r in readies)
        out["small_rss_kib"] = [rss0, rss_kib(worker)]
        windows = {}
        progress.step(f"[ours] fan-out {k['small']} x {k['rate']:g}/s")
        time.sleep(1)
        windows["fanout_small"] = _window(clients, meter, "fanout_small", k["seconds"], progress, rate=k["rate"])
        first = 0
        for rate in k["sat_rates"]:
            name = f"sat_{rate}"
            progress.step(f"[ours] saturation: {rate} publishes/s x {k['small']} sockets")
            publisher = Publisher(
                redis_url, rate, k["sat_seconds"] + 1.0, EXTERNAL_BASE + first, logs / "publisher.log"
            )
            time.sleep(0.5)
            windows[name] = _window(clients, meter, name, k["sat_seconds"], progress, rate=k["rate"])
            res = publisher.result(30)
            publisher = None
            res["first"] -= EXTERNAL_BASE
            windows[name]["publisher"] = res
            for c in clients:
                c.send("external", name=name, first=res["first"], count=res["count"])
            first = res["first"] + res["count"]
            windows[name]["drain_s"] = _drain(clients, progress)  # backlog gone before the next step
        _finish(clients, windows)
        clients = []
        out["windows"].update(windows)

        # -- 5,000 sockets: idle memory, fixed rate, one broadcast reaching all
        progress.step(f"[ours] connecting {k['large']} (idle RSS)")
        time.sleep(1)
        rss0 = rss_kib(worker)
        clients = [_client(cfg, "ours-large", host, port, key, k["large"], logs, connect_concurrency=200)]
        ready = clients[0].wait("ready", 180, lambda _: progress.draw())
        time.sleep(2)
        rss1 = rss_kib(worker)
        out["large_connect_s"] = ready["connect_s"]
        out["idle_rss"] = {"before_kib": rss0, "after_kib": rss1, "sockets": k["large"]}
        out["idle_rss"]["per_socket_kib"] = round((rss1 - rss0) / k["large"], 2) if rss0 and rss1 else None
        progress.step(f"[ours] fan-out {k['large']} x {k['rate']:g}/s")
        windows = {"fanout_large": _window(clients, meter, "fanout_large", k["seconds"], progress, rate=k["rate"])}
        _finish(clients, windows)
        clients = []
        out["windows"].update(windows)

        # -- connect storm, then a fixed-rate window over all of them
        progress.step(f"[ours] connect storm: {k['storm']} at once")
        time.sleep(2)
        rss0 = rss_kib(worker)
        half = k["storm"] // 2
        start_at = time.time_ns() + 2_000_000_000  # both processes imported and waiting
        clients = [
            _client(
                cfg,
                f"ours-storm{i}",
                host,
                port,
                key,
                n,
                logs,
                connect_concurrency=n,
                connect_timeout=10.0,
                start_at_ns=start_at,
            )
            for i, n in enumerate((half, k["storm"] - half))
        ]
        before = meter.snapshot()
        readies = [c.wait("ready", 120, lambda _: progress.draw()) for c in clients]
        cpu = meter.delta(before, meter.snapshot())
        out["storm"] = {
            "sockets": k["storm"],
            "connect_s": max(r["connect_s"] for r in readies),
            "retries": {k2: v for r in readies for k2, v in r["connect_errors"].items()},
            "counters": server.counters(),
            "cpu": cpu,  # from the start signal to the last "ready" (clients' imports excluded)
            "server_ms_per_connect": round(1000 * cpu["groups"]["server"]["cpu_s"] / k["storm"], 3),
        }
        time.sleep(2)
        rss1 = rss_kib(worker)
        out["storm"]["rss_kib"] = [rss0, rss1]
        out["storm"]["per_socket_kib"] = round((rss1 - rss0) / k["storm"], 2) if rss0 and rss1 else None
        progress.step(f"[ours] fan-out {k['storm']} x {k['rate']:g}/s (Redis publisher)")
        publisher = Publisher(redis_url, k["rate"], k["seconds"] + 0.5, EXTERNAL_BASE, logs / "publisher.log")
        time.sleep(0.25)
        windows = {"fanout_storm": _window(clients, meter, "fanout_storm", k["seconds"], progress)}
        res = publisher.result(30)
        publisher = None
        res["first"] -= EXTERNAL_BASE
        windows["fanout_storm"]["publisher"] = res
        for c in clients:
            c.send("external", name="fanout_storm", first=res["first"], count=res["count"])
        _finish(clients, windows)
        clients = []
        out["windows"].update(windows)
    except BaseException:
        for c in clients:
            c.close()
        if publisher is not None:
            publisher.close()
        server.stop(log_copy=logs / "ours-uwsgi.log")
        raise
    for w in out["windows"].values():
        w["server_us_per_delivery"] = _per_delivery(w, "server")
    out["server_obj"] = server
    return out, redis_url


def run_anchor(cfg: BenchConfig, k: dict, combo: str, redis_url: str, logs: Path, progress: Progress) -> dict:
    srv, layer = combo.split("-")
    anchor = ChannelsServer(srv, layer, redis_url, api_key="bench-key", log_path=logs / f"channels-{combo}.log")
    label = f"[{anchor.name}]"
    progress.step(f"{label} starting")
    anchor.start()
    clients: list[ClientProcess] = []
    out: dict = {"label": anchor.label}
    meter = CpuMeter(
        {
            "server": lambda: [anchor.pid] if anchor.pid else [],
            "Redis": lambda: _redis_pids(redis_url),
            "clients": lambda: [c.pid for c in clients],
            "orchestrator": lambda: [os.getpid()],
        }
    )
    try:
        progress.step(f"{label} connecting {k['small']}")
        rss0 = rss_kib(anchor.pid)
        clients = [_client(cfg, anchor.name, anchor.host, anchor.port, anchor.api_key, k["small"], logs)]
        ready = clients[0].wait("ready", 180, lambda _: progress.draw())
        time.sleep(1)
        rss1 = rss_kib(anchor.pid)
        out["connect_s"] = ready["connect_s"]
        out["idle_rss"] = {
            "before_kib": rss0,
            "after_kib": rss1,
            "per_socket_kib": round((rss1 - rss0) / k["small"], 2),
        }
        windows = {}
        progress.step(f"{label} fan-out {k['small']} x {k['rate']:g}/s")
        windows["fanout_small"] = _window(clients, meter, "fanout_small", k["seconds"], progress, rate=k["rate"])
        time.sleep(1)
        progress.step(f"{label} saturation: {k['channels_streams']} publish streams")
        windows["sat"] = _window(clients, meter, "sat", k["sat_seconds"], progress, streams=k["channels_streams"])
        _finish(clients, windows)
        clients = []
        for w in windows.values():
            w["server_us_per_delivery"] = _per_delivery(w, "server")
        out["windows"] = windows
    finally:
        for c in clients:
            c.close()
        anchor.stop()
    return out


_REDIS_PIDS: dict[str, list[int]] = {}


def _redis_pids(redis_url: str) -> list[int]:
    return _REDIS_PIDS.get(redis_url, [])


_BACKLOG_SYSCTLS = ("/proc/sys/net/core/somaxconn", "/proc/sys/net/ipv4/tcp_max_syn_backlog")


def raise_backlog(wanted: int) -> dict[str, tuple[int, int]]:
    """Raise the kernel's listen backlog limits to ``wanted`` (root only), as a
    deployment expecting connect storms would; returns {sysctl: (old, new)}.

    With the default somaxconn (4,096 here) 10,000 simultaneous SYNs overflow
    the accept queue whatever the server does: dropped handshakes wait for
    TCP's SYN retransmission (1 s, 3 s, 7 s...). Call :func:`restore_backlog`.
    """
    changed = {}
    for path in _BACKLOG_SYSCTLS:
        try:
            old = int(Path(path).read_text())
            if old < wanted:
                Path(path).write_text(str(wanted))
            changed[path] = (old, int(Path(path).read_text()))
        except (OSError, ValueError):
            continue
    SERVER_ENV["UWSGI_LISTEN"] = _somaxconn()
    return changed


def restore_backlog(changed: dict[str, tuple[int, int]]) -> None:
    for path, (old, new) in changed.items():
        if old != new:
            try:
                Path(path).write_text(str(old))
            except OSError:
                pass
    SERVER_ENV["UWSGI_LISTEN"] = _somaxconn()


def run(cfg: BenchConfig, work: Path, logs: Path, progress: Progress) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # uWSGI inherits it (10,000 sockets)
    k = knobs()
    backlog = raise_backlog(2 * k["storm"])
    try:
        ours, redis_url = run_ours(cfg, k, work, logs, progress)
    finally:
        restore_backlog(backlog)
    ours["backlog_sysctls"] = {Path(p).name: v for p, v in backlog.items()}
    ours["uwsgi_listen"] = max([new for _, new in backlog.values()] or [int(_somaxconn())])
    server: BenchServer = ours.pop("server_obj")
    _REDIS_PIDS[redis_url] = server.pids("redis")
    anchors = {}
    try:
        for combo in k["anchors"]:
            try:
                anchors[combo] = run_anchor(cfg, k, combo, redis_url, logs, progress)
            except Exception as exc:  # one broken setup must not lose the rest of the run
                anchors[combo] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        progress.step("stopping uWSGI")
        server.stop(log_copy=logs / "ours-uwsgi.log")
    results = {"scenario": NAME, "knobs": k, "rlimit_nofile": [soft, hard], "ours": ours, "channels": anchors}
    results["comparison"] = compare(results)
    results["verdict"] = verdict(results)
    return results


# -- figures --------------------------------------------------------------


def _best_sat(ours: dict) -> dict:
    """The saturation step with the most deliveries/s."""
    steps = [w for name, w in ours["windows"].items() if name.startswith("sat_")]
    return max(steps, key=lambda w: w["broadcast"]["deliveries_per_s"]) if steps else {}


def compare(results: dict) -> dict:
    ours = results["ours"]
    best = _best_sat(ours)
    ok = {c: a for c, a in results["channels"].items() if "windows" in a}
    if not ok or not best:
        return {}
    ch_best = max(ok, key=lambda c: ok[c]["windows"]["sat"]["broadcast"]["deliveries_per_s"])
    ch_rate = ok[ch_best]["windows"]["sat"]["broadcast"]["deliveries_per_s"]
    ch_cpu = min(
        (
            a["windows"]["sat"]["server_us_per_delivery"]
            for a in ok.values()
            if a["windows"]["sat"]["server_us_per_delivery"]
        ),
        default=None,
    )
    ch_p99 = min((a["windows"]["fanout_small"]["broadcast"]["p99"] or 1e9) for a in ok.values())
    ours_p99 = ours["windows"]["fanout_small"]["broadcast"]["p99"]
    return {
        "channels_best_saturation": ch_best,
        "channels_best_deliveries_per_s": ch_rate,
        "deliveries_ratio": round(best["broadcast"]["deliveries_per_s"] / ch_rate, 1) if ch_rate else None,
        "channels_best_us_per_delivery": ch_cpu,
        "cpu_ratio": round(ch_cpu / best["server_us_per_delivery"], 1)
        if ch_cpu and best["server_us_per_delivery"]
        else None,
        "channels_best_fanout_p99_ms": ch_p99,
        "fanout_p99_ratio": round(ch_p99 / ours_p99, 1) if ours_p99 else None,
    }


def verdict(results: dict) -> dict:
    ours, cmp_ = results["ours"], results["comparison"]
    w = ours["windows"]
    best = _best_sat(ours)

    def lost_dup(name: str) -> int | None:
        b = w.get(name, {}).get("broadcast")
        return None if b is None else b["lost"] + b["dup"]

    sat_api = max((x["publish"]["p99"] or 0) for n, x in w.items() if n.startswith("sat_")) if best else None
    items = {
        "server CPU per delivery, saturated (us)": (best.get("server_us_per_delivery"), "<=", 2.5),
        "deliveries/s at saturation, 1,000 sockets": (best.get("broadcast", {}).get("deliveries_per_s"), ">=", 160_000),
        "x Channels' best (deliveries/s, same run)": (cmp_.get("deliveries_ratio"), ">=", 30),
        "p99 at 10,000 sockets x 5 msgs/s (ms)": (w.get("fanout_storm", {}).get("broadcast", {}).get("p99"), "<=", 50),
        "one broadcast reaching all 5,000, median (ms)": (
            w.get("fanout_large", {}).get("broadcast", {}).get("all_reached", {}).get("p50"),
            "<=",
            100,
        ),
        "HTTP publish API p99 while saturated (ms)": (sat_api, "<=", 100),
        "RSS per idle connection (KiB)": (ours.get("idle_rss", {}).get("per_socket_kib"), "<=", 20),
        "10,000 connects at once (s)": (ours.get("storm", {}).get("connect_s"), "<=", 4),
        "lost + duplicate, fixed-rate windows": (
            sum(
                x
                for x in (lost_dup("fanout_small"), lost_dup("fanout_large"), lost_dup("fanout_storm"))
                if x is not None
            ),
            "<=",
            0,
        ),
    }
    out = {}
    for name, (value, op, target) in items.items():
        met = None if value is None else (value <= target if op == "<=" else value >= target)
        out[name] = {"value": value, "op": op, "target": target, "met": met}
    return out


# -- Markdown ---------------------------------------------------------------


def _kernel_pct(group: dict) -> float | None:
    """Kernel share of a group's CPU (socket writes on loopback include the receiver's TCP input)."""
    if not group.get("cpu_s") or "sys_s" not in group:
        return None
    return round(100 * group["sys_s"] / group["cpu_s"])


def _row(title: str, w: dict, cpu_group: str = "server") -> list[str]:
    b, p, cpu = w["broadcast"], w["publish"], w["cpu"]["groups"]
    return [
        title,
        *latency_cells(b),
        cell(b["deliveries_per_s"]),
        f"{b['lost']} / {b['dup']}",
        cell(p["p99"]),
        cell(w.get("server_us_per_delivery")),
        cell(cpu[cpu_group]["core_pct"]),
        cell(_kernel_pct(cpu[cpu_group])),
        cell(cpu["clients"]["core_pct"]),
        cell(cpu["Redis"]["core_pct"]),
        cell(cpu.get("publisher", {}).get("core_pct")),
        cell(w["client_loop_lag"]["p99"]),
    ]


HEAD = [
    "window",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "deliveries/s",
    "lost / dup",
    "publish API p99 ms",
    "server CPU µs/delivery",
    "server %core",
    "server kernel %",
    "client %core",
    "Redis %core",
    "publisher %core",
    "client lag p99 ms",
]


def cpu_floors(results: dict) -> dict:
    """What the 2-core box allows at best, from the CPU the run measured.

    Server and load client share the machine's CPUs: a broadcast to every
    socket cannot complete before (server + client CPU it needs) / CPUs, and
    a connect storm cannot end before (server + client CPU of the storm) /
    CPUs, however the work is scheduled. A measured figure near its floor is
    bound by the box, not by a wait in the server.
    """
    ours = results["ours"]
    cpus = results["machine"]["cpus"]
    out = {}
    w = ours["windows"].get("fanout_storm")
    if w and w["broadcast"].get("publishes_ok"):
        g = w["cpu"]["groups"]
        per_broadcast = (g["server"]["cpu_s"] + g["clients"]["cpu_s"]) / w["broadcast"]["publishes_ok"]
        out["broadcast_10k_ms"] = round(1000 * per_broadcast / cpus, 1)
    storm = ours.get("storm", {})
    if storm.get("cpu"):
        g = storm["cpu"]["groups"]
        out["storm_s"] = round((g["server"]["cpu_s"] + g["clients"]["cpu_s"] + g["Redis"]["cpu_s"]) / cpus, 2)
    return out


def _storm_cpu(storm: dict) -> str:
    groups = storm.get("cpu", {}).get("groups", {})
    return ", ".join(
        f"{name} {g['cpu_s']:g} s ({_kernel_pct(g) or 0:g} % kernel)"
        for name, g in groups.items()
        if name in ("server", "clients", "Redis")
    )


def markdown(results: dict) -> str:
    k, ours, anchors, cmp_ = results["knobs"], results["ours"], results["channels"], results["comparison"]
    w = ours["windows"]
    rows = [_row(f"ours, {k['small']:,} sockets x {k['rate']:g}/s (HTTP API)", w["fanout_small"])]
    for rate in k["sat_rates"]:
        x = w[f"sat_{rate}"]
        pub = x.get("publisher", {})
        offered = pub.get("count", 0) / max(pub.get("seconds", 1), 1e-9) * k["small"]
        rows.append(_row(f"ours, saturation: Redis publisher {rate}/s (offered {offered:,.0f} deliveries/s)", x))
    rows.append(_row(f"ours, {k['large']:,} sockets x {k['rate']:g}/s (HTTP API)", w["fanout_large"]))
    if "fanout_storm" in w:
        rows.append(_row(f"ours, {k['storm']:,} sockets x {k['rate']:g}/s (Redis publisher)", w["fanout_storm"]))
    for combo, a in anchors.items():
        if "windows" not in a:
            rows.append([f"{combo}: FAILED ({a.get('error', '')[:120]})"] + [""] * (len(HEAD) - 1))
            continue
        rows.append(_row(f"{a['label']}, {k['small']:,} x {k['rate']:g}/s", a["windows"]["fanout_small"]))
        rows.append(
            _row(f"{a['label']}, saturation: {k['channels_streams']} HTTP publish streams", a["windows"]["sat"])
        )

    mem_rows = [
        [
            "ours (uWSGI worker)",
            f"{ours['idle_rss']['sockets']:,}",
            cell(ours["idle_rss"]["per_socket_kib"]),
            cell(ours["large_connect_s"]),
        ],
    ]
    if "storm" in ours:
        s = ours["storm"]
        mem_rows.append(
            ["ours, connect storm (all at once)", f"{s['sockets']:,}", cell(s["per_socket_kib"]), cell(s["connect_s"])]
        )
    for a in anchors.values():
        if "windows" in a:
            mem_rows.append(
                [a["label"], f"{k['small']:,}", cell(a["idle_rss"]["per_socket_kib"]), cell(a["connect_s"])]
            )

    lines = [
        f"## Fan-out benchmark, {results['started']}",
        "",
        f"`{results['command']}` on {results['machine']['cpus']} CPUs, commit {results['machine']['commit']}; "
        f"one uWSGI worker (gevent), embedded Redis shared with the Channels servers; "
        f"windows of {k['seconds']:g} s (saturation {k['sat_seconds']:g} s). Latency = arrival - publish time of "
        f"every delivery; deliveries/s counted by arrival inside the window; CPU from /proc over the window.",
        "",
        table(HEAD, rows),
        "",
        table(["idle sockets", "sockets", "RSS per socket (KiB)", "connect time (s)"], mem_rows),
        "",
    ]
    if cmp_:
        lines += [
            f"**Ratios** (ours / Channels' best of its setups, same run): deliveries/s at saturation "
            f"{cell(cmp_['deliveries_ratio'], suffix='x')} (Channels' best: {cmp_['channels_best_saturation']}, "
            f"{cell(cmp_['channels_best_deliveries_per_s'])}/s); server CPU per delivery "
            f"{cell(cmp_['cpu_ratio'], suffix='x')} less "
            f"(Channels' best {cell(cmp_['channels_best_us_per_delivery'])} µs); "
            f"fan-out p99 at {k['small']:,} x {k['rate']:g}/s {cell(cmp_['fanout_p99_ratio'], suffix='x')} lower "
            f"(Channels' best {cell(cmp_['channels_best_fanout_p99_ms'])} ms).",
            "",
        ]
    if "storm" in ours:
        lines += [
            f"Connect storm: server CPU {cell(ours['storm'].get('server_ms_per_connect'))} ms per connect "
            f"({_storm_cpu(ours['storm'])}); retries: {ours['storm']['retries'] or 'none'}; "
            f"uWSGI: {ours['storm']['counters']}; "
            f"kernel backlog limits (old, new): {ours.get('backlog_sysctls') or 'unchanged (not root)'}.",
            "",
        ]
    floors = cpu_floors(results)
    if floors:
        lines += [
            f"**CPU floors of this box** (server and clients share its {results['machine']['cpus']} CPUs; "
            f"`cpu_floors`): one broadcast to all {k['storm']:,} sockets needs "
            f"{cell(floors.get('broadcast_10k_ms'))} ms of the machine (server + client CPU per broadcast / CPUs; "
            f"measured p99 {cell(w.get('fanout_storm', {}).get('broadcast', {}).get('p99'))} ms); the connect "
            f"storm {cell(floors.get('storm_s'))} s (measured {cell(ours.get('storm', {}).get('connect_s'))} s).",
            "",
        ]
    lines += [verdict_table(results["verdict"], "target (one worker)")]
    lines += warning_lines(results.get("warnings"))
    return "\n".join(lines) + "\n"


def warnings(results: dict) -> list[str]:
    out = []
    every = [("ours " + n, w) for n, w in results["ours"]["windows"].items()]
    every += [(f"{c} {n}", w) for c, a in results["channels"].items() for n, w in a.get("windows", {}).items()]
    for where, w in every:
        cpu = w["cpu"]["groups"]
        if w["disconnects"]["count"]:
            out.append(f"{where}: {w['disconnects']['count']} websockets closed {w['disconnects']['codes']}")
        if cpu["clients"]["core_pct"] > 85:
            out.append(f"{where}: load client(s) at {cpu['clients']['core_pct']:.0f}% of a core: client-bound")
        if cpu["other"]["core_pct"] > 20:
            out.append(f"{where}: other processes used {cpu['other']['core_pct']:.0f}% of a core (noisy box)")
    return out
