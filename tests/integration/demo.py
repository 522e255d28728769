"""The demo project under test: offload.testing's LiveServer plus what the demo adds.

The library's LiveServer knows nothing of the demo. The demo's tests need its
users (alice, bob, carol; password "demo", from ``manage.py create_demo_users``
as ``make prepare`` runs it): :class:`DemoServer` adds that step and that
password, and tests/conftest.py gives the same to the ``offload_server`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from offload.testing import LiveServer

DEMO_PASSWORD = "demo"  # app/management/commands/create_demo_users.py


class DemoServer(LiveServer):
    """:class:`offload.testing.LiveServer` for the demo: ``prepare()`` creates its users too."""

    prepare_commands = (*LiveServer.prepare_commands, ("create_demo_users",))
    password = DEMO_PASSWORD


#: the same, as options for the ``offload_server`` fixture
DEMO_OPTIONS = {"prepare_commands": DemoServer.prepare_commands, "password": DemoServer.password}


def serve_demo(tmp_path_factory, name: str, env: Mapping[str, str] | None = None, **options) -> Iterator[DemoServer]:
    """The demo prepared and started in a new var dir ``name``, for a fixture to ``yield from``; stopped after."""
    live = DemoServer(tmp_path_factory.mktemp(name), env=dict(env or {}), **options).prepare().start()
    try:
        yield live
    finally:
        live.stop()
