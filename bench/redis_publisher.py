"""``python -m bench.redis_publisher CONFIG_JSON`` (project .venv): publish straight into Redis.

What ``offload.publish()`` does, minus Django: EVALSHA of the project's own
``offload/lua/publish.lua`` with the same keys and arguments as
``offload/publishing.py`` (history stream key, a fresh publish token key,
pub/sub channel, data, history size and TTL of the namespace). Runs in its
own process so that the publisher's CPU is neither the server's nor the load
client's.

Config: ``redis_url``, ``rate`` (publishes/s, paced in 5 ms batches sent as
one pipeline, paced by the clock), ``seconds``, ``first_seq``, ``prefix``, ``history_size``,
``history_ttl``, and either

* ``channel``: every publish goes to that one channel, or
* ``channels`` (a count) and optionally ``channel_prefix`` (default
  ``public:mc-``): publish ``g`` goes to channel ``g % channels``
  (``bench/spread.py``), round robin over all of them.

Every body is ``{"t": ns, "seq": g}`` with ``g`` counting from ``first_seq``.
With ``"wait_go": true`` it connects and loads the script, prints
``{"event": "ready"}`` and starts only when a line arrives on stdin (so the
orchestrator can open its measuring window first), and after its result
waits for EOF on stdin before exiting. Prints one JSON line at the end:
``{"first", "count", "seconds", "errors", "failed"}`` (``failed``: the seqs
whose EVALSHA failed, at most 10,000).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import redis

from .spread import PREFIX, channel_index, channel_name

LUA = Path(__file__).resolve().parent.parent / "offload" / "lua" / "publish.lua"
TICK = 0.005
MAX_FAILED = 10_000


def main(cfg: dict) -> dict:
    client = redis.Redis.from_url(cfg["redis_url"])
    sha = client.script_load(LUA.read_text())
    prefix = cfg["prefix"]
    if cfg.get("channels"):
        names = [channel_name(i, cfg.get("channel_prefix", PREFIX)) for i in range(int(cfg["channels"]))]
    else:
        names = [cfg["channel"]]
    # the keys offload.redis_client builds: history stream and pub/sub channel per channel
    targets = [(f"{prefix}h:{name}".encode(), f"{prefix}c:{name}".encode()) for name in names]
    token_prefix = f"{prefix}pub:"
    size, ttl = cfg["history_size"], cfg["history_ttl"]
    seq = first = int(cfg["first_seq"])
    rate = float(cfg["rate"])
    failed: list[int] = []
    errors = 0
    if cfg.get("wait_go"):
        print(json.dumps({"event": "ready"}), flush=True)
        if not sys.stdin.readline():
            sys.exit("stdin closed before go: the orchestrator is gone")
    started = time.monotonic()
    end = started + float(cfg["seconds"])
    while (now := time.monotonic()) < end:
        batch = int(rate * (now - started + TICK)) - (seq - first)  # paced by the clock: a slow tick catches up
        if batch > 0:
            pipe = client.pipeline(transaction=False)
            seqs = []
            for _ in range(batch):
                key, pubsub = targets[channel_index(seq, len(targets))]
                data = b'{"t":%d,"seq":%d}' % (time.time_ns(), seq)
                # KEYS: history stream, this call's publish token (as offload.publishing.publish_json)
                pipe.evalsha(sha, 2, key, token_prefix + uuid.uuid4().hex, pubsub, data, size, ttl)
                seqs.append(seq)
                seq += 1
            try:
                replies = pipe.execute(raise_on_error=False)
            except redis.RedisError:
                replies = [None] * len(seqs)
            for s, reply in zip(seqs, replies, strict=True):
                if reply is None or isinstance(reply, Exception):
                    errors += 1
                    if len(failed) < MAX_FAILED:
                        failed.append(s)
        time.sleep(max(0.0, TICK - (time.monotonic() - now)))
    return {
        "first": first,
        "count": seq - first,
        "seconds": round(time.monotonic() - started, 3),
        "errors": errors,
        "failed": failed,
    }


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    print(json.dumps(main(config)), flush=True)
    if config.get("wait_go"):
        sys.stdin.read()  # exit at EOF: the orchestrator reads our CPU time first
