"""The library's uWSGI options in a real uWSGI: how a project's uwsgi.ini sets them, and the
refusal to start without them (uWSGI itself only warns when the include command fails)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offload import __version__
from offload.testing import free_port, timeout_factor
from offload.uwsgiconf import INCLUDE_LINE

ROOT = Path(__file__).resolve().parent.parent.parent
UWSGI = str(Path(sys.executable).parent / "uwsgi")
#: How this repository's uwsgi.ini includes the options (the demo is not installed).
INCLUDE = f"ini = exec://cd {ROOT} && {sys.executable} -m offload.uwsgiconf %d"


def write_ini(directory: Path, *lines: str) -> Path:
    ini = directory / "uwsgi.ini"
    ini.write_text("\n".join(["[uwsgi]", *lines, ""]))
    return ini


def environment(var_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CORES", "REDIS_URL", "OFFLOAD_VAR_DIR", "PORT")}
    return {**env, "OFFLOAD_VAR_DIR": str(var_dir), **extra}


def uwsgi_get(ini: Path, option: str, **env: str) -> str:
    """The value uWSGI resolves for ``option`` (``--get`` expands placeholders and exits)."""
    result = subprocess.run(
        [UWSGI, "--ini", str(ini), "--get", option],
        cwd=ini.parent,
        env=environment(ini.parent / "var", **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("project_line", "env", "expected"),
    [
        ("", {}, "2000"),  # the default
        ("", {"CORES": "9"}, "9"),  # the environment
        ("set-placeholder = offload_cores=7", {"CORES": "9"}, "7"),  # the project's uwsgi.ini, before the include
    ],
)
def test_a_placeholder_comes_from_the_project_then_the_environment_then_the_default(
    tmp_path, project_line, env, expected
):
    ini = write_ini(tmp_path, project_line, INCLUDE)
    assert uwsgi_get(ini, "gevent", **env) == expected


def test_the_project_lines_read_the_address_and_workers_from_the_options(tmp_path):
    ini = write_ini(
        tmp_path, "http-socket = %(offload_host):%(offload_port)", "processes = %(offload_workers)", INCLUDE
    )
    assert uwsgi_get(ini, "http-socket") == "127.0.0.1:8000"
    assert uwsgi_get(ini, "http-socket", PORT="8123", HOST="127.0.0.2") == "127.0.0.2:8123"
    assert uwsgi_get(ini, "processes", WORKERS="3") == "3"
    assert uwsgi_get(ini, "stats") == f"{tmp_path}/var/stats.sock"


def run_until_exit(ini: Path) -> tuple[int, str]:
    """Start uWSGI on the demo project with ``ini``; it must exit by itself."""
    var = ini.parent / "var"
    proc = subprocess.run(
        [UWSGI, "--ini", str(ini)],
        cwd=ini.parent,
        env=environment(var, PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=60 * timeout_factor(),
    )
    return proc.returncode, proc.stdout + proc.stderr


def demo_project(*lines: str) -> list[str]:
    return [
        f"chdir = {ROOT}",
        "module = project.wsgi:application",
        "env = DJANGO_SETTINGS_MODULE=project.settings",
        "http-socket = 127.0.0.1:$(PORT)",
        "master = true",
        *lines,
    ]


@pytest.mark.parametrize(
    "include",
    [
        pytest.param(None, id="no include line"),
        # uWSGI only warns ("Permission denied", "not found") and goes on without the options
        pytest.param("ini = exec://%d.venv/bin/python -m offload.uwsgiconf %d", id="a command that fails"),
    ],
)
def test_without_the_options_uwsgi_refuses_to_start_and_names_the_line_to_add(tmp_path, include):
    code, log = run_until_exit(write_ini(tmp_path, *demo_project(*([include] if include else []))))
    assert code != 0, log[-2000:]
    assert "uWSGI runs without the library's options" in log, log[-2000:]
    assert INCLUDE_LINE in log


def test_options_of_another_installation_refuse_to_start_and_leave_no_process(tmp_path):
    """The include runs another installation's python (here: a copy of the library at 0.0.1)."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "offload", other / "offload", ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "offload/__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', '__version__ = "0.0.1"'))
    ini = write_ini(tmp_path, *demo_project(f"ini = exec://cd {other} && {sys.executable} -m offload.uwsgiconf %d"))
    code, log = run_until_exit(ini)
    assert code != 0, log[-2000:]
    assert f"configured by offload 0.0.1 but the application imports offload {__version__}" in log, log[-2000:]
    # the app loads before the master starts its daemons: no Redis, no gate was left behind
    assert not (tmp_path / "var/redis.pid").exists()
    assert not (tmp_path / "var/upstream.pid").exists()
