"""A deliberately slow HTTP upstream for the demo and the tests.

    python -m app.slow_upstream [PORT]     (make slow-upstream)

``GET /slow?delay=2&size=100000`` waits ``delay`` seconds, then sends
``size`` bytes in small slow chunks: the kind of upstream that would pin a
Python core for the whole time if Django proxied it itself.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_NUMBER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


class SlowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    #: Requests being answered right now (tests read it).
    in_flight = 0
    _lock = threading.Lock()

    def do_GET(self) -> None:
        with SlowHandler._lock:
            SlowHandler.in_flight += 1
        try:
            self._answer()
        finally:
            with SlowHandler._lock:
                SlowHandler.in_flight -= 1

    def _answer(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        delay = _number(query.get("delay", ["1"])[0], 60.0)
        size = _number(query.get("size", ["1000"])[0], 100_000_000)
        if delay is None or size is None:
            self.send_error(400, "delay and size must be plain numbers")  # not a crash and an empty reply
            return
        size = int(size)
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(size))
        self.send_header("X-Upstream", "slow")
        self.end_headers()
        chunk = b"x" * 4096
        sent = 0
        while sent < size:
            part = chunk[: size - sent]
            self.wfile.write(part)
            sent += len(part)

    def log_message(self, format: str, *args) -> None:
        pass


def _number(text: str, limit: float) -> float | None:
    """A plain decimal number (ASCII digits, optional fraction) capped at ``limit``, or None."""
    if not _NUMBER.fullmatch(text):
        return None
    return min(float(text), limit)


def serve(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), SlowHandler)
    server.daemon_threads = True
    return server


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8001
    print(f"slow upstream on http://127.0.0.1:{port}/slow?delay=2&size=100000", flush=True)
    serve(port).serve_forever()
