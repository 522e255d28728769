"""A test-only Django app: RPC methods, publish hooks and lifecycle receivers for tests/integration/test_handlers.py.

Installed by tests/settings.py only: the demo never sees it. What the
handlers observe is written to Redis (``testapp:*`` keys) or to the
database, and read back by the tests.
"""

from gevent.monkey import get_original

#: Blocks the thread for real, as a database query does (gevent's patched sleep would yield).
blocking_sleep = get_original("time", "sleep")
