"""Limits: the token bucket (fake clock) and per-IP connection slots (real Redis)."""

import gevent

from offload.backend.slots import _GATHER, ConnectionSlots, _SlotBroker
from offload.core.rates import Cooldowns, TokenBucket


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.1  # one token back
    assert bucket.allow() and not bucket.allow()
    now[0] += 100  # never more than the burst
    assert sum(bucket.allow() for _ in range(10)) == 5


def test_a_cooldown_refuses_an_address_for_its_seconds_only():
    now = [0.0]
    cooldowns = Cooldowns(clock=lambda: now[0])
    cooldowns.penalise("10.0.0.9", 5)
    cooldowns.penalise("10.0.0.8", 0)  # 0: no cooldown
    assert cooldowns.remaining("10.0.0.9") == 5 and cooldowns.remaining("10.0.0.8") == 0
    now[0] += 4.5
    assert cooldowns.remaining("10.0.0.9") == 0.5
    now[0] += 0.5
    assert cooldowns.remaining("10.0.0.9") == 0


def test_cooldowns_forget_the_oldest_addresses_beyond_their_bound():
    cooldowns = Cooldowns(clock=lambda: 0.0)
    for n in range(Cooldowns._MAX + 1):
        cooldowns.penalise(f"a{n}", 10)
    assert cooldowns.remaining("a0") == 0, "the oldest was forgotten"
    assert cooldowns.remaining(f"a{Cooldowns._MAX}") == 10


def test_connection_slots_cap_an_ip_and_free_on_release(redis_client):
    slots = [ConnectionSlots("10.0.0.1", limit=3, stale_after=60) for _ in range(4)]
    assert [s.acquire() for s in slots] == [True, True, True, False]
    assert ConnectionSlots("10.0.0.2", limit=3, stale_after=60).acquire()  # other IPs unaffected
    slots[0].release()
    assert slots[3].acquire()


def test_slots_of_a_dead_worker_stop_counting(redis_client):
    dead = ConnectionSlots("10.0.0.3", limit=1, stale_after=0.2)
    assert dead.acquire()
    fresh = ConnectionSlots("10.0.0.3", limit=1, stale_after=0.2)
    assert not fresh.acquire()
    import time

    time.sleep(0.3)  # no heartbeat from the dead socket's worker
    assert fresh.acquire()


def test_slots_fail_open_when_redis_is_down(settings, tmp_path):
    from offload.backend import redis_client

    settings.OFFLOAD_REDIS_URL = f"unix://{tmp_path}/none.sock"
    redis_client.reset()
    try:
        assert ConnectionSlots("10.0.0.4", limit=0, stale_after=60).acquire()
    finally:
        redis_client.reset()


def test_a_storm_of_acquires_is_one_script_call_per_ip_in_order(redis_client):
    """Sockets that ask together share one round trip, folded per IP: the
    first ``limit`` of an IP get a slot, the rest are refused, and another
    IP in the same batch is counted on its own."""
    import gevent

    first = [ConnectionSlots("10.0.1.1", limit=5, stale_after=60) for _ in range(20)]
    second = [ConnectionSlots("10.0.1.2", limit=50, stale_after=60) for _ in range(10)]
    redis_client.config_resetstat()
    jobs = [gevent.spawn(s.acquire) for s in first + second]
    gevent.joinall(jobs, raise_error=True)
    assert [job.value for job in jobs] == [True] * 5 + [False] * 15 + [True] * 10
    assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == 2
    assert redis_client.zcard("offload:ip:10.0.1.1") == 5

    # Releases and heartbeats of one batch fold too, and a slot given back in
    # the batch is free for an acquire in it, even one asked for before.
    late = ConnectionSlots("10.0.1.1", limit=5, stale_after=60)
    held = first[:5]
    jobs = [gevent.spawn(late.acquire)]  # asked before the releases below, in the same batch
    jobs += [gevent.spawn(s.release) for s in held[:2]] + [gevent.spawn(s.refresh) for s in held[2:]]
    gevent.joinall(jobs, raise_error=True)
    assert jobs[0].value is True
    assert redis_client.zcard("offload:ip:10.0.1.1") == 4


def test_a_busy_broker_gathers_acquires_and_a_lone_one_goes_at_once():
    """uWSGI accepts one connection per loop turn, so a storm's acquires arrive one by one: a broker that sent
    less than ``_GATHER`` ago waits that long and sends what arrived meanwhile in one round trip; an acquire
    after a quiet moment is sent without waiting (clock and sleep injected, the round trips recorded)."""
    now = [100.0]
    slept: list[float] = []
    arrivals: list[ConnectionSlots] = []
    broker = _SlotBroker(clock=lambda: now[0], sleep=lambda seconds: (slept.append(seconds), arrive()))
    batches: list[list[str]] = []

    def send(batch: list) -> list[bool]:
        batches.append([slots.member for _, slots, _ in batch])
        now[0] += 0.0003  # a round trip, during which the next socket asks
        if len(batches) == 1:
            broker._push("acquire", arrivals.pop(0), None)
        return [True] * len(batch)

    def arrive() -> None:  # the rest of the storm comes in while the broker waits
        while arrivals:
            broker._push("acquire", arrivals.pop(0), None)

    broker._send = send
    storm = [ConnectionSlots("10.0.2.1", limit=100, stale_after=60) for _ in range(6)]
    arrivals.extend(storm[1:])
    broker._push("acquire", storm[0], None)
    gevent.sleep(0)  # the flush greenlet runs
    assert batches == [[storm[0].member], [s.member for s in storm[1:]]]
    assert slept == [_GATHER]  # the first batch went at once, the second gathered

    now[0] += 1.0  # a quiet second later
    lone = ConnectionSlots("10.0.2.1", limit=100, stale_after=60)
    broker._push("acquire", lone, None)
    gevent.sleep(0)
    assert batches[-1] == [lone.member] and slept == [_GATHER]
