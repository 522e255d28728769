"""The demo app: chat rooms and personal notifications.

Sending a chat message is an ordinary CSRF-protected Django POST view that
calls ``offload.publish``; every open page receives it over its websocket.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

import offload
from offload.transfers import proxy_upstream, resolve_under, send_file

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
        "report_url": reverse("start-report"),
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


@login_required
@require_POST
def start_report(request: HttpRequest) -> JsonResponse:
    """Queue the demo report task; progress arrives on the user's channel."""
    from .tasks import build_report

    seconds = min(float(request.POST.get("seconds", "10")), 60.0)
    rows = min(int(request.POST.get("rows", "200000")), 2_000_000)
    try:
        task_id = build_report.delay(
            channel=f"user:{request.user.pk}",
            owner=request.user.pk,
            user_id=request.user.pk,
            rows=rows,
            seconds=seconds,
            fail=request.POST.get("fail") == "1",
        )
    except offload.BackendUnavailable:
        return JsonResponse({"error": "unavailable", "reason": "the task service is down, try again"}, status=503)
    return JsonResponse({"task_id": task_id}, status=202)


@login_required
def download_report(request: HttpRequest, task_id: str) -> HttpResponse:
    """A protected download: only the owner gets the file, and uWSGI sends it."""
    path = resolve_under(settings.REPORTS_DIR / str(request.user.pk), f"{task_id}.csv")
    return send_file(path, filename=f"report-{task_id[:8]}.csv")


@login_required
def download(request: HttpRequest, name: str) -> HttpResponse:
    """Any file under var/files/downloads, for logged-in users (offloaded)."""
    return send_file(resolve_under(settings.DOWNLOADS_DIR, name))


@login_required
def slow_upstream(request: HttpRequest) -> HttpResponse:
    """Authorise here, then let an offload thread wait for the slow upstream."""
    query = request.META.get("QUERY_STRING", "")
    return proxy_upstream(f"{settings.SLOW_UPSTREAM_URL}/slow" + (f"?{query}" if query else ""))
