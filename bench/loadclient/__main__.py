"""``python -m bench.loadclient ROLE CONFIG_JSON``: run one client role on uvloop.

The config carries ``deadline_s``: past it the client exits on its own, so a
lost orchestrator never leaves load running.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import traceback

import uvloop

from . import backpressure, fanout, httppub, load, manychannels, probe
from .channel import Channel

ROLES = {"probe": probe.run, "load": load.run, "fanout": fanout.run}
ROLES.update({"manychannels": manychannels.run, "httppub": httppub.run})
ROLES.update({"backpressure": backpressure.run, "stalled": backpressure.run_stalled})


async def main(role: str, cfg: dict) -> int:
    chan = await Channel().start()
    deadline = asyncio.timeout(cfg.get("deadline_s", 600))
    try:
        async with deadline:
            await ROLES[role](cfg, chan)
        return 0
    except Exception as exc:
        traceback.print_exc()
        if isinstance(exc, TimeoutError) and deadline.expired():
            chan.emit("error", reason=f"deadline of {cfg.get('deadline_s')} s reached")
        else:
            chan.emit("error", reason=f"{type(exc).__name__}: {exc!r}")
        return 1


def run() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m bench.loadclient {{{','.join(ROLES)}}} CONFIG_JSON")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000+ sockets
    sys.exit(uvloop.run(main(sys.argv[1], json.loads(sys.argv[2]))))


if __name__ == "__main__":
    run()
