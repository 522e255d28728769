"""``python -m bench.redis_publisher CONFIG_JSON`` (project .venv): publish straight into Redis.

What ``offload.publish()`` does, minus Django: EVALSHA of the project's own
``offload/lua/publish.lua`` with the same keys and arguments as
``offload/publishing.py`` (history stream key, pub/sub channel, data,
history size and TTL of the namespace). Runs in its own process so that the
publisher's CPU is neither the server's nor the load client's.

Config: ``redis_url``, ``channel``, ``rate`` (publishes/s, paced in 5 ms
batches sent as one pipeline), ``seconds``, ``first_seq``, ``prefix``,
``history_size``, ``history_ttl``. Every body is ``{"t": ns, "seq": n}``
with ``seq`` counting from ``first_seq``. Prints one JSON line at the end:
``{"first", "count", "seconds", "errors"}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import redis

LUA = Path(__file__).resolve().parent.parent / "offload" / "lua" / "publish.lua"
TICK = 0.005


def main(cfg: dict) -> dict:
    client = redis.Redis.from_url(cfg["redis_url"])
    sha = client.script_load(LUA.read_text())
    key = f"{cfg['prefix']}h:{cfg['channel']}"
    pubsub = f"{cfg['prefix']}c:{cfg['channel']}"
    size, ttl = cfg["history_size"], cfg["history_ttl"]
    seq = first = int(cfg["first_seq"])
    rate = float(cfg["rate"])
    errors = 0
    started = time.monotonic()
    end = started + float(cfg["seconds"])
    due = 0.0
    while (now := time.monotonic()) < end:
        due += rate * TICK
        batch = int(due)
        due -= batch
        if batch:
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                data = b'{"t":%d,"seq":%d}' % (time.time_ns(), seq)
                pipe.evalsha(sha, 1, key, pubsub, data, size, ttl)
                seq += 1
            try:
                pipe.execute()
            except redis.RedisError:
                errors += 1
        time.sleep(max(0.0, TICK - (time.monotonic() - now)))
    return {"first": first, "count": seq - first, "seconds": round(time.monotonic() - started, 3), "errors": errors}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
