"""The background load: slow downloads and long report tasks.

On ``start``: ``downloads`` clients GET a large protected file with the
session cookie and read it at ``rate_bps`` through a small receive buffer
(restarting if one ever finishes, so all stay in flight), and ``tasks``
concurrent ``POST /reports/`` start report tasks. With offloading the POST
answers 202 at once and a spooler runs the task; with offloading disabled the
view runs the task itself and answers only when it is done, so the POSTs are
fired and not awaited. A websocket on the user's channel records the tasks'
progress messages, which tells when tasks really ran.

``loaded`` is emitted once every download has its response headers and every
POST was sent; on ``stop`` everything is cancelled and a summary emitted.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.parse
from collections import Counter

from . import http
from .channel import Channel
from .ws import SubscriberPool

NETWORK_ERRORS = (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} load: {text}", file=sys.stderr, flush=True)


class SlowDownload:
    """One slow reader of ``path``, restarted whenever it completes or fails."""

    def __init__(self, cfg: dict, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.bytes = 0
        self.completed = 0
        self.in_flight = False
        self.headers_seen = asyncio.get_running_loop().create_future()
        self.statuses: Counter[str] = Counter()
        self.first_byte_ms: list[float] = []
        self.running = True

    async def run(self) -> None:
        cfg = self.cfg
        rate = cfg["rate_bps"]
        step = max(4096, rate // 20)  # ~20 reads per second
        headers = {"Cookie": cfg["cookie"]}
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
        while self.running:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(10):
                    reader, writer = await http.connect(cfg["host"], cfg["port"], cfg["rcvbuf"])
            except NETWORK_ERRORS as exc:
                self.statuses[type(exc).__name__] += 1
                await asyncio.sleep(1)
                continue
            try:
                writer.write(http.encode_request("GET", cfg["path"], f"{cfg['host']}:{cfg['port']}", headers))
                async with asyncio.timeout(30):
                    status, response_headers = await http.read_head(reader)
                self.statuses[str(status)] += 1
                self.first_byte_ms.append(round((time.perf_counter() - started) * 1000, 1))
                if not self.headers_seen.done():
                    self.headers_seen.set_result(status)
                if status != 200:
                    await asyncio.sleep(1)
                    continue
                length = int(response_headers.get("content-length", "0"))
                got, body_started = 0, time.monotonic()
                self.in_flight = True
                while got < length and self.running:
                    async with asyncio.timeout(60):
                        chunk = await reader.read(min(step, length - got))
                    if not chunk:
                        raise ConnectionError("EOF before the end of the body")
                    got += len(chunk)
                    self.bytes += len(chunk)
                    ahead = body_started + got / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                self.completed += got >= length
            except NETWORK_ERRORS as exc:
                self.statuses[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
            finally:
                self.in_flight = False
                writer.close()


async def post_report(cfg: dict, results: list) -> None:
    body = urllib.parse.urlencode({"seconds": cfg["task_seconds"], "rows": cfg["task_rows"]}).encode()
    headers = {
        "Cookie": cfg["cookie"],
        "X-CSRFToken": cfg["csrftoken"],
        "Content-Type": "application/x-www-form-urlencoded",
    }
    sent = time.time_ns()
    entry = {"sent_ns": sent, "status": "pending"}
    results.append(entry)
    try:
        resp = await http.request(
            cfg["host"], cfg["port"], "POST", "/reports/", headers=headers, body=body, timeout=cfg["task_seconds"] + 60
        )
        entry.update(status=resp.status, ms=round(resp.elapsed_ns / 1e6, 1), body=resp.body[:200].decode("latin-1"))
    except NETWORK_ERRORS as exc:
        entry.update(status=type(exc).__name__)
    except asyncio.CancelledError:
        entry.update(status="still running (cancelled)", ms=round((time.time_ns() - sent) / 1e6, 1))
        raise


async def run(cfg: dict, chan: Channel) -> None:
    while (cmd := await chan.next())["cmd"] not in ("start", "stop", "eof"):
        pass
    if cmd["cmd"] != "start":
        return

    task_events: list[list] = []  # [t_ns, task_id, state, progress]

    def on_task(_index: int, data, received_ns: int) -> None:
        if isinstance(data, dict) and data.get("kind") == "task":
            task_events.append([received_ns, data.get("task_id"), data.get("state"), data.get("progress")])

    monitor = SubscriberPool(
        f"ws://{cfg['host']}:{cfg['port']}/ws/?channel={cfg['user_channel']}", 1, on_task, {"Cookie": cfg["cookie"]}
    )
    await monitor.connect(1)

    downloads = [SlowDownload(cfg, i) for i in range(cfg["downloads"])]
    running = [asyncio.create_task(d.run()) for d in downloads]
    reports: list[dict] = []
    running += [asyncio.create_task(post_report(cfg, reports)) for _ in range(cfg["tasks"])]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(d.headers_seen for d in downloads))
    except TimeoutError:
        pass
    chan.emit(
        "loaded",
        downloads_with_headers=sum(1 for d in downloads if d.headers_seen.done()),
        download_statuses=dict(sum((d.statuses for d in downloads), Counter())),
    )

    samples: list[list] = []  # [t_ns, downloads in flight, bytes so far]

    async def sample() -> None:
        while True:
            samples.append([time.time_ns(), sum(d.in_flight for d in downloads), sum(d.bytes for d in downloads)])
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    while (await chan.next())["cmd"] not in ("stop", "eof"):
        pass
    log("stopping: cancelling downloads and report requests")
    sampler.cancel()
    for d in downloads:
        d.running = False
    for task in running:
        task.cancel()
    _, stuck = await asyncio.wait(running, timeout=10)
    if stuck:
        log(f"{len(stuck)} tasks ignored their cancellation")
    log("closing the task monitor")
    await monitor.close()
    log("sending the summary")
    first_bytes = sorted(ms for d in downloads for ms in d.first_byte_ms)
    chan.emit(
        "summary",
        samples=samples,
        task_events=task_events,
        reports=reports,
        downloads={
            "count": len(downloads),
            "bytes": sum(d.bytes for d in downloads),
            "completed": sum(d.completed for d in downloads),
            "statuses": dict(sum((d.statuses for d in downloads), Counter())),
            "first_byte_ms_max": first_bytes[-1] if first_bytes else None,
        },
    )
