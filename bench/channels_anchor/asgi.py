"""ASGI entry point: Django for HTTP, the consumer for ``/ws/`` (Origin checked, as the project does)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "channels_anchor.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()  # Django is set up before the consumer is imported

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from .consumers import ChannelConsumer  # noqa: E402

websocket = AllowedHostsOriginValidator(URLRouter([path("ws/", ChannelConsumer.as_asgi())]))
application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket})
