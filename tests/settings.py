"""Settings of the handler tests' server (tests/integration/test_handlers.py).

The demo's settings plus a test-only app (``tests.testapp``: RPC methods,
publish hooks and lifecycle receivers that record what they see) and its
namespaces, with small handler limits so that the tests reach them quickly.
The server gets this module through ``DJANGO_SETTINGS_MODULE`` (its fixture
sets it in the environment and as a uWSGI ``--env``, which comes after the
ini's own).
"""

from project.settings import *  # noqa: F403
from project.settings import INSTALLED_APPS, OFFLOAD_NAMESPACES

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]

OFFLOAD_NAMESPACES = {
    **OFFLOAD_NAMESPACES,
    # Anyone may publish; the hook upper-cases the text and signs it (or refuses).
    "shout": {"subscribe": "public", "publish": True, "publish_hook": "tests.testapp.hooks.shout"},
    # Logged-in users publish; the hook saves each message in the database.
    "stored": {"subscribe": "public", "publish": "authenticated", "publish_hook": "tests.testapp.hooks.store"},
}

OFFLOAD_HANDLER_THREADS = 4
OFFLOAD_RPC_TIMEOUT = 2.0
OFFLOAD_RPC_MAX_IN_FLIGHT = 3
OFFLOAD_RPC_CALLS_PER_SECOND = 2.0
OFFLOAD_RPC_BURST = 12
