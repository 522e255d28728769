"""The demo's one table: chat messages, saved by the room namespace's publish hook (app/realtime.py)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

__all__ = ["ChatMessage"]


class ChatMessage(models.Model):
    """One chat message, as the room page renders it on load.

    The live copy of a message is its publication on ``room:<room>``; this row
    is what survives history trimming and reloads. Both carry ``pk``, which is
    how the page joins the rendered list and the live stream without showing
    a message twice.
    """

    room = models.SlugField(max_length=50, db_index=False)  # the index below covers it
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="chat_messages")
    text = models.TextField()
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        # The room page reads the newest rows of one room.
        indexes = [models.Index(fields=["room", "-id"], name="chat_room_newest")]

    def __str__(self) -> str:
        return f"#{self.room} {self.user_id}: {self.text[:40]}"

    def as_data(self, username: str) -> dict[str, Any]:
        """The message as published on the room's channel (what room.js renders)."""
        return {"pk": self.pk, "user": username, "text": self.text, "sent_at": self.created.isoformat()}
