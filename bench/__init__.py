"""Benchmark harness: the real uWSGI server under load, measured from outside (``bench/README.md``).

Two environments on purpose: the orchestrator and our publisher run in the project's ``.venv`` (the server starts
as the tests start it), the load clients in ``bench/.venv-bench``, so no bench dependency leaks into the server.
"""
