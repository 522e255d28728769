"""The WSGI application tunes the garbage collector (a fresh interpreter each:
the settings are process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
PROBE = "import gc, json, project.wsgi; print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))"
TREE_PROBE = "import gevent, project.wsgi; print(gevent.spawn(int).spawning_stack is None)"


def load_application(**env: str) -> tuple[list[int], int]:
    run_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=PROJECT, env=run_env, capture_output=True, text=True, check=True
    )
    threshold, frozen = json.loads(out.stdout.strip().splitlines()[-1])
    return threshold, frozen


@pytest.mark.parametrize(
    ("env", "young"),
    [({}, 10_000), ({"OFFLOAD_GC_THRESHOLD": "50000"}, 50_000)],
)
def test_loading_the_application_raises_the_young_threshold_and_freezes_start_up_objects(env, young):
    threshold, frozen = load_application(**env)
    assert threshold[0] == young
    assert frozen > 10_000, "Django and the project should be frozen (never scanned again)"


def test_zero_keeps_pythons_collector_as_it_is():
    threshold, frozen = load_application(OFFLOAD_GC_THRESHOLD="0")
    assert threshold[0] == 700 and frozen == 0


def test_greenlets_of_the_application_keep_no_spawning_stack():
    """gevent's default records every greenlet's spawner and ten stack frames; the application turns it off."""
    run_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    out = subprocess.run(
        [sys.executable, "-c", TREE_PROBE], cwd=PROJECT, env=run_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "True"
