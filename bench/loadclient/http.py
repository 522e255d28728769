"""A tiny asyncio HTTP/1.1 client. One connection per request, as a browser opening a page cold: latency is connect
+ server time + body. Slow downloads read through a small receive buffer, so TCP back-pressure reaches the server
as from a slow client instead of the kernel buffering megabytes for us."""

from __future__ import annotations

import asyncio
import socket
import time


async def connect(host: str, port: int, rcvbuf: int | None = None):
    """``(reader, writer)``; ``rcvbuf`` caps the kernel's receive buffer (set before connecting)."""
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
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers (names lower-cased)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line))
    return int(lines[0].split(" ", 2)[1]), headers


async def request(
    host: str, port: int, method: str, path: str, *, headers: dict | None = None, body: bytes = b"", timeout: float = 10
) -> tuple[int, bytes, int]:
    """``(status, body, elapsed ns)`` of one request on a new connection; raises on network errors."""
    started = time.perf_counter_ns()
    async with asyncio.timeout(timeout):
        reader, writer = await connect(host, port)
        try:
            writer.write(encode_request(method, path, f"{host}:{port}", headers, body))
            status, head = await read_head(reader)
            if "content-length" in head:
                data = await reader.readexactly(int(head["content-length"]))
            else:  # chunked or close-delimited: the bench reads only status codes from those
                data = await reader.read()
        finally:
            writer.close()
    return status, data, time.perf_counter_ns() - started
