"""Lifecycle receivers of the handler tests: every event is appended to a Redis list.

``testapp:lifecycle`` holds one JSON object per event, in the order the
receivers ran. When ``testapp:block-receivers`` holds a number, the next
``connected`` receiver blocks its thread for that many seconds first (as a
slow database query would), holding up the events behind it.
"""

from __future__ import annotations

import json
from typing import Any

from offload import signals
from offload.backend.redis_client import get_client

from . import blocking_sleep

EVENTS = "testapp:lifecycle"
BLOCK = "testapp:block-receivers"


def _recorder(name: str):
    def record(sender: Any, identity: Any, connection_id: str, transport: str, channel: str | None = None, **kw):
        client = get_client()
        seconds = client.getdel(BLOCK) if name == "connected" else None
        if seconds is not None:
            blocking_sleep(float(seconds))
        event = {
            "signal": name,
            "connection_id": connection_id,
            "transport": transport,
            "user": identity.username if identity is not None else None,
            "channel": channel,
        }
        client.rpush(EVENTS, json.dumps(event))

    record.__name__ = f"record_{name}"
    return record


_receivers = [
    (getattr(signals, name), _recorder(name)) for name in ("connected", "disconnected", "subscribed", "unsubscribed")
]


def connect() -> None:
    for signal, receiver in _receivers:
        signal.connect(receiver, dispatch_uid=f"testapp.{receiver.__name__}")
