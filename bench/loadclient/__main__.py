"""``python -m bench.loadclient ROLE CONFIG_JSON``: one client role on uvloop, JSON lines on stdin/stdout (logs to
stderr). EOF on stdin means "stop now"; past ``deadline_s`` it exits by itself: a lost orchestrator leaves no load."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import traceback

import uvloop

from bench.publoop import emit

from . import load, stalled, subscribers

ROLES = {"subscribers": subscribers.run, "load": load.run, "stalled": stalled.run}


class Channel:
    """The orchestrator's commands from stdin (``{"cmd": "eof"}`` once it closed), events to stdout."""

    emit = staticmethod(emit)

    async def start(self) -> Channel:
        self.reader = asyncio.StreamReader(limit=1 << 24)  # an "expect" may list 10,000 failed numbers
        protocol = asyncio.StreamReaderProtocol(self.reader)
        await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, sys.stdin)
        return self

    async def next(self) -> dict:
        line = await self.reader.readline()  # cancelled (a timeout), it leaves a partial line in the buffer
        return json.loads(line) if line else {"cmd": "eof"}


async def main(role: str, cfg: dict) -> int:
    chan = await Channel().start()
    deadline = asyncio.timeout(cfg.get("deadline_s", 900))
    try:
        async with deadline:
            await ROLES[role](cfg, chan)
        return 0
    except Exception as exc:
        traceback.print_exc()
        expired = isinstance(exc, TimeoutError) and deadline.expired()
        emit("error", reason=f"deadline of {cfg.get('deadline_s')} s reached" if expired else repr(exc))
        return 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ROLES:
        sys.exit(f"usage: python -m bench.loadclient {{{','.join(ROLES)}}} CONFIG_JSON")
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)  # 10,000 sockets
    sys.exit(uvloop.run(main(sys.argv[1], json.loads(sys.argv[2]))))
