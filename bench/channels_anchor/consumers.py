"""The websocket consumer: join the channel's group, forward its messages."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from . import protocol

#: the project's OFFLOAD_MAX_SUBSCRIPTIONS default
MAX_SUBSCRIPTIONS = 100


class ChannelConsumer(AsyncWebsocketConsumer):
    """``/ws/?channel=C[&channel=D...]``: like the project's ``/ws/`` for live messages.

    Each valid query channel is joined (``group_add``) *before* its
    ``subscribed`` reply, so every message published after a client saw
    ``subscribed`` reaches it. No history and no ``since`` (Channels has
    neither). Group messages carry the finished text (built once by the
    publish view) and are forwarded as they are.
    """

    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined = []
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        replies = []
        for channel in query.get("channel", [])[:MAX_SUBSCRIPTIONS]:
            if not protocol.valid_channel(channel):
                replies.append(protocol.error("invalid_channel", "bad channel name", channel))
                continue
            group = protocol.group_for(channel)
            if group not in self.groups_joined:
                await self.channel_layer.group_add(group, self.channel_name)
                self.groups_joined.append(group)
            replies.append(protocol.subscribed(channel))
        await self.accept()
        for text in replies:
            await self.send(text_data=text)

    async def disconnect(self, code) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        # Only the application-level ping; the benchmark's subscribers send nothing.
        if text_data is None:
            await self.send(text_data=protocol.error("binary_unsupported", "commands are JSON text"))
            return
        try:
            command = json.loads(text_data)
        except ValueError:
            await self.send(text_data=protocol.error("bad_json", "not valid JSON"))
            return
        if isinstance(command, dict) and command.get("type") == "ping":
            await self.send(text_data='{"type":"pong"}')
        else:
            await self.send(text_data=protocol.error("unknown_type", "only ping is supported here"))

    async def offload_message(self, event: dict) -> None:
        """Group message ``{"type": "offload.message", "text": ENVELOPE}``."""
        await self.send(text_data=event["text"])
