"""A tiny asyncio HTTP/1.1 client: exact timing, slow reads, no dependency.

One connection per request (``Connection: close``), as a browser opening a
page cold would; the latency measured is connect + server time + body. Slow
downloads read the body at a set pace through a deliberately small socket
receive buffer, so TCP back-pressure reaches the server as from a slow
client instead of the kernel buffering megabytes for us.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_ns: int


async def connect(host: str, port: int, rcvbuf: int | None = None):
    """``(reader, writer)``; ``rcvbuf`` caps the kernel's receive buffer."""
    if rcvbuf is None:
        return await asyncio.open_connection(host, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def encode_request(method: str, path: str, host: str, headers: dict | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return b"".join(parts)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


async def request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    headers: dict | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> Response:
    """One request on a new connection; raises on network errors and timeouts."""
    started = time.perf_counter_ns()
    async with asyncio.timeout(timeout):
        reader, writer = await connect(host, port)
        try:
            writer.write(encode_request(method, path, f"{host}:{port}", headers, body))
            status, response_headers = await read_head(reader)
            data = await read_body(reader, response_headers)
        finally:
            writer.close()
    return Response(status, response_headers, data, time.perf_counter_ns() - started)
