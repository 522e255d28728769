"""OFFLOAD_REDIS_URL forms (pure parsing) and the hash-tagged key names that keep a channel in one slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from offload.backend.presence_store import presence_keys
from offload.backend.redis_client import channel_of, history_key, publish_token_key, pubsub_channel
from offload.backend.topology import RedisTarget, parse_redis_url


@pytest.mark.parametrize("url", ["redis://localhost:6379/2", "rediss://h:6380/0", "unix:///tmp/r.sock?db=1"])
def test_plain_urls_name_one_redis_and_pass_through(url):
    target = parse_redis_url(url)
    assert target.kind == "single" and target.url == url and target.ssl == url.startswith("rediss")


def test_a_cluster_url_lists_its_seed_nodes():
    target = parse_redis_url("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/")
    assert target == RedisTarget(
        "cluster",
        "redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/",
        (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)),
        username="u",
        password="p@ss",
    )
    assert parse_redis_url("rediss+cluster://h:7000").ssl


def test_a_sentinel_url_names_the_service_and_database():
    target = parse_redis_url("redis+sentinel://:secret@s1:26379,s2:26380/mymaster/3")
    assert (target.kind, target.nodes, target.service, target.db) == (
        "sentinel",
        (("s1", 26379), ("s2", 26380)),
        "mymaster",
        3,
    )
    assert (target.username, target.password) == (None, "secret")
    assert parse_redis_url("redis+sentinel://s1:26379/mymaster").db == 0


@pytest.mark.parametrize(
    "url, error",
    [
        ("localhost:6379", "not a Redis URL"),
        ("http://h:1/", "unknown Redis URL scheme"),
        ("redis+shard://h:1/", "unknown Redis URL scheme"),
        ("redis+cluster://h:1/2", "only database 0"),
        ("redis+cluster://h/", "host:port"),
        ("redis+cluster://h:x/", "bad port"),
        ("redis+sentinel://h:1/", "names its service"),
        ("redis+sentinel://h:1/m/x", "bad database"),
    ],
)
def test_malformed_urls_are_refused_with_the_reason(url, error):
    with pytest.raises(ValueError, match=error):
        parse_redis_url(url)


@pytest.mark.parametrize("channel", ["public:a", "room:x:y", "chat:{odd}", "é:ü"])
def test_every_key_and_pubsub_channel_of_a_channel_is_in_one_slot(channel):
    names = [history_key(channel), pubsub_channel(channel), publish_token_key(channel, "t"), *presence_keys(channel)]
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert channel_of(pubsub_channel(channel)) == channel == channel_of(pubsub_channel(channel).encode())
