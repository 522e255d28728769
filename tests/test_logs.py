"""offload.logs: JSON lines, the connection fields of websocket and SSE lines, OFFLOAD_LOG_FORMAT."""

import io
import json
import logging

import pytest
from django.core.exceptions import ImproperlyConfigured

from offload import logs
from offload.policies import ANONYMOUS, Identity


class Conn:
    """What a log site passes: a websocket or an event stream has these two attributes."""

    def __init__(self, identity):
        self.connection_id = "0123456789abcdef"
        self.identity = identity


@pytest.fixture
def captured():
    """A logger whose one handler writes JSON lines into a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def lines(out):
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_connection_line_carries_its_id_and_user(captured):
    logger, out = captured
    logger.info("closing %s", "it", extra=logs.connection_fields(Conn(Identity(7, "alice"))))
    logger.warning("anonymous", extra=logs.connection_fields(Conn(ANONYMOUS)))
    logger.info("no identity", extra=logs.connection_fields(Conn(None)))
    first, second, third = lines(out)
    assert first["msg"] == "closing it" and first["level"] == "INFO" and first["logger"] == "tests.logs"
    assert first["connection_id"] == "0123456789abcdef" and first["user_id"] == 7
    assert first["ts"].endswith("Z") and isinstance(first["pid"], int)
    assert second["user_id"] is None and third["user_id"] is None


def test_exceptions_and_unserialisable_extras_still_make_one_json_line(captured):
    logger, out = captured
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed", extra={"thing": object(), "text": 'a "quoted"\nline'})
    [line] = lines(out)
    assert "ValueError: boom" in line["exc"]
    assert line["thing"].startswith("<object object") and line["text"] == 'a "quoted"\nline'


def test_log_connection_builds_nothing_below_the_level(captured):
    logger, out = captured

    class Exploding:
        @property
        def connection_id(self):
            raise AssertionError("fields built for a line that is not written")

    logs.log_connection(logger, logging.DEBUG, Exploding(), "quiet")
    logs.log_connection(logger, logging.INFO, Conn(Identity(3, "bob")), "loud %d", 1)
    [line] = lines(out)
    assert line["msg"] == "loud 1" and line["user_id"] == 3


def test_configure_switches_the_handlers_to_json_and_refuses_unknown_forms(settings):
    handler = logging.StreamHandler(io.StringIO())
    offload_logger = logging.getLogger("offload")
    offload_logger.addHandler(handler)
    try:
        settings.OFFLOAD_LOG_FORMAT = "text"
        logs.configure()
        assert not isinstance(handler.formatter, logs.JsonFormatter)
        settings.OFFLOAD_LOG_FORMAT = "json"
        logs.configure()
        assert isinstance(handler.formatter, logs.JsonFormatter)
        settings.OFFLOAD_LOG_FORMAT = "yaml"
        with pytest.raises(ImproperlyConfigured, match="yaml"):
            logs.configure()
    finally:
        offload_logger.removeHandler(handler)
