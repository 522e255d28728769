from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/rooms/general/", permanent=False), name="home"),
    path("rooms/<slug:room>/", views.room, name="room"),
    path("rooms/<slug:room>/messages", views.post_message, name="post-message"),
    path("notify", views.notify_me, name="notify"),
    path("reports/", views.start_report, name="start-report"),
    path("reports/<slug:task_id>/download", views.download_report, name="download-report"),
    path("downloads/<path:name>", views.download, name="download"),
    path("slow", views.slow_upstream, name="slow-upstream"),
]
