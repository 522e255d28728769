"""The demo app: chat rooms and personal notifications.

Sending a chat message is an ordinary CSRF-protected Django POST view that
calls ``offload.publish``; every open page receives it over its websocket.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

import offload

ROOMS = ["general", "random", "offtopic"]
MAX_TEXT = 2000


def _room_or_404(room: str) -> str:
    if room not in ROOMS:
        raise Http404("no such room")
    return room


@login_required
def room(request: HttpRequest, room: str) -> HttpResponse:
    room = _room_or_404(room)
    config = {
        "room": room,
        "room_channel": f"room:{room}",
        "user_channel": f"user:{request.user.pk}",
        "post_url": reverse("post-message", args=[room]),
        "notify_url": reverse("notify"),
        "username": request.user.get_username(),
    }
    return render(
        request,
        "app/room.html",
        {
            "room": room,
            "rooms": ROOMS,
            "user_channel": config["user_channel"],
            "room_channel": config["room_channel"],
            "post_url": config["post_url"],
            "notify_url": config["notify_url"],
            "config": config,
        },
    )


def _publish(channel: str, data: dict) -> JsonResponse:
    try:
        return JsonResponse({"id": offload.publish(channel, data)})
    except offload.BackendUnavailable as exc:
        return JsonResponse({"error": exc.code, "reason": "the message service is down, try again"}, status=503)
    except offload.RefusedError as exc:
        return JsonResponse({"error": exc.code, "reason": exc.reason}, status=400)


@login_required
@require_POST
def post_message(request: HttpRequest, room: str) -> JsonResponse:
    room = _room_or_404(room)
    text = request.POST.get("text", "").strip()
    if not text:
        return JsonResponse({"error": "empty", "reason": "message is empty"}, status=400)
    if len(text) > MAX_TEXT:
        return JsonResponse({"error": "too_long", "reason": f"at most {MAX_TEXT} characters"}, status=400)
    data = {"user": request.user.get_username(), "text": text, "sent_at": timezone.now().isoformat()}
    return _publish(f"room:{room}", data)


@login_required
@require_POST
def notify_me(request: HttpRequest) -> JsonResponse:
    """Push a notification to the caller's personal channel (user:<id>)."""
    data = {
        "text": f"Hello {request.user.get_username()}, this came from the server.",
        "sent_at": timezone.now().isoformat(),
    }
    return _publish(f"user:{request.user.pk}", data)
