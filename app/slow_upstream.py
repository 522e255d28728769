"""A deliberately slow HTTP upstream for the demo and the tests.

    python -m app.slow_upstream [PORT]     (make slow-upstream)

``GET /slow?delay=2&size=100000`` waits ``delay`` seconds, then sends
``size`` bytes in small slow chunks: the kind of upstream that would pin a
Python core for the whole time if Django proxied it itself.
"""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


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
        delay = min(float(query.get("delay", ["1"])[0]), 60.0)
        size = min(int(query.get("size", ["1000"])[0]), 100_000_000)
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


def serve(port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), SlowHandler)
    server.daemon_threads = True
    return server


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8001
    print(f"slow upstream on http://127.0.0.1:{port}/slow?delay=2&size=100000", flush=True)
    serve(port).serve_forever()
