"""The demo's settings plus ``crowd`` (``public`` with presence: a storm there differs from one on ``public:*`` in
presence alone) and ``quiet`` (without its events); ``DJANGO_SETTINGS_MODULE`` in a server's env selects it."""

from project.settings import *  # noqa: F403
from project.settings import OFFLOAD_NAMESPACES

OFFLOAD_NAMESPACES = {**OFFLOAD_NAMESPACES, "crowd": {**OFFLOAD_NAMESPACES["public"], "presence": True}}
OFFLOAD_NAMESPACES["quiet"] = {**OFFLOAD_NAMESPACES["crowd"], "join_leave": False}  # members, but no events
