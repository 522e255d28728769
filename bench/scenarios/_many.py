"""Shared by the ``manychannels`` and ``publish`` scenarios (not a scenario itself).

Both spread publishes over many channels (``bench/spread.py``): one
subscriber client (``bench.loadclient.manychannels``) measures what arrives,
and one publisher at a time runs in its own process, bracketed by a
measuring window:

* ``OneShot``: a publisher that prints ``{"event": "ready"}`` once set up,
  starts on a line on stdin, prints its result as one line and exits at EOF
  of stdin (so its CPU time can be read after the result)
  (``bench/redis_publisher.py``, ``bench/offload_publisher.py``,
  ``bench/channels_anchor/publisher.py``);
* an ``httppub`` client (``bench.loadclient.httppub``), driven by ``run``
  commands.

``measure`` opens the subscribers' window, snapshots CPU, starts the
publisher, waits for its result, snapshots CPU again and closes the window,
then tells the subscribers which publish numbers to expect. ``drain`` waits
until all of them arrived or nothing arrives any more (a backlog of the
server under test).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..channels_anchor.server import ChannelsServer
from ..clients import ClientProcess
from ..config import PROJECT_DIR, BenchConfig
from ..cpu import CpuMeter
from ..progress import Progress
from ..server import BenchServer
from ..spread import PREFIX
from .fanout import HISTORY, SERVER_ENV


class OneShot:
    """A publisher process: set up, ``ready``, wait for ``go`` on stdin, run, print its result."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"--- {' '.join(argv[:3])}\n".encode())
            f.flush()
            self.proc = subprocess.Popen(
                argv,
                cwd=PROJECT_DIR,
                env=dict(os.environ, PYTHONPATH=str(PROJECT_DIR), PYTHONUNBUFFERED="1", **(env or {})),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=f,
                start_new_session=True,
            )
        self.log = log
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="oneshot-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float, progress: Progress | None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.2)
                break
            except queue.Empty:
                if progress is not None:
                    progress.draw()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"publisher: no answer within {timeout:.0f} s; log {self.log}") from None
        if line is None:
            self.proc.wait(5)
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"publisher exited ({self.proc.returncode}); log {self.log}:\n{tail}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 60, progress: Progress | None = None) -> OneShot:
        event = self._line(timeout, progress)
        if event.get("event") != "ready":
            raise RuntimeError(f"publisher: expected ready, got {event}")
        return self

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 120, progress: Progress | None = None) -> dict:
        """The result line; the process stays alive (its CPU still readable) until :meth:`close`."""
        return self._line(timeout, progress)

    def close(self) -> None:
        """EOF on stdin (its way out after the result), then KILL if it lingers: only this pid."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def redis_publisher(redis_url: str, rate: float, seconds: float, first: int, channels: int, log: Path) -> OneShot:
    """``offload.publish()``'s Redis path (EVALSHA of publish.lua), ``rate``/s round robin over ``channels``."""
    config = {
        "redis_url": redis_url,
        "channels": channels,
        "channel_prefix": PREFIX,
        "rate": rate,
        "seconds": seconds,
        "first_seq": first,
        "wait_go": True,
        **HISTORY,
    }
    return OneShot([sys.executable, "-m", "bench.redis_publisher", json.dumps(config)], log)


def offload_publisher(
    redis_url: str, var_dir: Path, mode: str, concurrency: int, seconds: float, first: int, channels: int, log: Path
) -> OneShot:
    """``offload.publish()`` from a Django process, closed loop (``bench/offload_publisher.py``)."""
    var_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "redis_url": redis_url,
        "var_dir": str(var_dir),
        "mode": mode,
        "concurrency": concurrency,
        "seconds": seconds,
        "first_seq": first,
        "channels": channels,
        "channel_prefix": PREFIX,
    }
    return OneShot([sys.executable, "-m", "bench.offload_publisher", json.dumps(config)], log)


def channels_publisher(anchor: ChannelsServer, seconds: float, first: int, channels: int, log: Path, **how) -> OneShot:
    """``group_send`` from a process of the channels venv: ``concurrency=N`` (closed loop) or ``rate=R``."""
    config = {
        "redis_url": anchor.redis_url,
        "layer": anchor.layer,
        "prefix": anchor.prefix,
        "seconds": seconds,
        "first_seq": first,
        "channels": channels,
        "channel_prefix": PREFIX,
        **how,
    }
    return OneShot([str(anchor.python), "-m", "bench.channels_anchor.publisher", json.dumps(config)], log)


def subscribers(
    cfg: BenchConfig, name: str, host: str, port: int, n: int, channels: int, logs: Path, **extra
) -> ClientProcess:
    config = {
        "host": host,
        "port": port,
        "subscribers": n,
        "channels": channels,
        "channel_prefix": PREFIX,
        "connect_concurrency": 200,
        "connect_timeout": 10.0,
        "deadline_s": 900,
        **extra,
    }
    return ClientProcess(cfg.client_python, "manychannels", config, logs / f"{name}-subscribers.log")


def http_publisher(
    cfg: BenchConfig, name: str, host: str, port: int, api_key: str, channels: int, logs: Path
) -> ClientProcess:
    config = {
        "host": host,
        "port": port,
        "api_key": api_key,
        "channels": channels,
        "channel_prefix": PREFIX,
        "deadline_s": 900,
    }
    return ClientProcess(cfg.client_python, "httppub", config, logs / f"{name}-httppub.log")


def start_ours(work: Path, progress: Progress) -> tuple[BenchServer, int, dict, CpuMeter]:
    """Our server (one worker) with its CPU meter: (server, worker pid, the
    load processes by role, which the meter follows, meter)."""
    progress.step("[ours] starting uWSGI (1 worker)")
    server = start_server(work, "ours")
    worker = server.pids("worker")[0]
    procs: dict[str, object] = {}
    return server, worker, procs, meter(lambda: [worker], lambda: server.pids("redis"), procs)


@contextmanager
def ours_running(server: BenchServer, procs: dict, logs: Path) -> Iterator[None]:
    """Close the load processes when the block ends; if it failed, stop our
    server too (otherwise the Channels setups still need its Redis)."""
    try:
        yield
    except BaseException:
        for p in procs.values():
            p.close()
        server.stop(log_copy=logs / "ours-uwsgi.log")
        raise
    for p in procs.values():
        p.close()


def run_anchors(
    server: BenchServer, combos: list[str], run_one: Callable[[str], dict], progress: Progress, logs: Path
) -> dict[str, dict]:
    """Each Channels setup in turn, then stop our server (whose Redis they
    share). One broken setup is recorded as an error and loses nothing else."""
    anchors: dict[str, dict] = {}
    try:
        for combo in combos:
            try:
                anchors[combo] = run_one(combo)
            except Exception as exc:
                anchors[combo] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        progress.step("stopping uWSGI")
        server.stop(log_copy=logs / "ours-uwsgi.log")
    return anchors


def oneshot_window(
    pub: OneShot,
    subs: ClientProcess,
    meter: CpuMeter,
    procs: dict,
    progress: Progress,
    k: dict,
    name: str,
    seconds: float,
) -> dict:
    """A window of publishes from a one-shot publisher process (Redis,
    ``offload.publish()``, ``group_send``), drained afterwards (``k["drain"]``).
    The process is closed before the drain."""
    procs["pub"] = pub
    pub.wait_ready(60, progress)
    window = measure(subs, meter, name, pub.go, lambda: pub.result(seconds + 60, progress), progress)
    pub.close()
    del procs["pub"]
    window["drain_s"] = drain(subs, progress, k["drain"])
    return window


def collect(subs: ClientProcess, windows: dict[str, dict], out: dict, progress: Progress, label: str) -> None:
    """Fill ``out`` with every window's figures, gathered by the subscribers' process."""
    progress.step(f"{label} collecting")
    out["misrouted"] = finish(subs, windows)["misrouted"]
    out["windows"] = windows


def http_window(
    cfg: BenchConfig,
    target: tuple[str, str, int, str],
    subs: ClientProcess,
    meter: CpuMeter,
    procs: dict,
    progress: Progress,
    logs: Path,
    k: dict,
    name: str,
    seconds: float,
    **cmd,
) -> dict:
    """A window of publishes through an HTTP API from an ``httppub`` process
    (``cmd``: ``first`` and ``rate`` or ``streams``), drained afterwards.

    ``target`` is (label, host, port, api_key); ``k`` gives ``channels`` and
    ``drain``. The publisher process is stopped and closed before the drain.
    """
    label, host, port, api_key = target
    http = procs["pub"] = http_publisher(cfg, label, host, port, api_key, k["channels"], logs)
    http.wait("ready", 30)
    start, result = run_http(http, progress, seconds + 60, name=name, seconds=seconds, **cmd)
    window = measure(subs, meter, name, start, result, progress)
    http.send("stop")
    http.close()
    del procs["pub"]
    window["drain_s"] = drain(subs, progress, k["drain"])
    return window


def measure(
    subs: ClientProcess,
    meter: CpuMeter,
    name: str,
    start: Callable[[], None],
    result: Callable[[], dict],
    progress: Progress,
) -> dict:
    """One publisher run inside a subscribers' window; the window's figures are filled in by ``finish``."""
    subs.send("open", name=name)
    subs.wait("window_open", 30, lambda _: progress.draw())
    before = meter.snapshot()
    start()
    res = result()
    after = meter.snapshot()
    subs.send("close", name=name)
    closed = subs.wait("window_closed", 120, lambda _: progress.draw())
    subs.send("expect", name=name, first=res["first"], count=res["count"], failed=res.get("failed") or [])
    return {"cpu": CpuMeter.delta(before, after), "publisher": res, "open_sockets": closed["open_sockets"]}


def run_http(client: ClientProcess, progress: Progress, timeout: float, **cmd) -> tuple[Callable, Callable]:
    """``start``/``result`` for :func:`measure` of an ``httppub`` run (``name``, ``seconds``, ``first``, ...)."""

    def start() -> None:
        client.send("run", **cmd)
        client.wait("started", 30, lambda _: progress.draw())

    def result() -> dict:
        return client.wait("result", timeout, lambda _: progress.draw())

    return start, result


def drain(subs: ClientProcess, progress: Progress, limit: float, quiet: float = 2.0) -> float:
    """Wait until every expected delivery arrived, or nothing arrived for ``quiet`` s, or ``limit`` s passed.

    Returns the seconds taken. A server working off a backlog may pause for
    a moment between deliveries: ``quiet`` must outlast such pauses.
    """
    started = time.monotonic()
    last, last_change = -1, started
    while (now := time.monotonic()) - started < limit:
        subs.send("ping")
        pong = subs.wait("pong", max(30.0, limit), lambda _: progress.draw())
        if pong["arrivals"] >= pong["expected"]:
            break
        if pong["arrivals"] != last:
            last, last_change = pong["arrivals"], now
        elif now - last_change >= quiet:
            break
        time.sleep(0.25)
    return round(time.monotonic() - started, 2)


def finish(subs: ClientProcess, windows: dict[str, dict], timeout: float = 180) -> dict:
    """Stop the subscribers and merge their per-window figures into ``windows``; the summary."""
    subs.send("stop")
    summary = subs.wait("summary", timeout)
    for name, w in windows.items():
        w.update(summary["windows"].get(name, {}))
        arrived = w.get("broadcast", {}).get("arrived_in_window")
        used = w["cpu"]["groups"]["server"]["cpu_s"]
        w["server_us_per_delivery"] = round(used / arrived * 1e6, 3) if arrived else None
    return summary


def meter(server: Callable[[], list[int]], redis: Callable[[], list[int]], procs: dict) -> CpuMeter:
    """CPU groups of a many-socket run; ``procs`` holds the current ``subs``/``pub`` client processes."""
    return CpuMeter(
        {
            "server": server,
            "Redis": redis,
            "clients": lambda: [procs["subs"].pid] if "subs" in procs else [],
            "publisher": lambda: [procs["pub"].pid] if "pub" in procs else [],
            "orchestrator": lambda: [os.getpid()],
        }
    )


def redis_url_of(server: BenchServer) -> str:
    return f"unix://{server.var_dir / 'redis.sock'}"


def raise_nofile() -> list[int]:
    """Soft RLIMIT_NOFILE to the hard limit (servers and clients inherit it); the old pair."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return [soft, hard]


def start_server(work: Path, name: str) -> BenchServer:
    return BenchServer(work / f"var-{name}", dict(SERVER_ENV)).start()
