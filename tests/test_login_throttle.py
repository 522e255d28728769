"""The login throttle's counting (app.forms.LoginThrottle) against a real Redis, with a fake clock."""

from __future__ import annotations

import logging

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.forms import LoginThrottle

WINDOW = 900.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def throttle(redis_client, clock):
    return LoginThrottle(per_account=5, per_ip=20, window=WINDOW, clock=clock, client=redis_client)


def fail(throttle, clock, username, ip="10.0.0.1", times=1, step=1.0):
    for _ in range(times):
        throttle.record_failure(username, ip)
        clock.now += step


def test_an_account_is_refused_after_its_limit_until_the_oldest_failure_leaves_the_window(throttle, clock):
    first = clock.now
    fail(throttle, clock, "alice", times=4)
    assert throttle.retry_after("alice", "10.0.0.1") == 0
    fail(throttle, clock, "alice")  # the 5th
    assert throttle.retry_after("alice", "10.0.0.1") == pytest.approx(first + WINDOW - clock.now)
    assert throttle.retry_after("alice", "10.0.0.2") > 0  # per account, whatever the address
    assert throttle.retry_after("bob", "10.0.0.1") == 0  # other accounts are not touched
    clock.now = first + WINDOW + 0.5  # the first failure left the window: one more try
    assert throttle.retry_after("alice", "10.0.0.1") == 0
    fail(throttle, clock, "alice", step=0)
    assert throttle.retry_after("alice", "10.0.0.1") > 0


def test_usernames_share_a_budget_whatever_their_case(throttle, clock):
    fail(throttle, clock, "Alice", times=3)
    fail(throttle, clock, "ALICE", times=2)
    assert throttle.retry_after("alice", "10.0.0.9") > 0


def test_a_success_clears_the_account_but_not_the_address(throttle, clock):
    fail(throttle, clock, "alice", times=4)
    for n in range(16):
        fail(throttle, clock, f"user{n}")
    throttle.record_success("alice")
    fail(throttle, clock, "alice", times=4)
    assert throttle.retry_after("alice", "10.0.0.2") == 0  # 4 since the success
    assert throttle.retry_after("carol", "10.0.0.1") > 0  # 4 + 16 + 4 = 24 from this address


def test_one_address_is_refused_after_its_limit_across_accounts(throttle, clock):
    for n in range(19):
        fail(throttle, clock, f"guess{n}")
    assert throttle.retry_after("alice", "10.0.0.1") == 0
    fail(throttle, clock, "guess19")
    assert throttle.retry_after("alice", "10.0.0.1") > 0
    assert throttle.retry_after(None, "10.0.0.1") > 0  # no username typed: the address still counts
    assert throttle.retry_after("alice", "10.0.0.2") == 0


def test_the_stored_failures_stay_bounded_and_expire(throttle, clock, redis_client):
    fail(throttle, clock, "alice", times=50)
    keys = redis_client.keys("*login-failures*")
    assert len(keys) == 2
    for key in keys:
        assert redis_client.zcard(key) <= 20
        assert 0 < redis_client.ttl(key) <= WINDOW


def test_redis_down_means_no_throttle_and_a_log_line(clock, caplog):
    dead = redis.Redis(unix_socket_path="/nonexistent/redis.sock", socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    throttle = LoginThrottle(per_account=1, per_ip=1, window=WINDOW, clock=clock, client=dead)
    with caplog.at_level(logging.WARNING, logger="app.forms"):
        throttle.record_failure("alice", "10.0.0.1")
        assert throttle.retry_after("alice", "10.0.0.1") == 0
        throttle.record_success("alice")
    assert "login throttle off: Redis unavailable" in caplog.text
