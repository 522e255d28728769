"""JSON lines with the orchestrator: commands on stdin, events on stdout.

stdout carries nothing else (logs go to stderr), so the orchestrator can
parse every line. EOF on stdin means "stop now": the orchestrator is gone or
wants us gone.
"""

from __future__ import annotations

import asyncio
import json
import sys


class Channel:
    def __init__(self) -> None:
        self.commands: asyncio.Queue[dict] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> Channel:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._task = asyncio.create_task(self._read(reader))
        return self

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                await self.commands.put(json.loads(line))
            except ValueError:
                print(f"ignoring bad command line: {line[:200]!r}", file=sys.stderr)
        await self.commands.put({"cmd": "eof"})

    async def next(self) -> dict:
        return await self.commands.get()

    @staticmethod
    def emit(event: str, **fields) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
        sys.stdout.flush()
