"""The demo's settings plus the bench's ``crowd`` (``public`` with presence) and ``quiet`` (without its events).

Each anonymous socket of ``crowd:*`` is one member, so a storm there differs
from one on ``public:*`` in presence alone. uWSGI's ini names
``project.settings``; a scenario whose server environment names this module
(``DJANGO_SETTINGS_MODULE``) gets it after the ini (``bench/server.py``).
"""

from project.settings import *  # noqa: F403
from project.settings import OFFLOAD_NAMESPACES

OFFLOAD_NAMESPACES = {**OFFLOAD_NAMESPACES, "crowd": {**OFFLOAD_NAMESPACES["public"], "presence": True}}
OFFLOAD_NAMESPACES["quiet"] = {**OFFLOAD_NAMESPACES["crowd"], "join_leave": False}  # members, but no events
