"""HTTP views and their URLs: the publish API (async, as a Channels user would write it) and a plain page."""

from __future__ import annotations

import hmac
import json

from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.urls import path

from . import protocol

MAX_MESSAGE_BYTES = 65536  # the project's OFFLOAD_MAX_MESSAGE_BYTES default
_ids = protocol.IdClock()


def _error(status: int, code: str, reason: str) -> JsonResponse:
    return JsonResponse({"error": code, "reason": reason}, status=status)


async def publish(request: HttpRequest, channel: str) -> HttpResponse:
    """``POST /api/publish/<channel>`` as in docs/protocol.md, answering ``{"id": "<ms>-<seq>"}``.

    Async: under ASGI it awaits ``group_send`` on the server's event loop (no
    thread hop). The envelope is encoded once; every consumer forwards it.
    """
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
    message_id = _ids.next()
    text = protocol.message(channel, message_id, protocol.dumps(data))
    await get_channel_layer().group_send(protocol.group_for(channel), {"type": "offload.message", "text": text})
    return JsonResponse({"id": message_id})


def probe(request: HttpRequest) -> HttpResponse:
    """``GET /probe/``: a sync view (run in Django's thread executor, as a Channels user's views are)."""
    return HttpResponse("<!doctype html><title>probe</title><p>ok</p>\n")


urlpatterns = [path("api/publish/<str:channel>", publish), path("probe/", probe)]
