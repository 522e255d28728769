"""Django Channels 4 comparison anchor (``server.py``): a minimal project in its own venv.

It imports nothing here, so the orchestrator can import ``server`` from the
project's ``.venv``.
"""
