"""WSGI entry point for uWSGI (``module = project.wsgi:application``)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from offload.wsgi import get_wsgi_application

application = get_wsgi_application()
