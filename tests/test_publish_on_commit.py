"""offload.publish inside database transactions: a real SQLite transaction, a real redis-server.

A deferred publish must go out after the commit and never after a rollback
(savepoints included), while every check on the message still raises in the
caller. Whether a message went out is read from the channel's history stream:
the publish script appends to it synchronously, so "not there" is exact, with
no waiting; the pub/sub delivery is checked too, once the block is done.
"""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connection, transaction
from django.test import TestCase

import offload
from offload.backend import redis_client as client_module
from offload.backend.redis_client import history_key, pubsub_channel
from tests.test_publish import BAD_INPUT


class Rollback(Exception):
    """Raised to leave an atomic block with a rollback."""


@pytest.fixture(scope="module", autouse=True)
def database():
    """The session's own SQLite file (tests/conftest.py puts it in a fresh temporary var/), migrated."""
    call_command("migrate", verbosity=0, interactive=False)


@pytest.fixture(autouse=True)
def no_groups():
    Group.objects.all().delete()
    yield
    Group.objects.all().delete()


def published(redis_client, channel: str) -> list[bytes]:
    """The data of every message in ``channel``'s history, oldest first."""
    return [fields[b"d"] for _, fields in redis_client.xrange(history_key(channel))]


def test_inside_a_transaction_the_message_goes_out_after_the_commit(redis_client):
    pubsub = redis_client.pubsub()
    pubsub.subscribe(pubsub_channel("public:tx"))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    with transaction.atomic():
        Group.objects.create(name="saved")
        assert offload.publish("public:tx", {"group": "saved"}) is None
        assert published(redis_client, "public:tx") == []
    assert published(redis_client, "public:tx") == [b'{"group":"saved"}']
    message = pubsub.get_message(timeout=2)
    assert message["data"].decode().endswith(' {"group":"saved"}')
    assert Group.objects.filter(name="saved").exists()
    pubsub.close()


def test_nothing_is_published_on_rollback(redis_client):
    with pytest.raises(Rollback), transaction.atomic():
        Group.objects.create(name="lost")
        offload.publish("public:tx", "lost")
        raise Rollback
    assert not Group.objects.exists()
    assert published(redis_client, "public:tx") == []


def test_a_publish_in_a_rolled_back_savepoint_does_not_go_out(redis_client):
    with transaction.atomic():
        offload.publish("public:tx", "before")
        with pytest.raises(Rollback), transaction.atomic():
            Group.objects.create(name="inner")
            offload.publish("public:tx", "inner")
            raise Rollback
        with transaction.atomic():  # a savepoint that is released: its publish waits for the outer commit
            offload.publish("public:tx", "kept")
        assert published(redis_client, "public:tx") == []
    assert published(redis_client, "public:tx") == [b'"before"', b'"kept"']
    assert not Group.objects.exists()


@pytest.mark.parametrize("channel, data, error, code", BAD_INPUT)
def test_bad_messages_raise_at_once_inside_the_block(redis_client, channel, data, error, code):
    with transaction.atomic():
        with pytest.raises(error) as info:
            offload.publish(channel, data)
        assert info.value.code == code
        assert connection.run_on_commit == []  # nothing left to fail later
    assert redis_client.keys("offload:h:*") == []


def test_on_commit_false_publishes_at_once_even_if_the_transaction_rolls_back(redis_client):
    with pytest.raises(Rollback), transaction.atomic():
        message_id = offload.publish("public:tx", "now", on_commit=False)
        assert published(redis_client, "public:tx") == [b'"now"']
        raise Rollback
    assert [mid.decode() for mid, _ in redis_client.xrange(history_key("public:tx"))] == [message_id]


def test_outside_a_transaction_it_publishes_at_once_and_returns_the_id(redis_client):
    message_id = offload.publish("public:tx", "plain")
    assert [mid.decode() for mid, _ in redis_client.xrange(history_key("public:tx"))] == [message_id]
    assert offload.publish("public:tx", "again", using="default")  # the alias named explicitly


def test_redis_down_after_the_commit_is_logged_not_raised(redis_client, settings, tmp_path, caplog):
    """The transaction is committed: the caller gets no exception, the log names the channel,
    and the project's own on_commit callbacks still run."""
    ran = []
    settings.OFFLOAD_REDIS_URL = f"unix://{tmp_path}/nothing.sock"
    client_module.reset()
    try:
        with caplog.at_level(logging.ERROR, logger="offload.publish"), transaction.atomic():
            Group.objects.create(name="committed")
            offload.publish("public:tx", "unsent")
            transaction.on_commit(lambda: ran.append("next callback"))
    finally:
        client_module.reset()
    assert Group.objects.filter(name="committed").exists()
    assert ran == ["next callback"]
    [record] = [r for r in caplog.records if r.name == "offload.publish"]
    assert record.levelno == logging.ERROR
    assert "public:tx" in record.getMessage() and "unavailable" in record.getMessage()


def test_in_a_test_case_transaction_it_goes_out_only_with_captured_callbacks_executed(redis_client):
    """Django's TestCase never commits: its tests see the publish through captureOnCommitCallbacks."""
    with pytest.raises(Rollback), transaction.atomic():  # TestCase's own transaction
        with TestCase.captureOnCommitCallbacks() as callbacks:
            offload.publish("public:tx", "not executed")
        assert len(callbacks) == 1 and published(redis_client, "public:tx") == []
        with TestCase.captureOnCommitCallbacks(execute=True):
            offload.publish("public:tx", "executed")
        assert published(redis_client, "public:tx") == [b'"executed"']
        raise Rollback
    assert published(redis_client, "public:tx") == [b'"executed"']
