"""Every offload path really leaves the Python cores: uWSGI's stats and log prove it.

A response that merely arrives is not enough: each test checks uWSGI's
``offloaded_requests`` counter (stats server) or its "via offload()" log line.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from app.slow_upstream import serve
from offload.testing import LiveServer, free_port, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(120)


def offloaded(server: LiveServer) -> int:
    return sum(core.get("offloaded_requests", 0) for w in server.stats()["workers"] for core in w["cores"])


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    httpd = serve(port)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    live = DemoServer(tmp_path_factory.mktemp("offload-var"), env={"SLOW_UPSTREAM_URL": upstream[0], "CORES": "8"})
    live.prepare().start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def big_file(server):
    path = server.var_dir / "files" / "downloads" / "big.bin"
    path.write_bytes(os.urandom(5_000_000))
    return path


def test_protected_download_is_sent_by_an_offload_thread(server, big_file, alice):
    before = offloaded(server)
    status, headers, body = alice.request("GET", "/downloads/big.bin")
    assert status == 200
    assert body == big_file.read_bytes()
    assert headers["Content-Disposition"] == 'attachment; filename="big.bin"'
    assert headers["Cache-Control"] == "private, no-store"
    assert "X-Sendfile" not in headers
    assert offloaded(server) == before + 1
    assert re.search(r"GET /downloads/big.bin => generated 5000000 bytes .* via offload\(\)", server.log_text())


def test_anonymous_users_are_sent_to_the_login_page(server, big_file):
    status, _, body = server.http().request("GET", "/downloads/big.bin")
    assert status == 200 and b"login-button" in body  # urllib followed the redirect to the login form
    assert big_file.read_bytes()[:100] not in body


def test_range_requests_resume_downloads(server, big_file, alice):
    status, _, body = alice.request("GET", "/downloads/big.bin", headers={"Range": "bytes=100-199"})
    assert status == 206
    assert body == big_file.read_bytes()[100:200]


@pytest.mark.parametrize(
    "path",
    [
        "/downloads/../secret_key",
        "/downloads/%2e%2e/secret_key",
        "/downloads/..%2fsecret_key",
        "/downloads/..%2f..%2fvar%2fsecret_key",
        "/downloads//etc/passwd",
        "/downloads/%2fetc%2fpasswd",
        "/downloads/link-out",
        "/downloads/",
    ],
)
def test_path_traversal_is_refused(server, alice, path):
    link = server.var_dir / "files" / "downloads" / "link-out"
    if not link.is_symlink():
        link.symlink_to(server.var_dir / "secret_key")
    secret = (server.var_dir / "secret_key").read_bytes()
    status, _, body = alice.request("GET", path)
    assert status == 404
    assert secret not in body and b"root:" not in body


def test_static_files_are_offloaded_precompressed_and_cached(server):
    manifest = json.loads((server.var_dir / "static" / "staticfiles.json").read_text())
    hashed = manifest["paths"]["app/app.css"]
    plain_size = (server.var_dir / "static" / hashed).stat().st_size
    session = server.http()
    before = offloaded(server)
    status, headers, body = session.request("GET", f"/static/{hashed}", headers={"Accept-Encoding": "br"})
    assert status == 200 and headers["Content-Encoding"] == "br" and len(body) < plain_size
    status, headers, body = session.request("GET", f"/static/{hashed}", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    expires = time.mktime(time.strptime(headers["Expires"], "%a, %d %b %Y %H:%M:%S GMT"))
    assert expires - time.time() > 300 * 86400  # far future for hashed names
    assert offloaded(server) == before + 2
    status, headers, _ = session.request("GET", "/static/app/app.css")
    assert status == 200 and "Expires" not in headers  # unhashed names may change


def test_slow_upstream_is_proxied_by_an_offload_thread(server, alice):
    before = offloaded(server)
    status, headers, body = alice.request("GET", "/slow?delay=0.2&size=100000")
    assert status == 200 and headers["X-Upstream"] == "slow" and len(body) == 100000
    assert "X-Offload-Upstream" not in headers
    assert offloaded(server) == before + 1


def test_slow_upstreams_do_not_hold_gevent_cores(server, alice):
    """The server has 8 gevent cores. 12 slow proxied requests all reach the
    upstream at once (offload threads wait for them, not cores), and a normal
    view is still served meanwhile. Without offloading only 8 would get through."""
    from app.slow_upstream import SlowHandler

    results = []

    def slow():
        results.append(alice.request("GET", "/slow?delay=4&size=1000", timeout=60)[0])

    threads = [threading.Thread(target=slow) for _ in range(12)]
    for t in threads:
        t.start()
    # Within 3.5 s, before the first (4 s) upstream answers: with 8 cores pinned, never.
    wait_for(lambda: SlowHandler.in_flight >= 12, 3.5, "12 slow requests at the upstream at once (cores pinned?)", 0.02)
    status, _, _ = server.http().request("GET", "/accounts/login/", timeout=10)
    assert status == 200
    assert SlowHandler.in_flight == 12, "the slow requests finished before the check: it proved nothing"
    for t in threads:
        t.join()
    assert results == [200] * 12
