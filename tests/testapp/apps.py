from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """Connects the lifecycle receivers (its ``rpc`` module is found by offload itself)."""

    name = "tests.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import receivers

        receivers.connect()
