"""Limits: the token bucket (fake clock) and per-IP connection slots (real Redis)."""

from offload.limits import ConnectionSlots, TokenBucket


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.1  # one token back
    assert bucket.allow() and not bucket.allow()
    now[0] += 100  # never more than the burst
    assert sum(bucket.allow() for _ in range(10)) == 5


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
    from offload import redis_client

    settings.OFFLOAD_REDIS_URL = f"unix://{tmp_path}/none.sock"
    redis_client.reset()
    try:
        assert ConnectionSlots("10.0.0.4", limit=0, stale_after=60).acquire()
    finally:
        redis_client.reset()
