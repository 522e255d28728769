"""Path checks and the inline fallback of offload.transfers, and the header rules of
offload.upstream_gate (no uWSGI needed)."""

import os
import socket
import time

import pytest
from django.http import Http404

from offload.addresses import parse_networks
from offload.transfers import proxy_upstream, resolve_under, send_file
from offload.upstream_gate import UPSTREAM_SECURITY_HEADERS, GateError, filter_upstream_response, upstream_request


@pytest.fixture
def root(tmp_path):
    (tmp_path / "files" / "sub").mkdir(parents=True)
    (tmp_path / "files" / "a.txt").write_bytes(b"A" * 100_000)
    (tmp_path / "files" / "sub" / "b.txt").write_bytes(b"B")
    (tmp_path / "secret").write_bytes(b"S")
    (tmp_path / "files" / "out").symlink_to(tmp_path / "secret")
    return tmp_path / "files"


def test_resolve_under_accepts_files_inside_the_root(root):
    assert resolve_under(root, "a.txt") == root / "a.txt"
    assert resolve_under(root, "sub/b.txt") == root / "sub" / "b.txt"


@pytest.mark.parametrize(
    "name", ["", "../secret", "sub/../../secret", "/etc/passwd", "out", "sub", "missing.txt", "a.txt\x00.png", "./"]
)
def test_resolve_under_refuses_traversal_links_and_non_files(root, name):
    with pytest.raises(Http404):
        resolve_under(root, name)


def test_send_file_answers_with_headers_only(root, settings):
    settings.OFFLOAD_FILES_ROOT = root
    response = send_file(root / "a.txt", filename="ü report.txt")
    assert response["X-Sendfile"] == os.path.realpath(root / "a.txt")
    assert response.content == b""
    assert response["Content-Disposition"].startswith("attachment;")
    assert response["Content-Type"] == "text/plain"


def test_send_file_refuses_paths_outside_the_files_root(root, settings):
    settings.OFFLOAD_FILES_ROOT = root / "sub"
    with pytest.raises(ValueError):
        send_file(root / "a.txt")


def test_inline_mode_streams_from_python(root, settings):
    settings.OFFLOAD_FILES_ROOT = root
    settings.OFFLOAD_INLINE = True
    response = send_file(root / "a.txt")
    assert "X-Sendfile" not in response
    assert b"".join(response.streaming_content) == b"A" * 100_000
    assert response["Content-Length"] == "100000"


def test_proxy_upstream_carries_the_target_in_one_header():
    response = proxy_upstream("http://127.0.0.1:8001/slow?delay=1")
    assert response["X-Offload-Upstream"] == "http://127.0.0.1:8001/slow?delay=1"
    assert response.content == b""
    for bad in (
        "https://example.com/",
        "ftp://x/",
        "/relative",
        "http://user:password@example.com/",
        "http://example.com:99999/",
        "http://example.com:http/",
        "http://exa mple.com/",
    ):
        with pytest.raises(ValueError):
            proxy_upstream(bad)


def test_proxy_upstream_escapes_what_a_request_target_may_not_contain():
    # (urllib.parse.urlsplit already removes tabs and line breaks)
    response = proxy_upstream('http://[::1]:8001/a b/\u00e9?q=x y&r=\t\r\n%41"<>')
    assert response["X-Offload-Upstream"] == "http://[::1]:8001/a%20b/%C3%A9?q=x%20y&r=%41%22%3C%3E"


# What uWSGI's `http` action sends the gate: the client's headers (httpized), then its own.
UWSGI_HEAD = (
    b"GET http://upstream.internal:8001/slow?delay=1 HTTP/1.0\r\n"
    b"Cookie: sessionid=abc; csrftoken=def\r\n"
    b"Authorization: Bearer client-secret\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"User-Agent: test\r\n"
    b"Range: bytes=10-\r\n"
    b"X-Api-Key: client-secret\r\n"
    b"Host: offload-gate\r\n"
    b"Connection: close\r\n"
    b"X-Forwarded-For: 6.6.6.6, 10.0.0.7\r\n\r\n"
)


def test_the_upstream_request_carries_only_allowed_headers_and_the_real_host():
    host, port, request = upstream_request(UWSGI_HEAD)
    assert (host, port) == ("upstream.internal", 8001)
    assert request == (
        b"GET /slow?delay=1 HTTP/1.0\r\n"
        b"Host: upstream.internal:8001\r\n"
        b"Accept-Encoding: gzip\r\n"
        b"User-Agent: test\r\n"
        b"Range: bytes=10-\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\n"  # the address uWSGI saw, not what the client claimed
        b"Connection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        (b"6.6.6.6, 10.0.0.7", b"10.0.0.7"),  # the peer is not a proxy of ours: its claim is ignored
        (b"6.6.6.6, 203.0.113.5, 127.0.0.1", b"203.0.113.5"),  # behind our balancer: the hop it added
        (b"203.0.113.5, 192.168.1.2, 127.0.0.1", b"192.168.1.2"),  # what the client wrote is never believed
        (b"127.0.0.1", b"127.0.0.1"),  # the balancer's own request
    ],
)
def test_behind_a_trusted_balancer_the_upstream_sees_the_client_not_the_balancer(forwarded_for, client):
    head = UWSGI_HEAD.replace(b"6.6.6.6, 10.0.0.7", forwarded_for)
    _host, _port, request = upstream_request(head, parse_networks(["127.0.0.1"]))
    assert b"\r\nX-Forwarded-For: " + client + b"\r\n" in request


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (UWSGI_HEAD.replace(b"GET ", b"POST ", 1), 405),
        (UWSGI_HEAD.replace(b"http://upstream.internal:8001", b"https://upstream.internal", 1), 502),
        (UWSGI_HEAD.replace(b"http://upstream.internal:8001", b"", 1), 502),
        (UWSGI_HEAD.replace(b"8001", b"99999", 1), 502),
        (UWSGI_HEAD.replace(b"delay=1", b"delay=\xff", 1), 502),
        (UWSGI_HEAD.replace(b"Cookie:", b" Cookie:", 1), 502),
        (b"GET\r\n\r\n", 502),
    ],
)
def test_the_gate_refuses_what_it_cannot_forward(head, status):
    with pytest.raises(GateError) as refused:
        upstream_request(head)
    assert refused.value.status == status


def test_the_upstream_response_loses_cookies_and_hop_by_hop_headers():
    status, head = filter_upstream_response(
        b"HTTP/1.1 206 Partial Content\r\n"
        b"Content-Type: text/html\r\n"
        b"Set-Cookie: sessionid=planted\r\n"
        b"set-cookie: other=1\r\n"
        b"Connection: keep-alive, X-Private\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"X-Private: hop\r\n"
        b"X-Frame-Options: ALLOWALL\r\n"
        b"Content-Security-Policy: default-src *\r\n"
        b"Content-Range: bytes 10-19/100\r\n"
        b"Content-Length: 10\r\n\r\n"
    )
    assert status == 206
    assert head == (
        b"HTTP/1.1 206 Partial Content\r\n"
        b"Content-Type: text/html\r\n"
        b"Content-Range: bytes 10-19/100\r\n"
        b"Content-Length: 10\r\n"
        + b"".join(f"{name}: {value}\r\n".encode() for name, value in UPSTREAM_SECURITY_HEADERS)
        + b"Connection: close\r\n\r\n"
    )


def test_transfer_encoding_wins_over_content_length():
    _, head = filter_upstream_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in head and b"Content-Length" not in head


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
    ],
)
def test_a_response_head_that_is_not_http_is_a_502(head):
    with pytest.raises(GateError) as refused:
        filter_upstream_response(head)
    assert refused.value.status == 502


def test_inline_mode_answers_502_for_a_dead_upstream_and_504_for_a_silent_one(settings, monkeypatch):
    settings.OFFLOAD_INLINE = True
    monkeypatch.setenv("OFFLOAD_UPSTREAM_TIMEOUT", "0.5")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    assert proxy_upstream(f"http://127.0.0.1:{dead_port}/").status_code == 502
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        started = time.monotonic()
        assert proxy_upstream(f"http://127.0.0.1:{silent.getsockname()[1]}/").status_code == 504
        assert time.monotonic() - started < 5
