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


def test_tls_options_in_the_query_reach_every_connection():
    target = parse_redis_url("rediss+sentinel://s1:26379/mymaster?ssl_ca_certs=/etc/ca.crt&ssl_cert_reqs=required")
    assert (target.service, target.db) == ("mymaster", 0)
    assert target.connection_options() == {
        "username": None,
        "password": None,
        "ssl": True,
        "ssl_ca_certs": "/etc/ca.crt",
        "ssl_cert_reqs": "required",
    }
    cluster = parse_redis_url("rediss+cluster://u:p@h:7000/?ssl_certfile=/c.crt&ssl_keyfile=/c.key")
    assert cluster.connection_options() == {
        "username": "u",
        "password": "p",
        "ssl": True,
        "ssl_certfile": "/c.crt",
        "ssl_keyfile": "/c.key",
    }


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
        ("rediss+cluster://h:1/?ssl_ca_cert=/ca.crt", "unknown option 'ssl_ca_cert'"),
        ("redis+cluster://h:1/?ssl_ca_certs=/ca.crt", "needs TLS"),
        ("rediss+sentinel://h:1/m?ssl_cert_reqs=maybe", "ssl_cert_reqs is one of"),
        ("rediss+cluster://h:1/?ssl_ca_certs=/a&ssl_ca_certs=/b", "given twice"),
        ("rediss+cluster://h:1/?ssl_ca_certs", "malformed query"),
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
