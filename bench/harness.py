"""The skeleton every scenario runs on: servers, processes, windows, collection. ``Bench`` stops (by pid) all it
started on every way out; each anchor runs in a :meth:`Bench.scope` of its own, so a broken setup loses nothing else.

Helper processes (load clients, publishers) take commands ``{"cmd": ...}`` on stdin and give events ``{"event": ...}``
on stdout, stderr to a log; EOF on stdin (the orchestrator died) makes one exit, so no run leaves one behind."""

from __future__ import annotations

import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .anchor import NODE_ANCHORS, AnchorServer, ChannelsServer, NodeServer
from .config import PROJECT_DIR, Config
from .server import BenchServer, CpuMeter, end, rss_kib, tree_kib
from .stats import summarize_us

#: the server environment of the websocket scenarios: one worker, 2,000 cores, no per-IP cap
SERVER_ENV = {"WORKERS": "1", "CORES": "2000", "OFFLOAD_MAX_CONNECTIONS_PER_IP": "1000000"}
SERVER_ENV["OFFLOAD_STATS_INTERVAL"] = "0"
COUNTS = ("expected", "lost", "dup", "arrived_in_window", "deliveries_per_s", "expected_per_s", "n")


class ClientError(RuntimeError):
    pass


class Process:
    """``argv`` run from the project directory; ``label`` names its CPU group in the reports."""

    def __init__(self, argv: list[str], label: str, log_path: Path) -> None:
        self.label, self.log_path = label, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(PROJECT_DIR), PYTHONUNBUFFERED="1")
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        with open(log_path, "ab") as log:  # a new session: Ctrl-C reaches the orchestrator, which stops us in order
            self.proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env=env, stderr=log, start_new_session=True, **pipes)
        self.pid, self.events = self.proc.pid, queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{label}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "garbage", "line": line.decode(errors="replace")[:500]})
        self.events.put({"event": "exit"})

    def send(self, cmd: str, **fields) -> None:
        try:
            self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise ClientError(f"{self.label} is gone ({exc}); log {self.log_path}:\n{self.log_tail()}") from exc

    def wait(self, event: str, timeout: float) -> dict:
        """The next ``event`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if item.get("event") == event:
                return item
            if item.get("event") in ("exit", "error", "garbage"):
                raise ClientError(f"{self.label} failed: {item}; log {self.log_path}:\n{self.log_tail()}")
        raise ClientError(f"{self.label}: no {event!r} within {timeout:.0f} s; log {self.log_path}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]  # created before the process started

    def close(self) -> None:
        """EOF on stdin (its own way out), then TERM, then KILL: only this pid."""
        if self.proc.poll() is None:
            with suppress(OSError):
                self.proc.stdin.close()
            end(self.proc)
        self._reader.join(2)


class Bench:
    """One scenario run: its work and log directories, and every server and process it started."""

    def __init__(self, cfg: Config, work: Path, logs: Path) -> None:
        self.cfg, self.work, self.logs, self.started = cfg, work, logs, time.monotonic()
        self.live: list = []  # servers and processes, in start order

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_after(0)

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Whatever starts inside the block is stopped when it ends."""
        mark = len(self.live)
        try:
            yield
        finally:
            self.stop_after(mark)

    def stop_after(self, mark: int) -> None:
        while len(self.live) > mark:
            self.stop(self.live[-1])

    def stop(self, thing) -> None:
        """Stop a server or process (by pid), whatever else stays."""
        self.live.remove(thing)
        thing.close()

    def ask(self, clients: list[Process], cmd: str, event: str, timeout: float = 120, **fields) -> list[dict]:
        """``cmd`` to every client, then each one's answer (they work meanwhile in parallel)."""
        for c in clients:
            c.send(cmd, **fields)
        return [c.wait(event, timeout) for c in clients]

    def step(self, label: str) -> None:
        """What the run does now, on stderr: a stuck step is visible in the log too."""
        print(f"[{time.monotonic() - self.started:5.0f}s] {label}", file=sys.stderr, flush=True)

    # -- what runs ---------------------------------------------------------------

    def start(self, thing):
        """``thing`` (a server or a process), started and owned: stopped on the way out."""
        self.live.append(thing)
        return thing.start() if hasattr(thing, "start") else thing

    def server(self, name: str, env: dict, downloads: list[Path] = ()) -> BenchServer:
        self.step(f"[{name}] starting uWSGI: {' '.join(f'{k}={v}' for k, v in env.items())}")
        return self.start(BenchServer(self.work / f"var-{name}", env, downloads, self.logs / f"{name}-uwsgi.log"))

    def client(self, role: str, label: str, name: str, **config) -> Process:
        """A load client in the bench venv (``bench.loadclient``); ``label`` is its CPU group."""
        argv = [self.cfg.client_python, "-m", "bench.loadclient", role, json.dumps({"deadline_s": 1800, **config})]
        return self.start(Process(argv, label, self.logs / f"{name}.log"))

    def subscribers(self, target, name: str, n: int, label: str = "clients", **config) -> Process:
        """Subscriber client of ``target`` (ours or a Channels setup); ``n`` 0: a publisher or probe only."""
        config.update(host=target.host, port=target.port, api_key=target.api_key, subscribers=n)
        config.setdefault("ws_path", getattr(target, "ws_path", "/ws/?"))
        return self.client("subscribers", label, name, **config)

    def publisher(self, target, name: str, **config) -> Process:
        """Ours (``offload.publish()``, ``bench/publisher.py``), a Channels setup's ``group_send`` or, for a Node.js
        anchor, Redis PUBLISH of the envelope (``bench/publisher.py`` too), ready."""
        if isinstance(target, ChannelsServer):
            config.update(layer=target.layer, prefix=target.prefix, redis_url=target.redis_url)
            argv = [str(target.python), "-m", "bench.channels_anchor.publisher"]
        else:
            config = {"mode": "gevent", "concurrency": 16, **config, "redis_url": target.redis_url}
            argv, config["var_dir"] = [sys.executable, "-m", "bench.publisher"], str(self.work / "publisher-var")
            if isinstance(target, NodeServer):
                config["prefix"] = target.prefix
        pub = self.start(Process([*argv, json.dumps(config)], "publisher", self.logs / f"{name}-publisher.log"))
        pub.wait("ready", 60)
        return pub

    def meter(self, server, redis: list[int] | None = None, labels: tuple = ("clients", "publisher"), groups=None):
        """CPU groups: ``server`` (its pid, or ``groups``), ``Redis`` (``redis``, else the server's own), one per
        label of helper processes (those alive), the orchestrator."""
        groups = dict(groups or {"server": lambda: [server.pid]})
        groups["Redis"] = lambda: server.pids("redis") if redis is None else redis
        for label in labels:
            groups[label] = lambda label=label: [p.pid for p in self.live if getattr(p, "label", None) == label]
        return CpuMeter({**groups, "orchestrator": lambda: [os.getpid()]})

    # -- measuring ---------------------------------------------------------------

    def connect(self, target, name: str, n: int, processes: int = 1, meter=None, settled=lambda: None, **config):
        """``n`` subscribers over ``processes`` clients, connected: (clients, connect time (all; each socket's in
        ``connect_ms``), retries, the server's RSS per socket (its worker, and its whole tree) and, with ``meter``,
        CPU from the start to the last ``ready``, or to ``settled()`` after it)."""
        rss0, tree0, before = rss_kib(target.pid), tree_kib(target.tree()), meter.snapshot() if meter else None
        share = [n // processes + (i < n % processes) for i in range(processes)]  # n over the processes
        clients = [self.subscribers(target, f"{name}{i or ''}", m, **config) for i, m in enumerate(share)]
        readies = [c.wait("ready", 120 + n / 20) for c in clients]
        info = {"sockets": n, "connect_s": max(r["connect_s"] for r in readies)}
        info["connect_ms"] = summarize_us([us for r in readies for us in r["connect_us"]], 100)
        info["connect_errors"] = dict(sum((Counter(r["connect_errors"]) for r in readies), Counter()))
        if meter:
            settled()
            info["cpu"] = CpuMeter.delta(before, meter.snapshot())
        time.sleep(2)  # the server settles before its memory is read
        rss1, tree1 = rss_kib(target.pid), tree_kib(target.tree())
        rss = {"before_kib": rss0, "after_kib": rss1, "tree_before_kib": tree0, "tree_after_kib": tree1}
        rss["per_socket_kib"] = round((rss1 - rss0) / n, 2) if rss0 and rss1 and n else None
        rss["tree_per_socket_kib"] = round((tree1 - tree0) / n, 2) if tree0 and tree1 and n else None
        return clients, {**info, "idle_rss": rss}

    def storm(self, target, name: str, n: int, meter: CpuMeter, settled: Callable[[], object] = lambda: None, **config):
        """``n`` sockets at once from two processes (:meth:`connect`); CPU from the start until ``settled()``
        returned after the last ``ready``, and per connect (ms) by group in ``ms_per_connect``."""
        config.update(connect_concurrency=n, connect_timeout=10.0, start_at_ns=time.time_ns() + 2_000_000_000)
        clients, info = self.connect(target, name, n, 2, meter, settled, **config)  # both start at start_at_ns
        info["ms_per_connect"] = {g: round(c["cpu_s"] / n * 1000, 3) for g, c in info["cpu"]["groups"].items()}
        return clients, info

    def window(self, meter: CpuMeter, name: str, clients: list[Process], seconds: float, **publishers) -> dict:
        """One window of ``seconds`` on every client, in which ``publishers`` publish (:meth:`_publish`); CPU
        is read at its edges. Every publish in it is then made known to every client: the clients' own (the
        ``own`` of ``closed``) and the publisher's result, unless the same publishes (the same first number)."""
        self.ask(clients, "open", "opened", name=name)
        before = meter.snapshot()
        result = self._publish(seconds, **publishers)
        after = meter.snapshot()
        if publishers.get("pub"):
            self.stop(publishers["pub"])  # after its CPU was read
        closed = self.ask(clients, "close", "closed", name=name)
        ranges = {r["first"]: r for r in [e["own"] for e in closed if e["own"]] + ([result] if result else [])}
        for c in clients:
            for r in ranges.values():
                c.send("expect", name=name, first=r["first"], count=r["count"], failed=r["failed"])
        out = {"cpu": CpuMeter.delta(before, after), "open_sockets": sum(e["open_sockets"] for e in closed)}
        out["next"] = max((r["first"] + r["count"] for r in ranges.values()), default=0)
        return {**out, "publisher": result} if result else out

    def _publish(self, seconds: float, pub: Process | None = None, http: Process | None = None, **how) -> dict | None:
        """``pub`` (a publisher process, set up with its numbers) runs, and/or ``http`` (a client) publishes
        over HTTP for ``seconds`` (``how``: ``first`` and ``rate`` or ``streams``); without either, a pause.
        Returns the publisher's result (``pub``'s if both)."""
        if pub is None and http is None:
            return time.sleep(seconds)
        if http is not None:
            http.send("publish", seconds=seconds, **how)
        result = None
        if pub is not None:
            pub.send("go")
            result = pub.wait("result", seconds + 60)
        published = http.wait("published", seconds + 60) if http is not None else None
        return result or published

    def drain(self, clients: list[Process], limit: float, quiet: float = 2.0) -> float:
        """Wait until every expected delivery arrived, or nothing arrived for ``quiet`` s, or ``limit`` s passed
        (a server working off a backlog); returns the seconds taken."""
        started = last_change = time.monotonic()
        last = -1
        while (now := time.monotonic()) - started < limit:
            pongs = self.ask(clients, "ping", "pong", max(30.0, limit))
            arrived = sum(p["arrivals"] for p in pongs)
            if arrived != last:
                last, last_change = arrived, now
            if arrived >= sum(p["expected"] for p in pongs) or now - last_change >= quiet:
                break
            time.sleep(0.25)
        return round(time.monotonic() - started, 2)

    def collect(self, clients: list[Process], windows: dict[str, dict]) -> dict:
        """Stop the clients and merge their figures into ``windows``: counts added, the worst percentile of
        the processes; server CPU per delivery. Returns what the clients saw outside windows."""
        summaries = self.ask(clients, "stop", "summary", 180)
        for c in clients:
            self.stop(c)
        for name, w in windows.items():
            w.update(merge([s["windows"][name] for s in summaries if name in s["windows"]]))
            used, arrived = w["cpu"]["groups"].get("server", {}).get("cpu_s"), w["broadcast"]["arrived_in_window"]
            w["server_us_per_delivery"] = round(used / arrived * 1e6, 3) if used is not None and arrived else None
        return {key: sum(s[key] for s in summaries) for key in ("misrouted", "disconnects")}

    def anchors(self, combos: list[str], redis_url: str, run_one: Callable[[AnchorServer], dict]) -> dict:
        """Each anchor (a Channels setup or, ``node-*``, a Node.js server) in turn against ``redis_url``, started and
        owned; a broken one is recorded as an error."""
        out = {}
        for combo in combos:
            try:
                with self.scope():
                    self.step(f"[{combo}] starting")
                    kind = NodeServer if combo in NODE_ANCHORS else ChannelsServer
                    anchor = self.start(kind(combo, redis_url, self.logs / f"anchor-{combo}.log"))
                    out[combo] = {"label": anchor.label, **run_one(anchor)}
            except Exception as exc:
                out[combo] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        return out


def merge(parts: list[dict]) -> dict:
    """One window seen by several client processes: the figures of the one with the most deliveries,
    counts added and the worst percentiles (a publish probe's ``publish`` figures come from that probe)."""
    if len(parts) == 1:
        return parts[0]
    out = dict(max(parts, key=lambda p: p["broadcast"]["n"]))
    b = out["broadcast"] = dict(out["broadcast"])
    for key in COUNTS:
        b[key] = round(sum(p["broadcast"].get(key) or 0 for p in parts), 1)
    for key in ("p50", "p90", "p99", "p999", "max"):
        b[key] = max((p["broadcast"][key] for p in parts if p["broadcast"][key] is not None), default=None)
    out["publish"] = max((p["publish"] for p in parts), key=lambda x: x["n"])
    codes = sum((Counter(p["disconnects"]["codes"]) for p in parts), Counter())
    out["disconnects"] = {"count": sum(p["disconnects"]["count"] for p in parts), "codes": dict(codes)}
    return out


@contextmanager
def backlog(wanted: int) -> Iterator[tuple[dict[str, tuple[int, int]], int]]:
    """The kernel's listen backlog limits raised to ``wanted`` (root only) for the block, as a deployment expecting
    connect storms would: with the default somaxconn (4,096 here) 10,000 simultaneous SYNs overflow the accept
    queue whatever the server does. Yields ({sysctl: (old, new)}, uWSGI's listen: the new limit); the old values
    come back after."""
    changed: dict[Path, tuple[int, int]] = {}
    try:
        for path in map(Path, ("/proc/sys/net/core/somaxconn", "/proc/sys/net/ipv4/tcp_max_syn_backlog")):
            with suppress(OSError, ValueError):
                old = int(path.read_text())
                path.write_text(str(max(old, wanted)))
                changed[path] = (old, int(path.read_text()))
        listen = max([new for _, new in changed.values()], default=1024)
        yield {path.name: values for path, values in changed.items()}, listen
    finally:
        for path, (old, _) in changed.items():
            with suppress(OSError):
                path.write_text(str(old))


def raise_nofile() -> list[int]:
    """Soft RLIMIT_NOFILE to the hard limit (servers and clients inherit it: 10,000 sockets); the old pair."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return [soft, hard]
