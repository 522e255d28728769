"""Fixtures shared by the integration tests (each module starts its own ``server``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def alice(server):
    """The demo user alice, logged in on the module's server."""
    session = server.http()
    session.login("alice")
    return session
