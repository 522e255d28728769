"""Publish hooks of the handler tests' namespaces (tests/settings.py)."""

from __future__ import annotations

from typing import Any

import offload
from offload.policies import Identity

from . import blocking_sleep
from .models import StoredMessage


def shout(identity: Identity, channel: str, data: Any) -> Any:
    """Upper-cases ``{"text": ...}`` and signs it; its test cases are keyed by the text."""
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        raise offload.Rejected("send {'text': ...}", code="bad_text")
    if "spam" in text:
        raise offload.Rejected("no spam here", code="spam")
    if text == "crash":
        raise ValueError("hook kaboom")
    if text.startswith("sleep "):  # "sleep 0.5": a slow hook
        blocking_sleep(float(text.split()[1]))
    if text == "inflate":
        return {"text": "x" * 70_000}
    return {"text": text.upper(), "by": identity.username or "anonymous"}


def store(identity: Identity, channel: str, data: Any) -> dict:
    """Saves the message, publishes it with its row id."""
    message = StoredMessage.objects.create(channel=channel, username=identity.username, text=str(data.get("text")))
    return {"id": message.pk, "text": message.text, "by": message.username}
