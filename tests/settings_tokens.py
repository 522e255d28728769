"""Settings of the token tests' server (tests/integration/test_tokens.py, tests/browser/test_tokens.py).

The demo's settings, plus a namespace whose channels need a subscription token
and a URL configuration with views that mint tokens (tests/urls_tokens.py).
The test process and the server share ``SECRET_KEY`` through
``DJANGO_SECRET_KEY``, so tokens minted on either side verify on the other.
"""

from project.settings import *  # noqa: F403
from project.settings import OFFLOAD_NAMESPACES

OFFLOAD_NAMESPACES = {
    **OFFLOAD_NAMESPACES,
    # Private documents: whoever holds a subscription token for the channel.
    "private": {"subscribe": "token", "publish": False, "history_size": 50, "history_ttl": 3600},
}
ROOT_URLCONF = "tests.urls_tokens"
