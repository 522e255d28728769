"""A raw websocket upgrade request, any header wrong or missing (tests only).

Frames, valid or not, come from ``offload.testing.frame``; a connected client
that sends them and reads the server's frames is ``offload.testing.WebSocketClient``.
"""

from __future__ import annotations

import base64
import os
import socket

_KEEP = object()  # send the usual value of a header


def handshake(
    port: int,
    path: str = "/ws/",
    host: str | None = None,
    origin: str | None = None,
    *,
    method: str = "GET",
    key=_KEEP,
    version=_KEEP,
    connection="Upgrade",
    protocol: str | None = None,
    keep_open: bool = False,
    rcvbuf: int | None = None,
):
    """Send one upgrade request; return the status and the response headers
    (lower-case names), plus the socket and the bytes after the headers when
    ``keep_open``. ``key``/``version`` None leave the header out; ``rcvbuf``
    sets the socket's receive buffer before it connects (a client that reads slowly)."""
    if key is _KEEP:
        key = base64.b64encode(os.urandom(16)).decode()
    if version is _KEEP:
        version = "13"
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host or f'127.0.0.1:{port}'}",
        "Upgrade: websocket",
        f"Connection: {connection}",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    if origin:
        lines.append(f"Origin: {origin}")
    sock = socket.socket()
    sock.settimeout(10)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head_bytes, rest = read_head(sock)
    head = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(head[0].split()[1])
    if keep_open:
        return status, headers, sock, rest
    sock.close()
    return status, headers


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of a response head; returns the head and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest
