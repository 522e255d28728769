"""offload.operator: a worker's figures for the operator page, and who may see them.

The hub, Redis and presence are real (a hub in this process, as tests/test_hub.py);
time, CPU and RSS are injected. The page on the real server, in Chromium:
tests/browser/test_operator.py.
"""

from __future__ import annotations

import json

import gevent
import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.test import RequestFactory, override_settings

import offload
from offload import metrics, operator
from offload.backend import redis_client
from offload.backend.hub import Hub
from offload.exceptions import PermissionDenied
from offload.policies import Identity, check_subscribe, reset_cache
from offload.testing import timeout_factor

CHANNEL = "offload-operator:workers"
PLAIN_STATIC = "django.contrib.staticfiles.storage.StaticFilesStorage"  # no collectstatic manifest here


class Recorder:
    def __init__(self):
        self.ready = []
        self.messages = []

    def channel_ready(self, channel):
        self.ready.append(channel)

    def channel_lost(self, channel):
        pass

    def deliver(self, channel, entries, frames):
        self.messages.extend(entries)

    def notice(self, channel, text):
        pass


def wait_until(predicate, timeout=5.0):
    deadline = gevent.get_hub().loop.now() + timeout * timeout_factor()
    while not predicate():
        assert gevent.get_hub().loop.now() < deadline, "condition not reached"
        gevent.sleep(0.01)


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def hub(redis_client, settings):
    settings.OFFLOAD_STATS_INTERVAL = 0
    hub = Hub(worker_id=3)
    wait_until(lambda: hub.connected)
    yield hub
    hub.close()


def test_process_figures():
    assert operator.process_figures(10.0, 10.5, 2.0, 1 << 20) == {"rss": 1 << 20, "cpu": 25.0}
    assert operator.process_figures(10.0, 10.0, 0.0, None) == {"rss": None, "cpu": None}


def test_a_sample_names_sockets_hot_channels_redis_and_drops(hub, settings):
    settings.OFFLOAD_OPERATOR_TOP_CHANNELS = 2
    clock, cpu = Clock(), Clock(5.0)
    sampler = operator.Sampler(hub, clock=clock, cpu=cpu, rss=lambda: 64 << 20)
    crowd = [Recorder() for _ in range(3)]
    for s in crowd:
        hub.subscribe(s, "room:crowded")  # a presence namespace of the demo
    busy, idle = Recorder(), Recorder()
    hub.subscribe(busy, "public:busy")
    hub.subscribe(idle, "public:idle")
    wait_until(lambda: all(s.ready for s in [*crowd, busy, idle]))
    for n in range(8):
        offload.publish("public:busy", n)
    wait_until(lambda: len(busy.messages) == 8)
    metrics.connection_closed("websocket", "rate_limit", 42)

    clock.now += 4.0
    cpu.now += 1.0
    figures = sampler.sample()
    assert figures["worker"] == 3 and figures["rss"] == 64 << 20 and figures["cpu"] == 25.0
    assert figures["subscriptions"] == 5 and figures["channels"] == 3
    assert set(figures["sockets"]) == {"websocket", "sse"}
    assert figures["redis"]["up"] and figures["redis"]["hub"] and figures["redis"]["ping_ms"] >= 0
    # the 2 with the most subscribers, and the 2 busiest (one of which is among them)
    assert figures["top"] == [
        {"channel": "room:crowded", "subscribers": 3, "rate": 0.0, "presence": 0},
        {"channel": "public:busy", "subscribers": 1, "rate": 2.0, "presence": None},
    ]
    assert figures["drops"][0] == {
        "ts": figures["drops"][0]["ts"],
        "transport": "websocket",
        "reason": "rate_limit",
        "user": 42,
    }
    json.dumps(figures)  # published as JSON

    clock.now += 2.0
    assert [row["rate"] for row in sampler.sample()["top"]] == [0.0, 0.0]  # rates are per interval


def test_a_sample_stays_small_with_many_long_channels_and_drops(hub, settings):
    settings.OFFLOAD_OPERATOR_TOP_CHANNELS = 10
    subscribers = []
    for n in range(60):
        s = Recorder()
        subscribers.append(s)
        hub.subscribe(s, "public:" + f"{n:03d}" * 42)  # 126-character names
    for n in range(60):
        metrics.connection_closed("sse", "slow_consumer", n)
    figures = operator.Sampler(hub, clock=Clock()).sample()
    assert len(figures["top"]) == 10 and len(figures["drops"]) == operator.DROPS
    assert len(json.dumps(figures)) < 8 * 1024


# -- who may see them ---------------------------------------------------------------------


def user(*, staff: bool, pk: int = 7) -> User:
    return User(pk=pk, username=f"user{pk}", is_staff=staff, is_active=True)


def get(path: str, who) -> object:
    request = RequestFactory().get(path)
    request.user = who
    view = operator.operator_page if path == "/operator/" else operator.operator_token
    return view(request)


def test_anonymous_users_are_sent_to_log_in_and_others_refused():
    response = get("/operator/", AnonymousUser())
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/?next=/operator/")
    with pytest.raises(DjangoPermissionDenied):
        get("/operator/", user(staff=False))
    for who in (AnonymousUser(), user(staff=False)):
        with pytest.raises(DjangoPermissionDenied):
            get("/operator/token", who)
    inactive = user(staff=True)
    inactive.is_active = False
    with pytest.raises(DjangoPermissionDenied):
        get("/operator/token", inactive)


def test_staff_get_the_page_and_a_token_for_themselves_only():
    with override_settings(STORAGES={**django_settings.STORAGES, "staticfiles": {"BACKEND": PLAIN_STATIC}}):
        page = get("/operator/", user(staff=True))
    assert page.status_code == 200 and page["Cache-Control"] == "no-store"
    assert b'id="operator-config"' in page.content and b"offload/operator.js" in page.content
    reply = get("/operator/token", user(staff=True))
    token = json.loads(reply.content)["token"]
    staff = Identity(7, "user7")
    check_subscribe(staff, CHANNEL, token=token)  # the staff user's own connection may subscribe
    with pytest.raises(PermissionDenied):
        check_subscribe(Identity(8, "user8"), CHANNEL, token=token)  # another user's may not
    with pytest.raises(PermissionDenied):
        check_subscribe(staff, CHANNEL)  # and nobody without a token


def test_the_project_may_declare_the_operator_namespace_itself(settings):
    declared = django_settings.OFFLOAD_NAMESPACES
    settings.OFFLOAD_NAMESPACES = {**declared, "offload-operator": {"subscribe": "group:ops"}}
    reset_cache()
    try:
        check_subscribe(Identity(1, "ops", frozenset({"ops"})), CHANNEL)
        with pytest.raises(PermissionDenied):
            check_subscribe(Identity(2, "x"), CHANNEL)
    finally:
        settings.OFFLOAD_NAMESPACES = declared
        reset_cache()


def test_with_redis_unreachable_a_sample_says_so_and_asks_no_presence(hub, settings):
    crowd = Recorder()
    hub.subscribe(crowd, "room:crowded")
    wait_until(lambda: crowd.ready)
    url = django_settings.OFFLOAD_REDIS_URL
    settings.OFFLOAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    redis_client.reset()
    try:
        figures = operator.Sampler(hub, clock=Clock()).sample()
    finally:
        settings.OFFLOAD_REDIS_URL = url
        redis_client.reset()
    assert figures["redis"]["up"] is False and figures["redis"]["ping_ms"] is None
    assert "127.0.0.1:1" in figures["redis"]["error"] or "refused" in figures["redis"]["error"]
    assert figures["top"] == [{"channel": "room:crowded", "subscribers": 1, "rate": 0.0, "presence": None}]
