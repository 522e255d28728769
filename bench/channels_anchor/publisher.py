"""``python -m bench.channels_anchor.publisher CONFIG_JSON`` (channels venv): ``group_send`` from a process, as a
Channels project publishes from a view or a task, with the layer the running anchor's settings build."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop
from channels.layers import get_channel_layer

from bench import publoop
from bench.channels_anchor import protocol


async def main(cfg: dict) -> None:
    os.environ.update(DJANGO_SETTINGS_MODULE="bench.channels_anchor.settings", REDIS_URL=cfg["redis_url"])
    os.environ.update(CHANNEL_LAYER=cfg["layer"], CHANNELS_PREFIX=cfg["prefix"])
    layer = get_channel_layer()  # read from the settings: the anchor's own
    names = publoop.names(cfg)
    groups = [protocol.group_for(name) for name in names]

    async def call(g: int) -> None:
        i = g % len(names)
        text = protocol.message(names[i], protocol.next_id(), publoop.stamp(g).decode())
        await layer.group_send(groups[i], {"type": "offload.message", "text": text})

    await layer.group_send("bench.warmup", {"type": "offload.message", "text": "{}"})
    await asyncio.get_running_loop().run_in_executor(None, publoop.ready_then_go)
    run = publoop.PublishRun(int(cfg["first"]), float(cfg["seconds"]), cfg.get("rate"))
    await publoop.drive(run, call, int(cfg["concurrency"]))
    publoop.finish(run)


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
