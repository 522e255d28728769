"""What a hostile client can reach of the responses uWSGI writes without Django.

Every request here goes over a raw socket: no client normalises ``..``,
percent-escapes or backslashes, and no client merges repeated headers, so the
test sees exactly the bytes uWSGI answered. Three real uWSGI instances from
the project's uwsgi.ini:

* ``server``: the demo project, its /slow view pointed at a recording upstream;
* ``hand_off_server``: uwsgi.ini serving :func:`hand_off_app` instead of
  Django, to send X-Sendfile paths that no view of the project would send
  (uwsgi.ini must not rely on ``send_file`` resolving paths);
* ``private_server``: the demo project started under umask 022 whose /slow
  upstream is down, for var/ permissions and the 502.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from offload.testing import LiveServer, free_port, wait_for
from tests.integration.demo import DemoServer

pytestmark = pytest.mark.timeout(180)

SECRET = b"top-secret-download-4f1c"


def hand_off_app(environ, start_response):
    """A WSGI app answering with the hand-off headers named in its query string."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    headers = [("Content-Type", "text/plain")]
    if "sendfile" in query:
        headers.append(("X-Sendfile", query["sendfile"][0]))
    if "upstream" in query:
        headers.append(("X-Offload-Upstream", query["upstream"][0]))
    start_response("200 OK", headers)
    return [b"answered by the app"]


# --- helpers -------------------------------------------------------------------------------


def raw_request(
    port: int, target: str | bytes, headers: bytes = b"", timeout: float = 20
) -> tuple[int | None, list, bytes]:
    """Send one request exactly as given; return ``(status, [(name, value)], body)``.

    ``status`` is None when uWSGI closed the connection without an answer.
    """
    target = target.encode() if isinstance(target, str) else target
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n"
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data:
        return None, [], b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    return int(lines[0].split()[1]), fields, body


def values(fields: list, name: str) -> list[str]:
    return [value for key, value in fields if key.lower() == name.lower()]


def gate_ready(server: LiveServer) -> None:
    """The upstream gate is a daemon uWSGI starts next to the workers."""
    wait_for((server.var_dir / "upstream.sock").exists, 20, "the upstream gate's socket")


class RecordingUpstream:
    """An upstream that records the headers it receives; ``?mode=hang`` never answers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []
        self.release = threading.Event()
        recording = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                recording.requests.append((self.path, list(self.headers.items())))
                if "mode=hang" in self.path:
                    recording.release.wait(60)
                    return
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Set-Cookie", "sessionid=planted-by-upstream; Path=/")
                self.send_header("X-Frame-Options", "ALLOWALL")
                self.send_header("Content-Security-Policy", "default-src *")
                self.send_header("Connection", "keep-alive, X-Hop")
                self.send_header("Keep-Alive", "timeout=5")
                self.send_header("X-Hop", "hop-by-hop")
                self.send_header("X-Upstream", "recording")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def received(self, token: str) -> list[tuple[str, str]]:
        return wait_for(
            lambda: next((headers for path, headers in self.requests if token in path), None),
            10,
            f"the upstream request with {token}",
        )

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()


class HandOffServer(LiveServer):
    """uwsgi.ini as the project ships it, with :func:`hand_off_app` as the WSGI module."""

    def start(self, timeout: float = 30, extra_args: tuple[str, ...] = ()) -> LiveServer:
        return super().start(timeout, ("--module", f"{__name__}:hand_off_app", *extra_args))

    def serves(self) -> bool:
        try:
            return raw_request(self.port, "/", timeout=2)[0] == 200
        except OSError:
            return False


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    recording = RecordingUpstream()
    yield recording
    recording.stop()


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    env = {"SLOW_UPSTREAM_URL": upstream.url, "OFFLOAD_UPSTREAM_TIMEOUT": "2"}
    live = DemoServer(tmp_path_factory.mktemp("surface-var"), env=env).prepare().start()
    gate_ready(live)
    files = live.var_dir / "files"
    (files / "downloads" / "secret.txt").write_bytes(SECRET)
    (files / "reports" / "1").mkdir(parents=True, exist_ok=True)
    (files / "reports" / "1" / "report.part").write_bytes(SECRET)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def hand_off_server(tmp_path_factory):
    var = tmp_path_factory.mktemp("hand-off-var")
    (var / "files" / "downloads").mkdir(parents=True)
    (var / "files" / "downloads" / "public.txt").write_bytes(b"public file")
    (var / "files" / "downloads" / "link-out").symlink_to(var / "secret_key")
    (var / "filesX").mkdir()
    (var / "filesX" / "secret.txt").write_bytes(SECRET)
    (var / "secret_key").write_bytes(SECRET)
    (var / "spool").mkdir()
    live = HandOffServer(var).start()
    gate_ready(live)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def private_server(tmp_path_factory):
    """The demo project, prepared and started the way `make run` does under umask 022.

    Its var/ exists already, world-readable, as an earlier version left it.
    """
    var = tmp_path_factory.mktemp("private") / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    live = DemoServer(var, env={"SLOW_UPSTREAM_URL": dead})
    del live.env["STATS"]  # the default: a unix socket in var/
    previous = os.umask(0o022)
    try:
        live.prepare()
        # uwsgi.log is the test harness's file (offload.testing opens it before uWSGI starts), not the app's
        live.log_path.touch(mode=0o600)
        live.start()
    finally:
        os.umask(previous)
    gate_ready(live)
    yield live
    live.stop()


# --- 1. static files: nothing outside var/static -------------------------------------------

TRAVERSALS = [
    "/static/%2e%2e/files/downloads/secret.txt",
    "/static/%2E%2E/files/downloads/secret.txt",
    "/static/%2e%2E/files/downloads/secret.txt",
    "/static/.%2e/files/downloads/secret.txt",
    "/static/%2e./files/downloads/secret.txt",
    "/static/..%2ffiles/downloads/secret.txt",
    "/static/%2e%2e%2ffiles%2fdownloads%2fsecret.txt",
    "/static/..%5cfiles%5cdownloads%5csecret.txt",
    "/static/%2e%2e%5cfiles%5cdownloads%5csecret.txt",
    "/static/..\\files\\downloads\\secret.txt",
    "/static/%252e%252e/files/downloads/secret.txt",
    "/static/%252e%252e%252ffiles%252fdownloads%252fsecret.txt",
    "/static/../files/downloads/secret.txt",
    "/static/./../files/downloads/secret.txt",
    "/static/app/%2e%2e/%2e%2e/files/downloads/secret.txt",
    "/static/%2e%2e/files/downloads/secret.txt%00.css",
    "//static/%2e%2e/files/downloads/secret.txt",
    "/static//%2e%2e/files/downloads/secret.txt",
    "/static/%2e%2e/files/reports/1/report.part",
    "/static/%2e%2e/secret_key",
    "/static/%2e%2e/db.sqlite3",
    "/static/{var}/files/downloads/secret.txt",
    "/static//{var}/files/downloads/secret.txt",
    "/static/%2f{var}/files/downloads/secret.txt",
    "/static/" + "%2e%2e/" * 30 + "{var}/files/downloads/secret.txt",
    "http://127.0.0.1/static/%2e%2e/files/downloads/secret.txt",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_static_route_never_serves_a_file_outside_the_static_root(server, target):
    status, _, body = raw_request(server.port, target.replace("{var}", str(server.var_dir).lstrip("/")))
    assert status in (403, 404), f"{target}: {status}"
    assert SECRET not in body
    assert (server.var_dir / "secret_key").read_bytes() not in body


def test_static_route_does_not_follow_symlinks_out_of_the_static_root(server):
    static, var = server.var_dir / "static", server.var_dir
    (static / "link-to-download").symlink_to(var / "files" / "downloads" / "secret.txt")
    (static / "link-to-files").symlink_to(var / "files")
    (static / "link-to-key").symlink_to(var / "secret_key")
    # uWSGI compares real paths with the static root as a string prefix: var/static-private passes it
    (var / "static-private").mkdir()
    (var / "static-private" / "secret.txt").write_bytes(SECRET)
    (static / "link-to-sibling").symlink_to(var / "static-private" / "secret.txt")
    for target in (
        "/static/link-to-download",
        "/static/link-to-files/downloads/secret.txt",
        "/static/link-to-key",
        "/static/link-to-sibling",
        "/static/%2e%2e/static-private/secret.txt",
    ):
        status, _, body = raw_request(server.port, target)
        assert status == 404, f"{target}: {status}"
        assert SECRET not in body and (var / "secret_key").read_bytes() not in body
    assert raw_request(server.port, "/static/app/app.css")[0] == 200  # the real files still are


# --- 2. security headers on what uWSGI serves itself ----------------------------------------

SECURITY = ("X-Content-Type-Options", "X-Frame-Options", "Content-Security-Policy")


def assert_security_headers(fields: list, csp_contains: str) -> None:
    assert values(fields, "X-Content-Type-Options") == ["nosniff"]
    assert values(fields, "X-Frame-Options") == ["DENY"]
    [csp] = values(fields, "Content-Security-Policy")
    assert csp.startswith("default-src 'none'") and csp_contains in csp


def test_static_files_and_uwsgi_refusals_carry_the_security_headers(server):
    manifest = json.loads((server.var_dir / "static" / "staticfiles.json").read_text())
    hashed = "/static/" + manifest["paths"]["app/app.css"]
    for target, extra, expected in (
        (hashed, b"", 200),
        (hashed, b"Accept-Encoding: br\r\n", 200),
        (hashed, b"Range: bytes=0-9\r\n", 206),
        (hashed, b"If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n", 304),
        ("/static/missing.css", b"", 404),
        ("/static/%2e%2e/secret_key", b"", 404),
        ("/healthz?pad=" + "a" * 5000, b"", 414),
    ):
        status, fields, _ = raw_request(server.port, target, extra)
        assert status == expected, target
        assert_security_headers(fields, "style-src 'self'")


def test_protected_downloads_carry_the_security_headers(server, alice):
    status, fields, body = raw_request(
        server.port, "/downloads/secret.txt", f"Cookie: {alice.cookie_header()}\r\n".encode()
    )
    assert status == 200 and body == SECRET
    assert_security_headers(fields, "sandbox")
    assert values(fields, "Content-Disposition") == ['attachment; filename="secret.txt"']
    assert not values(fields, "X-Sendfile")


def test_django_responses_keep_their_own_security_headers_once(server, alice):
    for target, cookie in (("/accounts/login/", b""), ("/healthz", b""), ("/rooms/general/", alice.cookie_header())):
        cookie = cookie.encode() if isinstance(cookie, str) else cookie
        status, fields, _ = raw_request(server.port, target, b"Cookie: " + cookie + b"\r\n" if cookie else b"")
        assert status == 200, target
        assert values(fields, "X-Content-Type-Options") == ["nosniff"], target
        assert values(fields, "X-Frame-Options") == ["DENY"], target
        assert not values(fields, "Content-Security-Policy"), target  # the pages' own, none: nothing added


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("{var}/files/downloads/public.txt", 200),
        ("{var}/files/../secret_key", 403),
        ("{var}/files/downloads/../../secret_key", 403),
        ("{var}/filesX/secret.txt", 403),
        ("{var}/files/./downloads/public.txt", 403),
        ("{var}/files//downloads/public.txt", 403),
        ("{var}/files/downloads/link-out", 403),
        ("{var}/files/downloads/missing.txt", 404),
        ("{var}/files/downloads", 404),
        ("/etc/passwd", 403),
        ("{var}/secret_key", 403),
    ],
)
def test_x_sendfile_is_honoured_only_for_real_files_under_var_files(hand_off_server, path, expected):
    path = path.replace("{var}", str(hand_off_server.var_dir))
    status, fields, body = raw_request(hand_off_server.port, "/?" + urllib.parse.urlencode({"sendfile": path}))
    assert status == expected, path
    assert SECRET not in body and b"root:" not in body
    assert_security_headers(fields, "sandbox")
    if expected == 200:
        assert body == b"public file"


# --- 3. the /slow upstream hand-off --------------------------------------------------------


def test_upstream_gets_only_allowed_headers_and_its_own_host(server, upstream, alice):
    token = f"token{time.monotonic_ns()}"
    headers = (
        f"Cookie: {alice.cookie_header()}\r\nAuthorization: Bearer client-secret\r\n"
        "X-Forwarded-For: 6.6.6.6\r\nAccept-Language: fr\r\nRange: bytes=0-\r\nX-Api-Key: client-secret\r\n"
    ).encode()
    status, _, _ = raw_request(server.port, f"/slow?{token}=1", headers)
    assert status == 200
    received = dict(upstream.received(token))
    assert "Cookie" not in received and "Authorization" not in received and "X-Api-Key" not in received
    assert received["Host"] == upstream.url.removeprefix("http://")
    assert received["X-Forwarded-For"] == "127.0.0.1"  # the peer's address, not what the client claimed
    assert received["Accept-Language"] == "fr" and received["Range"] == "bytes=0-"


def test_upstream_set_cookie_and_hop_by_hop_headers_never_reach_the_client(server, upstream, alice):
    status, fields, body = raw_request(server.port, "/slow?plain=1", f"Cookie: {alice.cookie_header()}\r\n".encode())
    assert status == 200 and json.loads(body)["path"] == "/slow?plain=1"
    assert values(fields, "X-Upstream") == ["recording"]
    assert not values(fields, "Set-Cookie") and not values(fields, "X-Hop") and not values(fields, "Keep-Alive")
    assert values(fields, "Connection") == ["close"]
    assert_security_headers(fields, "sandbox")


def test_hung_upstream_is_a_504_after_the_upstream_timeout(server, alice):
    started = time.monotonic()
    status, fields, _ = raw_request(server.port, "/slow?mode=hang", f"Cookie: {alice.cookie_header()}\r\n".encode())
    assert status == 504
    assert 1.5 < time.monotonic() - started < 10  # OFFLOAD_UPSTREAM_TIMEOUT=2
    assert_security_headers(fields, "sandbox")


def test_dead_upstream_is_a_502(private_server):
    alice = private_server.http()
    alice.login("alice")
    status, fields, body = raw_request(
        private_server.port, "/slow?delay=0", f"Cookie: {alice.cookie_header()}\r\n".encode()
    )
    assert status == 502 and body == b"Bad Gateway\n"
    assert_security_headers(fields, "sandbox")


def test_upstream_that_is_not_http_or_gone_is_a_502(hand_off_server):
    garbage = socket.create_server(("127.0.0.1", 0))
    port = garbage.getsockname()[1]

    def answer_garbage():
        conn, _ = garbage.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    for upstream in (f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{free_port()}/"):
        status, fields, _ = raw_request(hand_off_server.port, "/?" + urllib.parse.urlencode({"upstream": upstream}))
        assert status == 502, upstream
        assert_security_headers(fields, "sandbox")
    garbage.close()


def test_a_client_that_leaves_frees_the_gate_and_the_upstream_connection(hand_off_server, upstream):
    gate_pid = int((hand_off_server.var_dir / "upstream.pid").read_text())

    def gate_fds() -> int:
        return len(os.listdir(f"/proc/{gate_pid}/fd"))

    idle = gate_fds()
    token = f"leave{time.monotonic_ns()}"
    clients = []
    for i in range(5):
        client = socket.create_connection(("127.0.0.1", hand_off_server.port), timeout=10)
        target = "/?" + urllib.parse.urlencode({"upstream": f"{upstream.url}/slow?mode=hang&{token}={i}"})
        client.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        clients.append(client)
    wait_for(lambda: sum(token in path for path, _ in upstream.requests) == 5, 10, "5 requests at the upstream")
    assert gate_fds() >= idle + 10  # a socket from uWSGI and one to the upstream each
    for client in clients:
        client.close()
    wait_for(lambda: gate_fds() == idle, 10, "the gate to close both sides")  # not after the 60 s timeout


def test_without_its_gate_the_hand_off_is_a_502_until_uwsgi_restarts_the_gate(hand_off_server, upstream):
    gate = hand_off_server.var_dir / "upstream.sock"
    old_pid = int((hand_off_server.var_dir / "upstream.pid").read_text())
    os.kill(old_pid, signal.SIGTERM)
    wait_for(lambda: not gate.exists(), 10, "the gate to remove its socket")
    target = "/?" + urllib.parse.urlencode({"upstream": f"{upstream.url}/slow?gate=1"})
    status, fields, _ = raw_request(hand_off_server.port, target)
    assert status == 502  # not a closed connection
    assert_security_headers(fields, "sandbox")
    wait_for(gate.exists, 20, "uWSGI to start the gate again")
    assert int((hand_off_server.var_dir / "upstream.pid").read_text()) != old_pid
    assert raw_request(hand_off_server.port, target)[0] == 200


# --- 4. request heads that do not fit uWSGI's buffer ----------------------------------------


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (
            "/ws/?channel=public:news&pad=",
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        ),
        ("/sse/?channel=public:news&pad=", b"Accept: text/event-stream\r\n"),
        ("/accounts/login/?next=/&pad=", b""),
    ],
)
def test_a_long_query_string_is_refused_with_414(server, path, headers):
    if path.startswith("/ws/"):
        headers += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: " + server.base_url.encode() + b"\r\n"
    status, _, body = raw_request(server.port, path + "a" * 5000, headers)
    assert status == 414 and body == b"Request-URI Too Long"


def test_a_query_string_is_never_dropped_silently(server):
    """Every length up to beyond the buffer: the query arrives whole, or the client gets 414 or a closed connection."""
    outcomes = set()
    for length in range(3000, 8400, 100):
        status, _, body = raw_request(server.port, f"/accounts/login/?next=/arrived&pad={'q' * length}")
        if status == 200:  # uWSGI keeps a variable whole or drops it: `next` shows whether it arrived
            assert b'name="next" value="/arrived"' in body, f"{length}: the login form lost its query string"
        else:
            assert status in (414, None), f"{length}: {status}"
        outcomes.add(status)
    assert outcomes == {200, 414, None}


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Long: " + b"b" * 9000 + b"\r\n",
        b"".join(b"X-Header-%d: value\r\n" % i for i in range(600)),
        b"".join(b"A%d: b\r\n" % i for i in range(150)),
    ],
    ids=["one-9KB-line", "600-lines", "150-tiny-lines"],
)
def test_oversized_request_heads_are_refused_and_the_worker_survives(server, headers):
    workers = server.worker_pids()
    status, _, _ = raw_request(server.port, "/accounts/login/", headers)
    assert status is None or 400 <= status < 500
    assert server.worker_pids() == workers
    assert raw_request(server.port, "/healthz")[0] == 200


# --- 5. var/ is private --------------------------------------------------------------------


def test_var_is_owner_only_after_prepare_run_login_publish_and_a_report(private_server):
    var = private_server.var_dir
    alice = private_server.http()
    alice.login("alice")  # a session row (and SQLite's WAL) in db.sqlite3
    message_id = private_server.publish("public:private-check", {"n": 1})
    aof = var / "appendonlydir"
    wait_for(lambda: any(message_id.encode() in p.read_bytes() for p in aof.iterdir() if p.is_file()), 10, "the AOF")
    private_server.redis().bgsave()
    wait_for((var / "dump.rdb").exists, 10, "Redis' dump.rdb")
    status, _, body = alice.post_csrf("/reports/", {"seconds": "0", "rows": "100"})
    assert status == 202
    task_id = json.loads(body)["task_id"]
    wait_for(lambda: list((var / "files" / "reports").glob(f"*/{task_id}.csv")), 30, "the report file")

    exposed = []
    for root, dirs, files in os.walk(var):
        for name in [*dirs, *files]:
            mode = os.lstat(os.path.join(root, name)).st_mode
            if mode & 0o077:
                exposed.append(f"{stat.filemode(mode)} {os.path.relpath(os.path.join(root, name), var)}")
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    assert not exposed, "readable by others:\n" + "\n".join(exposed)
    names = {p.name for p in var.iterdir()}
    assert {"db.sqlite3", "redis.sock", "upstream.sock", "stats.sock", "dump.rdb", "static", "spool"} <= names


def test_the_stats_server_which_shows_cookies_in_flight_is_a_private_unix_socket(private_server):
    """uWSGI's stats list the variables of every request in flight (HTTP_COOKIE, HTTP_AUTHORIZATION)."""
    alice = private_server.http()
    alice.login("alice")
    slow = socket.create_connection(("127.0.0.1", private_server.port), timeout=10)
    slow.sendall(  # a request body that never completes holds a core with alice's cookie in its variables
        f"POST /notify HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {alice.cookie_header()}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\na".encode()
    )

    def stats() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(private_server.var_dir / "stats.sock"))
            return b"".join(iter(lambda: sock.recv(65536), b""))

    wait_for(lambda: alice.cookie("sessionid").encode() in stats(), 10, "the stats to show the request")
    slow.close()
    mode = (private_server.var_dir / "stats.sock").stat().st_mode
    assert stat.S_ISSOCK(mode) and not mode & 0o077


def test_a_long_cookie_header_is_never_dropped_silently(server, alice):
    """A page that needs the session: it arrives with the long Cookie header, or the connection is closed."""
    outcomes = set()
    for length in range(7000, 8400, 50):
        cookie = f"Cookie: pad={'c' * length}; {alice.cookie_header()}\r\n".encode()
        status, _, _ = raw_request(server.port, "/rooms/general/", cookie)
        assert status in (200, None), f"{length}: {status} (302: the session cookie was dropped)"
        outcomes.add(status)
    assert outcomes == {200, None}
