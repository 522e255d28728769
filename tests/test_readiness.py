"""/readyz: 200 only when the worker is not draining, Redis answers and the hub is subscribed.

The same view on real instances behind HAProxy: tests/integration/test_load_balancer.py.
"""

from __future__ import annotations

import json
import os
import time

import gevent
import pytest
from django.test import RequestFactory

from offload import views, worker
from offload.backend import redis_client


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.01)


@pytest.fixture
def ready_worker(redis_client, settings):
    """This process as a worker whose hub is connected (and no drain file)."""
    settings.OFFLOAD_STATS_INTERVAL = 0
    hub = worker.hub(0)
    wait_until(lambda: hub.connected)
    yield hub


def readyz() -> tuple[int, dict]:
    response = views.readyz(RequestFactory().get("/readyz"))
    return response.status_code, json.loads(response.content)


def test_ready_when_redis_answers_and_the_hub_is_subscribed(ready_worker):
    assert readyz() == (200, {"status": "ready"})


def test_a_drain_file_touched_after_the_worker_started_drains_it(ready_worker, settings, tmp_path):
    drain = tmp_path / "drain"
    settings.OFFLOAD_DRAIN_FILE = str(drain)
    assert readyz()[0] == 200  # no file yet
    drain.touch()
    status, body = readyz()
    assert status == 503 and body["status"] == "unready" and body["reason"].startswith("draining"), body
    # A file older than the running code (left from the previous drain) does not drain it.
    os.utime(drain, (worker._loaded_at - 60, worker._loaded_at - 60))
    assert readyz()[0] == 200


def test_unready_when_redis_does_not_answer(ready_worker, settings):
    from django.conf import settings as django_settings

    url = django_settings.OFFLOAD_REDIS_URL
    settings.OFFLOAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    redis_client.reset()
    try:
        status, body = readyz()
    finally:
        settings.OFFLOAD_REDIS_URL = url
        redis_client.reset()
    assert status == 503 and body["reason"].startswith("redis:"), body


def test_healthz_says_ok_and_whether_redis_answers(ready_worker, settings):
    """/healthz (liveness, docs/deployment.md): 200 ok, or 503 degraded with the reason while Redis does not answer."""
    from django.conf import settings as django_settings

    response = views.healthz(RequestFactory().get("/healthz"))
    assert (response.status_code, json.loads(response.content)) == (200, {"status": "ok", "redis": "up"})
    url = django_settings.OFFLOAD_REDIS_URL
    settings.OFFLOAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    redis_client.reset()
    try:
        response = views.healthz(RequestFactory().get("/healthz"))
    finally:
        settings.OFFLOAD_REDIS_URL = url
        redis_client.reset()
    body = json.loads(response.content)
    assert response.status_code == 503 and body["status"] == "degraded" and body["redis"] == "down", body
    assert body["reason"].startswith("redis:"), body
