"""Test setup: a real redis-server for the unit-level Redis tests, Django configured.

Integration tests (tests/integration, tests/browser) start the real uWSGI from
uwsgi.ini through the fixtures of offload.testing; the demo's users are created
first (tests/integration/demo.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["offload.testing"]

_redis = None


def pytest_configure(config):
    global _redis
    from offload.testing import RedisServer

    var_dir = Path(tempfile.mkdtemp(prefix="offload-unit-"))
    _redis = RedisServer(var_dir / "redis").start()
    os.environ["OFFLOAD_VAR_DIR"] = str(var_dir)
    os.environ["REDIS_URL"] = _redis.url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()


def pytest_unconfigure(config):
    if _redis is not None:
        _redis.stop()


@pytest.fixture(scope="session")
def offload_server_options():
    """offload.testing's ``offload_server`` is the demo, with its users (alice, bob, carol / demo)."""
    from tests.integration.demo import DEMO_OPTIONS

    return DEMO_OPTIONS


@pytest.fixture(scope="session")
def redis_server():
    """The session's private redis-server (unix socket)."""
    assert _redis is not None
    return _redis


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


_MISSING = object()


class _SettingsOverride:
    """Set Django settings for one test; the fixture restores them."""

    def __init__(self) -> None:
        object.__setattr__(self, "_saved", {})

    def __setattr__(self, name, value):
        from django.conf import settings

        from offload import conf

        self._saved.setdefault(name, getattr(settings, name, _MISSING))
        setattr(settings, name, value)
        conf.reset()

    def restore(self) -> None:
        from django.conf import settings

        for name, value in self._saved.items():
            if value is _MISSING:
                delattr(settings, name)
            else:
                setattr(settings, name, value)
        from offload import conf

        conf.reset()


@pytest.fixture
def settings():
    override = _SettingsOverride()
    yield override
    override.restore()
