"""offload.core.presence: holdings, coalescing and the sweep schedule, with time driven by hand."""

from __future__ import annotations

from offload.core.presence import Change, Coalescer, Holdings, Schedule


def test_only_a_members_first_and_last_connection_on_a_worker_go_to_redis():
    held = Holdings()
    assert held.add("room:a", "u1") is True
    assert held.add("room:a", "u1") is False  # a second tab
    assert held.add("room:b", "u1") is True
    assert held.remove("room:a", "u1") is False
    assert held.remove("room:a", "u1") is True
    assert held.remove("room:a", "u1") is False  # never held: nothing to leave
    assert "room:a" not in held and held.channels() == ["room:b"]
    assert held.members("room:b") == ["u1"]


def test_changes_wait_for_their_window_and_cancel_out():
    co = Coalescer(window=0.5, max_listed=10)
    co.add("room:a", {"u1": {"id": "u1"}, "u2": {"id": "u2"}}, [], now=10.0)
    co.add("room:a", {}, ["u2", "u3"], now=10.2)  # u2 came and went; u3 was there before
    co.add("room:a", {"u3": {"id": "u3"}}, [], now=10.3)  # ...and u3 is back
    assert co.next_deadline() == 10.5
    assert co.due(10.49) == []
    assert co.due(10.5) == [Change("room:a", joins=[{"id": "u1"}], leaves=[])]
    assert co.next_deadline() is None


def test_a_window_that_nets_to_nothing_sends_nothing():
    co = Coalescer(window=0.5, max_listed=10)
    co.add("room:a", {}, ["u1"], now=1.0)
    co.add("room:a", {"u1": {}}, [], now=1.1)
    assert co.due(2.0) == []


def test_a_storm_becomes_one_reset_per_window():
    co = Coalescer(window=0.5, max_listed=100)
    co.add("room:a", {f"u{n}": n for n in range(5000)}, [], now=1.0)
    co.add("room:b", {"x": "x's info"}, [], now=1.2)
    assert co.due(1.5) == [Change("room:a", reset=True)]
    assert co.due(1.7) == [Change("room:b", joins=["x's info"])]


def test_a_join_event_carries_the_info_the_member_joined_with():
    co = Coalescer(window=0.5, max_listed=10)
    co.add("room:a", {"u1": {"name": "old"}}, [], now=1.0)
    co.add("room:a", {}, ["u1"], now=1.1)
    co.add("room:a", {"u1": {"name": "new"}}, [], now=1.2)
    assert co.due(2.0) == [Change("room:a", joins=[{"name": "new"}])]


def test_the_schedule_keeps_the_earliest_time_and_replaces_on_request():
    plan = Schedule()
    plan.at("a", 10)
    plan.at("a", 12)  # later: the earlier time stays
    plan.at("b", 5)
    assert plan.next_deadline() == 5
    assert plan.due(5) == ["b"]
    plan.replace("a", 20)
    assert plan.due(15) == []
    assert plan.next_deadline() == 20
    assert plan.due(20) == ["a"]
    plan.at("c", 1)
    plan.replace("c", None)
    assert plan.due(100) == [] and plan.next_deadline() is None
