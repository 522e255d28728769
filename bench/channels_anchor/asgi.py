"""ASGI entry point: Django for HTTP, the consumer for ``/ws/``."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "channels_anchor.settings")

from django.core.asgi import get_asgi_application

# Django must be set up before the consumer (and anything touching models) is imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from .consumers import ChannelConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # The usual Channels setup; the project checks Origin too. (It also
        # lets a request without Origin through, Channels refuses it: the
        # benchmark's client always sends one.)
        "websocket": AllowedHostsOriginValidator(URLRouter([path("ws/", ChannelConsumer.as_asgi())])),
    }
)
