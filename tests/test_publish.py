"""offload.publish and history against a real redis-server."""

import json
import time

import pytest

import offload
from offload.backend import redis_client as client_module
from offload.backend.history import read_after, read_tip
from offload.backend.redis_client import history_key
from offload.core.protocol import parse_stream_id


def test_publish_returns_increasing_ids_and_stores_history(redis_client):
    ids = [offload.publish("public:t", {"n": n}) for n in range(5)]
    assert [parse_stream_id(i) for i in ids] == sorted(parse_stream_id(i) for i in ids)
    entries, recovered = read_after("public:t", parse_stream_id(ids[1]), 100)
    assert recovered
    assert [(mid, json.loads(data)) for mid, data in entries] == [(ids[n], {"n": n}) for n in (2, 3, 4)]
    assert read_tip("public:t") == parse_stream_id(ids[-1])


def test_publish_is_delivered_with_its_id_on_pubsub(redis_client):
    pubsub = redis_client.pubsub()
    pubsub.subscribe(redis_client_channel := "offload:c:{public:live}")
    pubsub.get_message(timeout=1)
    message_id = offload.publish("public:live", ["é", 1])
    message = pubsub.get_message(timeout=2)
    assert message["channel"].decode() == redis_client_channel
    assert message["data"].decode() == f'{message_id} ["é",1]'


def test_history_is_capped_and_expires(redis_client):
    for n in range(105):
        offload.publish("public:cap", n)
    assert redis_client.xlen(history_key("public:cap")) == 100  # public: history_size 100
    assert 3500 < redis_client.ttl(history_key("public:cap")) <= 3600


def test_resume_from_a_trimmed_id_is_reported_unrecoverable(redis_client):
    first = offload.publish("public:gone", 0)
    for n in range(1, 101):
        offload.publish("public:gone", n)
    entries, recovered = read_after("public:gone", parse_stream_id(first), 100)
    assert not recovered and len(entries) == 100
    assert read_after("public:nothing", (1, 0), 100) == ([], False)


#: ``(channel, data, error, code)`` that publish refuses (tests/test_publish_on_commit.py too).
BAD_INPUT = [
    ("nocolon", 1, offload.ChannelError, "invalid_channel"),
    ("secret:x", 1, offload.ChannelError, "unknown_namespace"),
    ("public:x", object(), offload.ProtocolError, "bad_message"),
    ("public:x", "x" * (64 * 1024), offload.LimitExceeded, "message_too_large"),
]


@pytest.mark.parametrize("channel, data, error, code", BAD_INPUT)
def test_bad_input_is_refused_with_a_clear_error_and_publishes_nothing(redis_client, channel, data, error, code):
    with pytest.raises(error) as info:
        offload.publish(channel, data)
    assert info.value.code == code
    assert redis_client.keys("offload:h:*") == []


def test_redis_down_fails_fast_with_backend_unavailable(settings, tmp_path):
    settings.OFFLOAD_REDIS_URL = f"unix://{tmp_path}/nothing.sock"
    client_module.reset()
    try:
        started = time.monotonic()
        with pytest.raises(offload.BackendUnavailable):
            offload.publish("public:x", 1)
        assert time.monotonic() - started < 2
    finally:
        client_module.reset()


def test_a_retried_publish_call_is_not_published_twice(redis_client):
    """redis-py retries the script once after a timeout: the call's token makes that harmless."""
    from offload.backend.redis_client import pubsub_channel, script

    args = dict(
        keys=[history_key("public:retry"), "offload:pub:{public:retry}:same-call"],
        args=[pubsub_channel("public:retry"), '"x"', 100, 3600],
    )
    first, again = script("publish")(**args), script("publish")(**args)
    assert first == again
    assert redis_client.xlen(history_key("public:retry")) == 1
