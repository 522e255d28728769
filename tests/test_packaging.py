"""`python -m build` makes an sdist and a wheel holding what the library reads at run time, not the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from offload import __version__

ROOT = Path(__file__).resolve().parent.parent

#: Files of the package that are not Python modules; the library fails without them.
RUNTIME_FILES = (
    "offload/__init__.py",
    "offload/core/session.py",
    "offload/backend/lua/publish.lua",
    "offload/backend/lua/acquire_slot.lua",
    "offload/static/offload/offload.js",
    "offload/static/offload/operator.js",
    "offload/templates/offload/operator.html",
    "offload/testing/__init__.py",
    "offload/uwsgiconf/__main__.py",
    "offload/uwsgiconf/offload.ini",
    "offload/uwsgiconf/redis-embedded",
    # not in the repository: the test adds it, to prove that templates are picked up by a glob
    "offload/templates/offload/packaging-probe.html",
)
DEMO = ("app", "project", "tests", "bench", "bin", "docs", "uwsgi.ini", "manage.py", "Makefile", "requirements.txt")


def build(tmp_path: Path) -> tuple[Path, Path]:
    """Build both archives offline (``--no-isolation``: the pinned setuptools, no download)
    from a copy of what git tracks, plus a template: building in place would leave build/
    and egg-info in the work tree."""
    source = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    probe = source / "offload/templates/offload/packaging-probe.html"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("<p>{{ probe }}</p>\n")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("django_uwsgi_offload-*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("django_uwsgi_offload-*-py3-none-any.whl")
    return sdist, wheel


def test_the_sdist_and_the_wheel_hold_the_library_its_files_and_not_the_demo(tmp_path):
    sdist, wheel = build(tmp_path)
    wheel_names = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as archive:
        # django_uwsgi_offload-0.4.0/offload/... -> offload/...
        sdist_names = {name.partition("/")[2] for name in archive.getnames()}
    for names, archive_name in ((wheel_names, wheel.name), (sdist_names, sdist.name)):
        for needed in RUNTIME_FILES:
            assert needed in names, f"{needed} missing from {archive_name}"
        leaked = sorted(n for n in names if n.split("/")[0] in DEMO)
        assert not leaked, f"the demo leaked into {archive_name}: {leaked[:5]}"
    assert "pyproject.toml" in sdist_names
    # the version comes from offload.__version__, the one the uWSGI options carry
    assert wheel.name.startswith(f"django_uwsgi_offload-{__version__}-")
