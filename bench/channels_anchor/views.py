"""HTTP views: the publish API (async) and a plain page for the view probe."""

from __future__ import annotations

import hmac
import json

from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse

from . import protocol

#: the project's OFFLOAD_MAX_MESSAGE_BYTES default
MAX_MESSAGE_BYTES = 65536

_ids = protocol.IdClock()


def _error(status: int, code: str, reason: str) -> JsonResponse:
    return JsonResponse({"error": code, "reason": reason}, status=status)


async def publish(request: HttpRequest, channel: str) -> HttpResponse:
    """``POST /api/publish/<channel>``, as in docs/protocol.md: ``{"id": "<ms>-<seq>"}``.

    An async view: under ASGI it runs on the server's event loop and awaits
    ``group_send`` directly (no thread hop). The envelope is encoded once here
    and every consumer forwards the same text.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    key = settings.API_KEY
    if not key:
        return _error(403, "api_disabled", "API_KEY is not configured")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        return _error(401, "unauthorized", "missing or wrong bearer key")
    if len(request.body) > MAX_MESSAGE_BYTES:
        return _error(413, "message_too_large", f"body larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        data = json.loads(request.body)
    except (ValueError, RecursionError):
        return _error(400, "bad_json", "body is not valid JSON")
    if not protocol.valid_channel(channel):
        return _error(400, "invalid_channel", "bad channel name")
    message_id = _ids.next()
    text = protocol.message(channel, message_id, protocol.dumps(data))
    await get_channel_layer().group_send(protocol.group_for(channel), {"type": "offload.message", "text": text})
    return JsonResponse({"id": message_id})


def probe(request: HttpRequest) -> HttpResponse:
    """``GET /probe/``: a small page from an ordinary *sync* view.

    Under ASGI Django runs sync views in its thread executor, which is what a
    Channels user's regular views get; the benchmark's view probe can time it.
    """
    return HttpResponse("<!doctype html><title>probe</title><p>ok</p>\n", content_type="text/html; charset=utf-8")
