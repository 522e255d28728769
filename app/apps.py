from django.apps import AppConfig


class DemoAppConfig(AppConfig):
    name = "app"
    verbose_name = "offload demo"
