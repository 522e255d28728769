"""RPC methods of the handler tests (found by offload's autodiscovery of ``rpc`` modules)."""

from __future__ import annotations

import time
from typing import Any

from django.contrib.auth.models import User

import offload
from offload.backend.redis_client import get_client
from offload.policies import Identity

from . import blocking_sleep
from .models import StoredMessage


@offload.rpc("test.echo")
def echo(identity: Identity, data: Any) -> dict:
    """Who called, with what."""
    return {"user": identity.username or None, "user_id": identity.user_id, "data": data}


@offload.rpc()
def usernames(identity: Identity, data: Any) -> list[str]:
    """An ORM query in a handler thread (registered under its function's name)."""
    return sorted(User.objects.values_list("username", flat=True))


@offload.rpc("test.fail")
def fail(identity: Identity, data: Any) -> None:
    raise RuntimeError(f"handler kaboom {data}")  # for the server log, never for the client


@offload.rpc("test.reject")
def reject(identity: Identity, data: Any) -> None:
    raise offload.Rejected("not today", code="not_today")


@offload.rpc("test.unserializable")
def unserializable(identity: Identity, data: Any) -> dict:
    return {"when": object()}


@offload.rpc("test.sleep")
def sleep(identity: Identity, data: Any) -> str:
    """Sleeps past OFFLOAD_RPC_TIMEOUT, then says in Redis that it finished."""
    blocking_sleep(data["seconds"])
    get_client().rpush(f"testapp:slept:{data['token']}", "done")
    return "late"


@offload.rpc("test.block")
def block(identity: Identity, data: Any) -> str:
    """Holds its handler thread until the test sets ``testapp:release:<token>`` (30 s at most)."""
    client = get_client()
    client.incr(f"testapp:blocked:{data['token']}")
    deadline = time.monotonic() + 30
    while not client.exists(f"testapp:release:{data['token']}") and time.monotonic() < deadline:
        blocking_sleep(0.02)
    return "released"


@offload.rpc("test.publish")
def publish(identity: Identity, data: Any) -> str | None:
    """``offload.publish()`` from a handler thread (its own Redis connection)."""
    return offload.publish(data["channel"], data["data"])


@offload.rpc("test.stored")
def stored(identity: Identity, data: Any) -> list[dict]:
    """What the ``stored`` namespace's hook saved on channel ``data``."""
    return list(StoredMessage.objects.filter(channel=data).order_by("id").values("username", "text"))
