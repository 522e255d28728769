"""Path checks and the inline fallback of offload.transfers (no uWSGI needed)."""

import os

import pytest
from django.http import Http404

from offload.transfers import proxy_upstream, resolve_under, send_file


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


def test_proxy_upstream_carries_the_target_in_headers():
    response = proxy_upstream("http://127.0.0.1:8001/slow?delay=1")
    assert response["X-Offload-Upstream"] == "127.0.0.1:8001"
    assert response["X-Offload-Upstream-Path"] == "/slow?delay=1"
    for bad in ("https://example.com/", "ftp://x/", "/relative"):
        with pytest.raises(ValueError):
            proxy_upstream(bad)
