"""The offloading scenario's load: slow downloads and report tasks, fired and not awaited (inline, the view answers
only when the task is done); their progress messages on the user's channel tell when the tasks really ran."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections import Counter

from . import http
from .ws import SubscriberPool

NETWORK_ERRORS = (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class SlowDownload:
    """One slow reader of ``path``, restarted whenever it completes or fails."""

    def __init__(self, cfg: dict) -> None:
        self.cfg, self.bytes, self.completed, self.in_flight = cfg, 0, 0, False
        self.headers_seen = asyncio.get_running_loop().create_future()
        self.statuses: Counter[str] = Counter()

    async def run(self) -> None:
        while True:
            try:
                await self.read_once()
            except NETWORK_ERRORS as exc:
                self.statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
            finally:
                self.in_flight = False

    async def read_once(self) -> None:
        cfg, rate = self.cfg, self.cfg["rate_bps"]
        async with asyncio.timeout(10):
            reader, writer = await http.connect(cfg["host"], cfg["port"], cfg["rcvbuf"])
        try:
            writer.write(http.encode_request("GET", cfg["path"], cfg["host"], {"Cookie": cfg["cookie"]}))
            async with asyncio.timeout(30):
                status, headers = await http.read_head(reader)
            self.statuses[str(status)] += 1
            if not self.headers_seen.done():
                self.headers_seen.set_result(status)
            if status != 200:
                await asyncio.sleep(1)
                return
            length, got, started = int(headers.get("content-length", "0")), 0, time.monotonic()
            self.in_flight = True
            while got < length:
                async with asyncio.timeout(60):
                    chunk = await reader.read(min(max(4096, rate // 20), length - got))  # ~20 reads a second
                if not chunk:
                    raise ConnectionError("EOF before the end of the body")
                got, self.bytes = got + len(chunk), self.bytes + len(chunk)
                await asyncio.sleep(max(0.0, started + got / rate - time.monotonic()))
            self.completed += 1
        finally:
            writer.close()


async def post_report(cfg: dict, entry: dict) -> None:
    """One ``POST /reports/``; ``entry`` says how it ended (or that it was still running)."""
    body = urllib.parse.urlencode({"seconds": cfg["task_seconds"], "rows": cfg["task_rows"]}).encode()
    headers = {"Cookie": cfg["cookie"], "X-CSRFToken": cfg["csrftoken"]}
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        how = {"headers": headers, "body": body, "timeout": cfg["task_seconds"] + 60}
        status, data, elapsed = await http.request(cfg["host"], cfg["port"], "POST", "/reports/", **how)
        entry.update(status=status, ms=round(elapsed / 1e6, 1), body=data[:200].decode("latin-1"))
    except NETWORK_ERRORS as exc:
        entry.update(status=type(exc).__name__)
    except asyncio.CancelledError:
        entry.update(status="still running (cancelled)", ms=round((time.time_ns() - entry["sent_ns"]) / 1e6, 1))
        raise


async def watch_tasks(cfg: dict) -> tuple[SubscriberPool, list[list]]:
    """A websocket on the user's channel and the progress messages of its tasks: ``[t_ns, id, state, progress]``."""
    events: list[list] = []

    def on_task(_index: int, raw: bytes, received_ns: int) -> None:
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("kind") == "task":
            events.append([received_ns, data.get("task_id"), data.get("state"), data.get("progress")])

    url = f"ws://{cfg['host']}:{cfg['port']}/ws/?channel={cfg['user_channel']}"
    monitor = SubscriberPool(lambda _: url, 1, on_task, {"Cookie": cfg["cookie"]})
    await monitor.connect(1)
    return monitor, events


async def sample_until_stop(chan, downloads: list[SlowDownload]) -> list[list]:
    """``[t_ns, downloads in flight, bytes so far]`` every second, until ``stop``."""
    samples: list[list] = []
    while True:
        samples.append([time.time_ns(), sum(d.in_flight for d in downloads), sum(d.bytes for d in downloads)])
        try:
            async with asyncio.timeout(1):
                if (await chan.next())["cmd"] in ("stop", "eof"):
                    return samples
        except TimeoutError:
            continue


async def run(cfg: dict, chan) -> None:
    while (cmd := await chan.next())["cmd"] not in ("start", "stop", "eof"):
        pass
    if cmd["cmd"] != "start":
        return
    monitor, task_events = await watch_tasks(cfg)
    downloads = [SlowDownload(cfg) for _ in range(cfg["downloads"])]
    reports = [{"sent_ns": time.time_ns(), "status": "pending"} for _ in range(cfg["tasks"])]
    running = [asyncio.create_task(d.run()) for d in downloads]
    running += [asyncio.create_task(post_report(cfg, entry)) for entry in reports]
    if downloads:
        await asyncio.wait([d.headers_seen for d in downloads], timeout=30)
    statuses = lambda: dict(sum((d.statuses for d in downloads), Counter()))  # noqa: E731
    chan.emit("loaded", downloads_with_headers=sum(d.headers_seen.done() for d in downloads), statuses=statuses())
    samples = await sample_until_stop(chan, downloads)
    for task in running:
        task.cancel()
    await asyncio.wait(running, timeout=10)
    await monitor.close()
    summary = {"count": len(downloads), "bytes": sum(d.bytes for d in downloads), "statuses": statuses()}
    summary["completed"] = sum(d.completed for d in downloads)
    chan.emit("summary", samples=samples, task_events=task_events, reports=reports, downloads=summary)
