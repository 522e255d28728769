"""The anchor's ASGI application: the consumer on ``/ws/`` (Origin checked, as the project does), the publish API
(async, as a Channels user would write it) and a plain page, with their URLs (``ROOT_URLCONF``)."""

from __future__ import annotations

import hmac
import json
import os
from urllib.parse import parse_qs

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "channels_anchor.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()  # Django is set up before Channels' consumers are imported

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from . import protocol  # noqa: E402

MAX_SUBSCRIPTIONS = 100  # the project's OFFLOAD_MAX_SUBSCRIPTIONS default
MAX_MESSAGE_BYTES = 65536  # the project's OFFLOAD_MAX_MESSAGE_BYTES default


class ChannelConsumer(AsyncWebsocketConsumer):
    """``/ws/?channel=C[&channel=D...]``, like the project's ``/ws/`` for live messages (no history: Channels has
    none). Each channel is joined *before* its ``subscribed`` reply, so the client gets every later message."""

    groups_joined: list[str]

    async def connect(self) -> None:
        self.groups_joined, replies = [], []
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        for channel in query.get("channel", [])[:MAX_SUBSCRIPTIONS]:
            if not protocol.CHANNEL_RE.match(channel):
                error = {"type": "error", "code": "invalid_channel", "reason": "bad channel name", "channel": channel}
                replies.append(protocol.dumps(error))
                continue
            group = protocol.group_for(channel)
            if group not in self.groups_joined:
                await self.channel_layer.group_add(group, self.channel_name)
                self.groups_joined.append(group)
            subscribed = {"type": "subscribed", "channel": channel, "last_id": None, "recovered": True}
            replies.append(protocol.dumps(subscribed))
        await self.accept()
        for text in replies:
            await self.send(text_data=text)

    async def disconnect(self, code) -> None:
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def offload_message(self, event: dict) -> None:
        """Group message ``{"type": "offload.message", "text": ENVELOPE}``: forwarded as it is."""
        await self.send(text_data=event["text"])


def _error(status: int, code: str, reason: str) -> JsonResponse:
    return JsonResponse({"error": code, "reason": reason}, status=status)


async def publish(request: HttpRequest, channel: str) -> HttpResponse:
    """``POST /api/publish/<channel>`` as in docs/protocol.md; async, so ``group_send`` is awaited on the server's
    loop (no thread hop). The envelope is encoded once; every consumer forwards it."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not settings.API_KEY:
        return _error(403, "api_disabled", "API_KEY is not configured")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.API_KEY.encode()):
        return _error(401, "unauthorized", "missing or wrong bearer key")
    if len(request.body) > MAX_MESSAGE_BYTES:
        return _error(413, "message_too_large", f"body larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        data = json.loads(request.body)
    except (ValueError, RecursionError):
        return _error(400, "bad_json", "body is not valid JSON")
    if not protocol.CHANNEL_RE.match(channel):
        return _error(400, "invalid_channel", "bad channel name")
    message_id = protocol.next_id()
    text = protocol.message(channel, message_id, protocol.dumps(data))
    await get_channel_layer().group_send(protocol.group_for(channel), {"type": "offload.message", "text": text})
    return JsonResponse({"id": message_id})


def probe(request: HttpRequest) -> HttpResponse:
    """``GET /probe/``: a sync view (run in Django's thread executor, as a Channels user's views are)."""
    return HttpResponse("<!doctype html><title>probe</title><p>ok</p>\n")


urlpatterns = [path("api/publish/<str:channel>", publish), path("probe/", probe)]
websocket = AllowedHostsOriginValidator(URLRouter([path("ws/", ChannelConsumer.as_asgi())]))
application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket})
