"""Django Channels 4 comparison anchor for the benchmark (see ``server.py``).

A minimal Django project (``settings``, ``asgi``, ``urls``, ``consumers``,
``views``) that speaks enough of ``docs/protocol.md`` for the benchmark's
load client: ``/ws/?channel=C`` and ``POST /api/publish/<channel>``. It runs
in its own virtualenv (``bench/.venv-channels``, from
``bench/requirements-channels.txt``), never in the project's ``.venv``.

This file imports nothing, so the harness can import
``bench.channels_anchor.server`` (standard library only) from any venv.
"""
