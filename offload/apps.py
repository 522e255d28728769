from django.apps import AppConfig

from .uwsgiconf import config_problem


class OffloadConfig(AppConfig):
    """The offload library as a Django app (static JS client, spooler tasks, RPC methods, session ends)."""

    name = "offload"
    verbose_name = "uWSGI offload real-time layer"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        from . import accounts, handlers, logs
        from .backend import abuse

        # OFFLOAD_LOG_FORMAT = "json": JSON log lines (Django configured LOGGING before this).
        logs.configure()

        # A logout, password change or deactivation closes that user's sockets everywhere.
        accounts.install()
        # An address closed for flooding is refused by every worker and instance for a while.
        abuse.install()
        # Register every app's tasks.py, in workers and in spooler processes alike.
        autodiscover_modules("tasks")
        # Register every app's RPC methods (rpc.py), as the admin finds admin.py.
        handlers.autodiscover()
        try:
            import uwsgi
        except ImportError:
            return
        # The library's uWSGI options must be there, from this installation: uWSGI only warns
        # when the `ini = exec://... -m offload.uwsgiconf` include fails, and would then serve
        # without gevent, Redis or routes. SystemExit stops uWSGI with the message in its log.
        problem = config_problem(uwsgi.opt)
        if problem:
            raise SystemExit(problem)
        from .tasks import spooler
        from .worker import start_after_fork

        if uwsgi.opt.get("spooler"):
            uwsgi.spooler = spooler
        # Each worker's hub starts when the worker does, not at its first websocket: a worker
        # that has served none yet must still hear the control channel (penalties, logouts).
        previous_hook = getattr(uwsgi, "post_fork_hook", None)

        def post_fork() -> None:
            if previous_hook is not None:
                previous_hook()
            if uwsgi.worker_id() > 0:  # not the spooler or a mule
                start_after_fork(uwsgi.worker_id())

        uwsgi.post_fork_hook = post_fork
