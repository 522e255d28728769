"""Hand check of the anchor: every combination, N websockets, M publishes.

Not a benchmark (the client here is plain ``websockets``, one process): it
checks that each combination delivers every message exactly once and gives
rough figures. Run with the channels venv::

    bench/.venv-channels/bin/python bench/channels_anchor/smoke.py            # own redis-server
    bench/.venv-channels/bin/python bench/channels_anchor/smoke.py --redis-url unix:///tmp/x/redis.sock

Per combination (daphne/uvicorn x core/pubsub):

* paced: ``--messages`` publishes, each after the previous one reached every
  subscriber (or ``--wait`` s passed): lost/duplicate deliveries, median and
  max time from publish to the *last* of the N deliveries (one broadcast),
  and the per-delivery median;
* burst: ``--burst`` publishes back to back (``--burst-concurrency``
  requests in flight, default 1: the next as soon as the API answered):
  lost/duplicate, deliveries/s from the first publish to the last delivery.

Everything is on loopback and bounded in count and time; only processes
started here are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import websockets
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import COMBINATIONS, ChannelsServer

CHANNEL = "public:bench"


async def post(host: str, port: int, path: str, key: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        data = await reader.read()
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


class Subscribers:
    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.got: list[dict[int, list[int]]] = [{} for _ in range(n)]  # per socket: seq -> [recv_ns...]
        self.sockets = []
        self.tasks = []
        self.closed_early = 0
        self.close_codes: list = []
        self.bad_first = 0

    async def _one(self, i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            ws = await connect(
                self.url,
                origin="http://" + self.url.split("/")[2],
                compression=None,  # the load client (picows) offers no permessage-deflate either
                max_queue=None,
                open_timeout=10,
            )
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if first != {"type": "subscribed", "channel": CHANNEL, "last_id": None, "recovered": True}:
                self.bad_first += 1
            self.sockets.append(ws)
            self.tasks.append(asyncio.create_task(self._read(i, ws)))

    async def _read(self, i: int, ws) -> None:
        got = self.got[i]
        try:
            async for text in ws:
                now = time.time_ns()
                msg = json.loads(text)
                if msg.get("type") == "message":
                    got.setdefault(msg["data"]["seq"], []).append(now)
        except websockets.ConnectionClosed:
            pass
        self.closed_early += 1
        self.close_codes.append((ws.close_code, ws.close_reason, time.time_ns()))

    async def connect(self, concurrency: int = 50) -> float:
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(self._one(i, gate) for i in range(self.n)))
        return time.monotonic() - started

    def delivered(self, seq: int) -> int:
        return sum(1 for g in self.got if seq in g)

    def tally(self, seqs) -> dict:
        lost = dup = 0
        for g in self.got:
            for s in seqs:
                c = len(g.get(s, ()))
                lost += c == 0
                dup += max(0, c - 1)
        return {"expected": len(seqs) * self.n, "lost": lost, "dup": dup}

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)


def cpu_of(pids) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


async def check(anchor, n: int, messages: int, burst: int, wait: float, concurrency: int) -> dict:
    """``anchor``: anything with ``host``, ``port``, ``api_key`` and ``pids`` (server processes)."""
    subs = Subscribers(f"ws://{anchor.host}:{anchor.port}/ws/?channel={CHANNEL}", n)
    connect_s = await subs.connect()
    path = f"/api/publish/{CHANNEL}"
    seq = 0
    sent: dict[int, int] = {}
    ids: list[str] = []
    statuses: list[int] = []

    async def publish() -> int:
        nonlocal seq
        s, seq = seq, seq + 1
        t = time.time_ns()
        status, body = await post(
            anchor.host, anchor.port, path, anchor.api_key, json.dumps({"t": t, "seq": s}).encode()
        )
        sent[s] = t
        statuses.append(status)
        if status == 200:
            ids.append(json.loads(body)["id"])
        return s

    # paced: one broadcast at a time
    cpu0, client0 = cpu_of(anchor.pids), time.process_time()
    paced = []
    for _ in range(messages):
        s = await publish()
        deadline = time.monotonic() + wait
        while subs.delivered(s) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)
        paced.append(s)
    paced_cpu, paced_client = cpu_of(anchor.pids) - cpu0, time.process_time() - client0
    await asyncio.sleep(0.3)
    full, per_delivery = [], []
    for s in paced:
        times = [g[s][0] for g in subs.got if s in g]
        per_delivery += [(t - sent[s]) / 1e6 for t in times]
        if len(times) == n:
            full.append((max(times) - sent[s]) / 1e6)
    paced_tally = subs.tally(paced)

    # burst: back to back
    first = seq
    cpu0, client0 = cpu_of(anchor.pids), time.process_time()
    t0 = time.time_ns()
    gate = asyncio.Semaphore(concurrency)

    async def gated() -> None:
        async with gate:
            await publish()

    await asyncio.gather(*(gated() for _ in range(burst)))
    publish_s = (time.time_ns() - t0) / 1e9
    burst_seqs = list(range(first, seq))
    deadline = time.monotonic() + max(wait, 10)
    expected = n * burst
    while sum(subs.delivered(s) for s in burst_seqs[-5:]) < 5 * n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    burst_cpu, burst_client = cpu_of(anchor.pids) - cpu0, time.process_time() - client0
    await asyncio.sleep(1.0)  # stragglers (and duplicates, if any)
    last = max((t for g in subs.got for s in burst_seqs for t in g.get(s, ())), default=t0)
    burst_tally = subs.tally(burst_seqs)
    delivered = expected - burst_tally["lost"]
    early = subs.closed_early
    await subs.close()

    def id_key(i: str) -> tuple[int, int]:
        ms, _, n_ = i.partition("-")
        return int(ms), int(n_)

    return {
        "connect_s": round(connect_s, 2),
        "bad_first": subs.bad_first,
        "closed_early": early,
        "close_codes": sorted({f"{c} {r}".strip() for c, r, _ in subs.close_codes}),
        "http_non_200": sum(1 for x in statuses if x != 200),
        "ids_unique": len(set(ids)) == len(ids),
        "paced_ids_increase": all(id_key(a) < id_key(b) for a, b in itertools.pairwise(ids[:messages])),
        "paced": {
            **paced_tally,
            "broadcast_ms_median": round(statistics.median(full), 1) if full else None,
            "broadcast_ms_max": round(max(full), 1) if full else None,
            "complete_broadcasts": len(full),
            "delivery_ms_median": round(statistics.median(per_delivery), 1) if per_delivery else None,
            "server_cpu_ms_per_broadcast": round(paced_cpu * 1000 / messages, 1),
            "client_cpu_ms_per_broadcast": round(paced_client * 1000 / messages, 1),
        },
        "burst": {
            **burst_tally,
            "publish_s": round(publish_s, 2),
            "publishes_per_s": round(burst / publish_s),
            "deliveries_per_s": round(delivered / ((last - t0) / 1e9)) if last > t0 else None,
            "server_cpu_us_per_delivery": round(burst_cpu * 1e6 / delivered, 1) if delivered else None,
            "client_cpu_us_per_delivery": round(burst_client * 1e6 / delivered, 1) if delivered else None,
        },
    }


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (it does not fork), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    sock = tmp / "redis.sock"
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
         "--unixsocketperm", "700", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    return proc, f"unix://{sock}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--redis-url", help="default: start a private redis-server on a unix socket")
    p.add_argument("--subscribers", type=int, default=200)
    p.add_argument("--messages", type=int, default=20)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--burst-concurrency", type=int, default=1, help="publish requests in flight during the burst")
    p.add_argument("--wait", type=float, default=5.0, help="max seconds to wait for one paced broadcast")
    p.add_argument("--only", nargs="*", help="e.g. uvicorn-core daphne-pubsub")
    p.add_argument("--uvicorn-ws", default="websockets-sansio")
    p.add_argument("--logs", type=Path, help="directory for the servers' logs")
    p.add_argument("--target", help="HOST:PORT of a running server to check instead (no anchor started)")
    p.add_argument("--target-api-key", default="", help="its publish API key")
    p.add_argument(
        "--target-pids",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="its processes, comma-separated, for the CPU figures",
    )
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="channels-smoke-"))
    redis_proc = None
    redis_url = args.redis_url
    if not redis_url and not args.target:
        redis_proc, redis_url = start_redis(tmp)
    results = {}
    figures = (args.subscribers, args.messages, args.burst, args.wait, args.burst_concurrency)
    if args.target:  # any server speaking the protocol, e.g. the project's uWSGI
        host, _, port = args.target.rpartition(":")
        target = argparse.Namespace(host=host, port=int(port), api_key=args.target_api_key, pids=args.target_pids)
        r = asyncio.run(check(target, *figures))
        print(args.target, json.dumps(r), flush=True)
        return
    try:
        for server, layer in COMBINATIONS:
            name = f"{server}-{layer}"
            if args.only and name not in args.only:
                continue
            anchor = ChannelsServer(
                server, layer, redis_url, "smoke-key",
                python=sys.executable,
                log_path=(args.logs or tmp) / f"{name}.log",
                uvicorn_ws=args.uvicorn_ws,
                env={"CHANNELS_REDIS_LOG_LEVEL": "INFO"},
            )  # fmt: skip
            started = time.monotonic()
            anchor.start()
            start_s = time.monotonic() - started
            anchor.pids = [anchor.pid]
            try:
                r = asyncio.run(check(anchor, *figures))
            finally:
                code = anchor.stop()
            r["start_s"] = round(start_s, 2)
            r["exit_code"] = code
            log = anchor.log_text()
            over = [line for line in log.splitlines() if "over capacity" in line]
            r["tracebacks"] = log.count("Traceback")
            r["over_capacity_log_lines"] = len(over)
            results[name] = r
            print(name, json.dumps(r), flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
