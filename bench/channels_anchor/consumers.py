"""The websocket consumer: join the channel's group, forward its messages."""

from __future__ import annotations

from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from . import protocol

MAX_SUBSCRIPTIONS = 100  # the project's OFFLOAD_MAX_SUBSCRIPTIONS default


class ChannelConsumer(AsyncWebsocketConsumer):
    """``/ws/?channel=C[&channel=D...]``: like the project's ``/ws/`` for live messages.

    Each valid channel is joined (``group_add``) *before* its ``subscribed``
    reply, so a client that saw ``subscribed`` gets every later message. No
    history and no ``since`` (Channels has neither).
    """

    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined, replies = [], []
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        for channel in query.get("channel", [])[:MAX_SUBSCRIPTIONS]:
            if not protocol.CHANNEL_RE.match(channel):
                replies.append(protocol.error("invalid_channel", "bad channel name", channel))
                continue
            group = protocol.group_for(channel)
            if group not in self.groups_joined:
                await self.channel_layer.group_add(group, self.channel_name)
                self.groups_joined.append(group)
            replies.append(
                protocol.dumps({"type": "subscribed", "channel": channel, "last_id": None, "recovered": True})
            )
        await self.accept()
        for text in replies:
            await self.send(text_data=text)

    async def disconnect(self, code) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def offload_message(self, event: dict) -> None:
        """Group message ``{"type": "offload.message", "text": ENVELOPE}``: forwarded as it is."""
        await self.send(text_data=event["text"])
