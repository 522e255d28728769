"""``python -m bench.channels_anchor.publisher CONFIG_JSON`` (channels venv): ``group_send`` from a process.

What a Channels project does to publish from outside a consumer (a view, a
task, a management command): ``await channel_layer.group_send(group,
{"type": "offload.message", "text": ENVELOPE})``, the same message the
anchor's publish view sends (``views.py``), so the anchor's consumers
forward it unchanged. The layer is built here exactly as the anchor's
settings build it (same class, Redis URL and prefix: ``ChannelsServer.prefix``
of the server under test), on uvloop.

Run from the project directory with ``PYTHONPATH`` set to it (it imports
``bench.spread``, ``bench.stats`` and ``bench.channels_anchor.protocol``,
all standard library only).

Config: ``redis_url``, ``layer`` (``core`` or ``pubsub``), ``prefix``,
``seconds``, ``first_seq``, ``channels`` and ``channel_prefix`` (publish
``g`` goes to channel ``g % channels``: ``bench/spread.py``), and either

* ``concurrency``: that many callers in a closed loop (each awaits its
  ``group_send`` and calls again at once): throughput and call latency; or
* ``rate``: that many ``group_send`` per second, open loop, started in 5 ms
  batches whether or not earlier ones returned (at most 2,000 in flight).

It first sends once to a group nobody joined (connections open), prints
``{"event": "ready"}`` and starts when a line arrives on stdin. Prints one
JSON line at the end: ``first``, ``count``, ``ok``, ``failed`` (numbers whose
call raised, at most 10,000), ``errors``, ``seconds`` (start to last return),
``publishes_per_s``, ``latency`` (ms per call); then exits at EOF of stdin.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter

import uvloop

from bench.channels_anchor import protocol
from bench.spread import PREFIX, body, channel_index, channel_name
from bench.stats import summarize_us

LAYERS = {"core": "channels_redis.core.RedisChannelLayer", "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer"}
TICK = 0.005
MAX_IN_FLIGHT = 2000
MAX_FAILED = 10_000


def make_layer(kind: str, redis_url: str, prefix: str):
    """The layer as ``channels_anchor.settings`` configures it (``CONFIG``: hosts and prefix only)."""
    module, _, name = LAYERS[kind].rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    return cls(hosts=[redis_url], prefix=prefix)


async def main(cfg: dict) -> dict:
    layer = make_layer(cfg["layer"], cfg["redis_url"], cfg["prefix"])
    channels = int(cfg["channels"])
    names = [channel_name(i, cfg.get("channel_prefix", PREFIX)) for i in range(channels)]
    groups = [protocol.group_for(name) for name in names]
    ids = protocol.IdClock()
    first = int(cfg["first_seq"])
    numbers = itertools.count(first)
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    failed: list[int] = []
    last_return = 0.0

    async def send(g: int) -> None:
        nonlocal last_return
        index = channel_index(g, channels)
        text = protocol.message(names[index], ids.next(), body(g).decode())
        started = time.perf_counter_ns()
        try:
            await layer.group_send(groups[index], {"type": "offload.message", "text": text})
        except Exception as exc:
            errors[type(exc).__name__] += 1
            if len(failed) < MAX_FAILED:
                failed.append(g)
        else:
            latencies.append((time.perf_counter_ns() - started) // 1000)
        last_return = time.monotonic()

    async def caller(until: float) -> None:
        while time.monotonic() < until:
            await send(next(numbers))

    await layer.group_send("bench.warmup", {"type": "offload.message", "text": "{}"})
    print(json.dumps({"event": "ready"}), flush=True)
    if not await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
        sys.exit("stdin closed before go: the orchestrator is gone")
    started = time.monotonic()
    until = started + float(cfg["seconds"])
    if cfg.get("rate"):
        rate, sent = float(cfg["rate"]), 0
        in_flight: set[asyncio.Task] = set()
        while (now := time.monotonic()) < until:
            for _ in range(int(rate * (now - started + TICK)) - sent):
                sent += 1
                g = next(numbers)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    errors["skipped: too many in flight"] += 1
                    failed.append(g)
                    continue
                task = asyncio.create_task(send(g))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.sleep(TICK)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=30)
    else:
        await asyncio.gather(*(caller(until) for _ in range(int(cfg.get("concurrency") or 1))))
    took = max(1e-9, last_return - started)
    count = next(numbers) - first
    return {
        "first": first,
        "count": count,
        "ok": len(latencies),
        "failed": failed[:MAX_FAILED],
        "errors": dict(errors),
        "seconds": round(took, 3),
        "publishes_per_s": round(len(latencies) / took, 1),
        "latency": summarize_us(latencies),
    }


if __name__ == "__main__":
    print(json.dumps(uvloop.run(main(json.loads(sys.argv[1])))), flush=True)
    sys.stdin.read()  # exit at EOF: the orchestrator reads our CPU time first
