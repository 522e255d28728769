from django.urls import path

from . import views

urlpatterns = [
    path("api/publish/<str:channel>", views.publish, name="api-publish"),
    path("probe/", views.probe, name="probe"),
]
