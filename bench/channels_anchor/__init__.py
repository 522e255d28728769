"""Django Channels 4 comparison anchor (``server.py``): a minimal project in its own venv.

It imports nothing here, so the orchestrator can import ``server`` (standard
library only) from the project's ``.venv``.
"""
