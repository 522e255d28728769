"""URLs of the offload library: include them with ``path("", include("offload.urls"))``."""

from django.urls import path

from . import metrics, operator, views

app_name = "offload"

urlpatterns = [
    path("ws/", views.channels_socket, name="ws"),
    path("ws/echo", views.echo_socket, name="ws-echo"),
    path("sse/", views.stream_view, name="sse"),
    path("api/publish/<str:channel>", views.api_publish, name="api-publish"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    # Prometheus: loopback scrapers only, or a bearer key (offload.metrics, docs/metrics.md)
    path("metrics", metrics.metrics_view, name="metrics"),
    path("operator/", operator.operator_page, name="operator"),
    path("operator/token", operator.operator_token, name="operator-token"),
]
