from django.urls import path
from django.views.generic import RedirectView

from . import views

urlpatterns = [
    path("", RedirectView.as_view(url="/rooms/general/", permanent=False), name="home"),
    path("rooms/<slug:room>/", views.room, name="room"),
    path("rooms/<slug:room>/messages", views.post_message, name="post-message"),
    path("notify", views.notify_me, name="notify"),
]
