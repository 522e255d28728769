"""offload.backend.presence against a real redis-server, with an injected clock."""

from __future__ import annotations

import json

import pytest

from offload.backend import presence_store as presence
from offload.backend.presence_store import presence_keys
from offload.backend.redis_client import pubsub_channel
from offload.policies import reset_cache

CH = "room:lobby"
TTL = 30.0  # lease ttl (s)
GRACE = 5.0


def info(name: str) -> str:
    return json.dumps({"name": name})


def join(lease, *names, now):
    return presence.join(CH, lease, [(n, info(n)) for n in names], lease_ttl=TTL, grace=GRACE, now=now)


def leave(lease, *names, now, grace=GRACE):
    return presence.leave(CH, lease, names, lease_ttl=TTL, grace=grace, now=now)


def sweep(lease=None, *, now, budget=1000):
    return presence.sweep(CH, lease, lease_ttl=TTL, grace=GRACE, budget=budget, now=now)


def test_the_first_hold_is_a_join_and_tabs_on_other_workers_are_one_member(redis_client):
    assert join("w1", "u1", "u2", now=100) == ["u1", "u2"]
    assert join("w2", "u1", now=100) == []  # u1's second tab, on another worker
    assert join("w1", "u1", now=100) == []  # the same lease again: idempotent
    assert presence.count(CH) == 2
    assert leave("w1", "u1", now=101) == []  # w2 still holds u1: no grace, no leave
    assert sweep(now=200).left == []
    assert presence.count(CH) == 2


def test_the_last_release_starts_a_grace_period_and_a_return_within_it_is_silent(redis_client):
    join("w1", "u1", now=100)
    leave("w1", "u1", now=101)
    assert presence.count(CH) == 1  # still a member during its grace period
    assert sweep(now=105.9).left == []
    assert join("w2", "u1", now=105.9) == []  # reconnected on another worker in time: no join
    result = sweep(now=107)
    assert result.left == []
    assert presence.count(CH) == 1


def test_a_grace_period_that_ends_is_exactly_one_leave(redis_client):
    join("w1", "u1", now=100)
    leave("w1", "u1", now=101)
    early = sweep(now=102)
    assert early.left == [] and early.next_in == pytest.approx(4)
    assert sweep(now=106).left == ["u1"]
    assert sweep(now=106).left == []  # a second sweeper finds nothing to report
    assert presence.count(CH) == 0
    assert join("w1", "u1", now=107) == ["u1"]  # back after leaving: a join again


def test_grace_zero_leaves_at_once(redis_client):
    join("w1", "u1", now=100)
    assert leave("w1", "u1", now=101, grace=0) == ["u1"]
    assert presence.count(CH) == 0


def test_a_lease_that_is_not_renewed_releases_its_members(redis_client):
    """A SIGKILLed worker renews nothing: its members leave after ttl + grace."""
    join("dead", "u1", "u2", now=100)
    join("live", "u2", now=100)
    for now in (110, 120):
        assert sweep("live", now=now).renewed
    assert sweep("live", now=129).left == []  # dead's lease expires at 130
    swept = sweep("live", now=131)
    assert swept.left == [] and swept.next_in == pytest.approx(5)  # u1 in grace (u2 is held by live)
    assert sweep("live", now=136).left == ["u1"]
    assert presence.count(CH) == 1
    assert not sweep("dead", now=137).renewed  # the dead lease is gone: its worker must join again


def test_renewing_keeps_members_and_the_next_due_is_the_earliest_lease(redis_client):
    join("w1", "u1", now=100)
    join("w2", "u2", now=110)
    assert sweep("w1", now=120).next_in == pytest.approx(20)  # w2 expires at 140, w1 now at 150
    assert presence.count(CH) == 2


def _sweep_all(now):
    """Sweep until no work is due now; the members that left, and the number of calls."""
    left, calls = [], 0
    while True:
        result = sweep(now=now, budget=20)
        left += result.left
        calls += 1
        if not result.more:
            return left, calls


def test_a_sweep_stops_at_its_budget_and_says_more_is_due(redis_client):
    names = [f"u{n:03}" for n in range(50)]
    join("dead", *names, now=100)
    assert _sweep_all(131) == ([], 3)  # 50 released into their grace period, 20 per call
    assert presence.count(CH) == 50
    left, calls = _sweep_all(137)
    assert sorted(left) == names and calls == 3
    assert presence.count(CH) == 0


def test_redis_clock_is_the_default(redis_client):
    assert presence.join(CH, "w1", [("u1", info("u1"))], lease_ttl=TTL, grace=GRACE) == ["u1"]
    assert presence.sweep(CH, "w1", lease_ttl=TTL, grace=GRACE).renewed
    assert presence.leave(CH, "w1", ["u1"], lease_ttl=TTL, grace=0) == ["u1"]


def test_members_are_paginated_in_name_order_with_their_info_and_count(redis_client):
    names = [f"u{n:02}" for n in range(25)]
    join("w1", *names, now=100)
    seen, after = [], None
    while True:
        page = presence.members(CH, after=after, limit=10)
        assert page.count == 25
        seen += page.members
        after = page.next
        if after is None:
            break
    assert [name for name, _ in seen] == names
    assert seen[3][1] == {"name": "u03"}
    assert presence.members(CH, limit=25).next is None


def test_every_key_of_a_channel_shares_one_hash_tag_and_expires(redis_client):
    join("w1", "u1", now=100)
    keys = presence_keys(CH)
    assert {key.split("{")[1].split("}")[0] for key in keys} == {CH}
    ttl = redis_client.pttl(keys[0])
    assert 0 < ttl <= (TTL + GRACE + 60) * 1000


def test_a_query_releases_what_dead_workers_held_and_announces_it(redis_client, settings):
    """No live worker sweeps a channel whose holders all died: the public queries do."""
    settings.OFFLOAD_NAMESPACES = {"room": {"subscribe": "public", "presence": True}}
    settings.OFFLOAD_PRESENCE_GRACE = 0.0
    settings.OFFLOAD_PRESENCE_LEASE_TTL = TTL
    reset_cache()
    try:
        seconds, micros = redis_client.time()
        long_ago = seconds + micros / 1e6 - 100  # the lease expired 70 s ago by Redis' clock
        pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(pubsub_channel(CH))
        pubsub.get_message(timeout=1)
        presence.join(CH, "dead", [("u1", info("u1"))], lease_ttl=TTL, grace=0, now=long_ago)
        assert presence.count(CH) == 1
        assert presence.presence_count(CH) == 0
        message = pubsub.get_message(timeout=2)
        assert message["data"] == b'p {"type":"presence","channel":"room:lobby","count":0,"joins":[],"leaves":["u1"]}'
        assert presence.presence(CH).members == []
        pubsub.close()
    finally:
        reset_cache()
