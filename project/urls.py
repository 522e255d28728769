from django.contrib.auth import views as auth_views
from django.urls import include, path

from app.views import LoginView

urlpatterns = [
    # Django's login, throttled per account and per address (app.forms.LoginThrottle)
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("offload.urls")),
    path("", include("app.urls")),
]

# Plain error pages that never parse the request body (project/errors.py).
handler400 = "project.errors.bad_request"
handler403 = "project.errors.permission_denied"
handler404 = "project.errors.page_not_found"
