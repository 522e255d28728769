"""The demo app: chat rooms and personal notifications.

The room page sends chat messages over its websocket (a client ``publish``
that the room's publish hook saves, app/realtime.py) and renders the saved
ones on load. ``POST /rooms/<room>/messages`` does the same for HTTP clients.
Every input is checked by a form of :mod:`app.forms` first; a refusal is a
400 with ``{"error": code, "reason": ...}``, never a 500.
"""

from __future__ import annotations

import math

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

import offload
from offload.backend.history import read_tip
from offload.core.protocol import format_stream_id
from offload.transfers import proxy_upstream, resolve_under, send_file

from .chat import ROOMS, save_message
from .forms import (
    ApiForm,
    MessageForm,
    ReportForm,
    ThrottledAuthenticationForm,
    valid_download_name,
    valid_task_id,
)
from .models import ChatMessage

#: Saved messages the room page renders on load.
RECENT_MESSAGES = 50
#: ``since`` of a subscription that replays all retained history.
_ALL_HISTORY = "0-0"


def _room_or_404(room: str) -> str:
    if room not in ROOMS:
        raise Http404("no such room")
    return room


def _recent_messages(room: str) -> tuple[list[ChatMessage], str]:
    """The newest saved messages of ``room``, oldest first, and where its live channel resumes.

    The channel's newest id is read before the table: every message published
    up to that id was saved before it was published (the hook saves, then
    offload publishes), so the query that follows holds it, and the page
    subscribes from that id for everything after. A message saved in between
    comes both ways; the page shows it once (by ``pk``). Without that id
    (Redis down, or no history) the page subscribes from the start of the
    retained history, deduplicated the same way.
    """
    channel = f"room:{room}"
    try:
        tip = read_tip(channel)
    except offload.BackendUnavailable:
        tip = None
    newest = ChatMessage.objects.filter(room=room).select_related("user").order_by("-id")[:RECENT_MESSAGES]
    return list(reversed(newest)), format_stream_id(tip) if tip else _ALL_HISTORY


@login_required
def room(request: HttpRequest, room: str) -> HttpResponse:
    room = _room_or_404(room)
    recent, since = _recent_messages(room)
    config = {
        "room": room,
        "room_channel": f"room:{room}",
        "room_since": since,
        "typing_channel": f"typing:{room}",
        "user_channel": f"user:{request.user.pk}",
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
            "recent": recent,
            "user_channel": config["user_channel"],
            "room_channel": config["room_channel"],
            "config": config,
        },
    )


def _refuse(code: str, reason: str) -> JsonResponse:
    return JsonResponse({"error": code, "reason": reason}, status=400)


def _refuse_form(form: ApiForm) -> JsonResponse:
    return _refuse(*form.first_error())


def _publish(channel: str, data: dict, *, on_commit: bool = True) -> JsonResponse:
    try:
        return JsonResponse({"id": offload.publish(channel, data, on_commit=on_commit)})
    except offload.BackendUnavailable as exc:
        return JsonResponse({"error": exc.code, "reason": "the message service is down, try again"}, status=503)
    except offload.RefusedError as exc:
        return JsonResponse({"error": exc.code, "reason": exc.reason}, status=400)


@login_required
@require_POST
def post_message(request: HttpRequest, room: str) -> JsonResponse:
    """Save and publish one chat message, or neither: the publish runs inside the
    transaction (``on_commit=False``), so a Redis failure rolls the row back and
    the client, told 503, may simply send it again (after a Redis timeout, 503
    ``outcome_unknown``, the message may be out without its row)."""
    room = _room_or_404(room)
    form = MessageForm(request.POST)
    if not form.is_valid():
        return _refuse_form(form)
    with transaction.atomic():
        data = save_message(room, request.user.pk, request.user.get_username(), form.cleaned_data["text"])
        response = _publish(f"room:{room}", data, on_commit=False)
        if response.status_code != 200:
            transaction.set_rollback(True)  # not published: not saved either
    return response


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

    form = ReportForm(request.POST)
    if not form.is_valid():
        return _refuse_form(form)
    try:
        task_id = build_report.delay(
            channel=f"user:{request.user.pk}",
            owner=request.user.pk,
            user_id=request.user.pk,
            rows=form.cleaned_data["rows"],
            seconds=form.cleaned_data["seconds"],
            fail=form.cleaned_data["fail"],
        )
    except offload.BackendUnavailable:
        return JsonResponse({"error": "unavailable", "reason": "the task service is down, try again"}, status=503)
    return JsonResponse({"task_id": task_id}, status=202)


@login_required
def download_report(request: HttpRequest, task_id: str) -> HttpResponse:
    """A protected download: only the owner gets the file, and uWSGI sends it."""
    if not valid_task_id(task_id):
        return _refuse("invalid_task_id", "a task id is 32 lowercase hex digits")
    path = resolve_under(settings.REPORTS_DIR / str(request.user.pk), f"{task_id}.csv")
    return send_file(path, filename=f"report-{task_id[:8]}.csv")


@login_required
def download(request: HttpRequest, name: str) -> HttpResponse:
    """Any file under var/files/downloads, for logged-in users (offloaded)."""
    if not valid_download_name(name):
        return _refuse("invalid_name", "not a file name (too long, or control characters)")
    return send_file(resolve_under(settings.DOWNLOADS_DIR, name))


@login_required
def slow_upstream(request: HttpRequest) -> HttpResponse:
    """Authorise here, then let an offload thread wait for the slow upstream."""
    query = request.META.get("QUERY_STRING", "")
    return proxy_upstream(f"{settings.SLOW_UPSTREAM_URL}/slow" + (f"?{query}" if query else ""))


class LoginView(auth_views.LoginView):
    """Django's login view, throttled per account and per client address.

    A throttled attempt is refused before the password is checked and
    answered 429 with ``Retry-After`` (the form shows why); see
    :class:`app.forms.LoginThrottle` for the counting.
    """

    authentication_form = ThrottledAuthenticationForm

    def form_invalid(self, form: ThrottledAuthenticationForm) -> HttpResponse:
        response = super().form_invalid(form)
        if form.retry_after > 0:
            response.status_code = 429
            response["Retry-After"] = str(math.ceil(form.retry_after))
        return response
