from django.apps import AppConfig


class OffloadConfig(AppConfig):
    """The offload library as a Django app (for its static JS client)."""

    name = "offload"
    verbose_name = "uWSGI offload real-time layer"
