"""The chat itself, apart from how a message arrives: the rooms, and saving a message.

Shared by the websocket path (the publish hook in app/realtime.py) and the
HTTP view (``POST /rooms/<room>/messages``), so both save the same row and
publish the same data.
"""

from __future__ import annotations

from typing import Any

import offload

from .models import ChatMessage

__all__ = ["ROOMS", "checked_room", "save_message"]

ROOMS = ["general", "random", "offtopic"]


def checked_room(room: Any) -> str:
    """``room`` if it is one of :data:`ROOMS`.

    Raises:
        offload.Rejected: ``unknown_room``.
    """
    if not isinstance(room, str) or room not in ROOMS:
        raise offload.Rejected("no such room", code="unknown_room")
    return room


def save_message(room: str, user_id: int, username: str, text: str) -> dict[str, Any]:
    """Save one checked message; returns the data to publish on ``room:<room>``."""
    return ChatMessage.objects.create(room=room, user_id=user_id, text=text).as_data(username)
