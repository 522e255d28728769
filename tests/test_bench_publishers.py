"""The benchmark's Redis publisher publishes exactly as offload.publish() does (real redis-server).

``bench/redis_publisher.py`` re-implements the publish call without Django
(for a cheap, separate publisher process); if ``offload/lua/publish.lua``
changes its keys or arguments, the benchmark must notice instead of
counting every publish as an error.
"""

import json

from bench import redis_publisher, spread
from offload.history import read_after
from offload.protocol import parse_stream_id


def _config(redis_server, **extra) -> dict:
    return {
        "redis_url": redis_server.url,
        "rate": 400,
        "seconds": 0.1,
        "first_seq": 10,
        "prefix": "offload:",
        "history_size": 100,
        "history_ttl": 3600,
        **extra,
    }


def test_spread_numbering():
    assert spread.channel_name(spread.channel_index(1234, 1000)) == "public:mc-234"
    per_channel = spread.expected(first=5, count=8, channels=3, failed=[7])
    # g = 5, 6, 8, 9, 10, 11, 12 (7 failed): channel g % 3, number g // 3
    assert per_channel == [[2, 3, 4], [3], [1, 2, 3]]
    assert b'"seq":42}' in spread.body(42) and spread.body(42).startswith(b'{"t":')


def test_single_channel_mode_lands_in_history_and_pubsub(redis_client, redis_server):
    pubsub = redis_client.pubsub()
    pubsub.subscribe("offload:c:public:bench")
    pubsub.get_message(timeout=1)
    result = redis_publisher.main(_config(redis_server, channel="public:bench"))
    assert result["errors"] == 0 and result["failed"] == []
    assert result["first"] == 10 and result["count"] >= 30
    entries, _ = read_after("public:bench", (0, 0), 1000)
    assert [json.loads(data)["seq"] for _, data in entries] == list(range(10, 10 + result["count"]))
    message = pubsub.get_message(timeout=2)
    message_id, _, data = message["data"].decode().partition(" ")
    assert parse_stream_id(message_id) == parse_stream_id(entries[0][0])
    assert json.loads(data)["seq"] == 10


def test_many_channel_mode_goes_round_robin(redis_client, redis_server):
    result = redis_publisher.main(_config(redis_server, channels=7))
    assert result["errors"] == 0 and result["count"] >= 30
    seen = 0
    for index in range(7):
        entries, _ = read_after(spread.channel_name(index), (0, 0), 1000)
        seqs = [json.loads(data)["seq"] for _, data in entries]
        assert seqs and all(spread.channel_index(g, 7) == index for g in seqs)
        seen += len(seqs)
    assert seen == result["count"]
