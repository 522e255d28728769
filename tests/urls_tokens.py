"""The demo's URLs plus views that mint tokens, for the token tests' server (tests/settings_tokens.py).

What a project's own views would do (``offload.connection_token(request.user)``),
except that these mint for any user named in the query string: test servers only.
"""

from django.contrib.auth import get_user_model
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

import offload


def _ttl(request: HttpRequest) -> float | None:
    return float(request.GET["ttl"]) if "ttl" in request.GET else None


def connection(request: HttpRequest) -> JsonResponse:
    """``?username=U[&ttl=S]``: a connection token for user U."""
    user = get_user_model().objects.get(username=request.GET["username"])
    return JsonResponse({"token": offload.connection_token(user, ttl=_ttl(request)), "user_id": user.pk})


def subscription(request: HttpRequest) -> JsonResponse:
    """``?channel=C[&username=U][&ttl=S]``: a subscription token for channel C (for user U only, if named)."""
    username = request.GET.get("username")
    user = get_user_model().objects.get(username=username) if username else None
    return JsonResponse({"token": offload.subscription_token(request.GET["channel"], user=user, ttl=_ttl(request))})


urlpatterns = [
    path("test-tokens/connection", connection),
    path("test-tokens/subscription", subscription),
    path("", include("project.urls")),
]
