from django.apps import AppConfig


class OffloadConfig(AppConfig):
    """The offload library as a Django app (static JS client, spooler tasks, session ends)."""

    name = "offload"
    verbose_name = "uWSGI offload real-time layer"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        from . import accounts

        # A logout, password change or deactivation closes that user's sockets everywhere.
        accounts.install()
        # Register every app's tasks.py, in workers and in spooler processes alike.
        autodiscover_modules("tasks")
        try:
            import uwsgi
        except ImportError:
            return
        from .tasks import spooler

        if uwsgi.opt.get("spooler"):
            uwsgi.spooler = spooler
