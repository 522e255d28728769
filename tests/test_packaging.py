"""The library builds into a wheel that carries what it reads at run time, and nothing of the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_library_its_lua_and_its_client_and_not_the_demo(tmp_path):
    source = tmp_path / "src"
    # A copy of what git tracks: building in place would leave build/ and egg-info in the work tree.
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("django_uwsgi_offload-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "offload/__init__.py",
        "offload/core/session.py",
        "offload/backend/lua/publish.lua",
        "offload/backend/lua/acquire_slot.lua",
        "offload/static/offload/offload.js",
        "offload/testing/__init__.py",
    ):
        assert needed in names, f"{needed} missing from {wheel.name}"
    assert not [n for n in names if n.split("/")[0] in ("app", "project", "tests", "bench")], "the demo leaked in"
