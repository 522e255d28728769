"""Benchmark harness: the real uWSGI server under load, measured from outside (``bench/README.md``).

Two Python environments take part, on purpose: the orchestrator
(``python -m bench``) and our publisher run in the project's ``.venv``, so
the server starts exactly as the tests start it and publishes go through
``offload.publish()``; the load clients (``bench.loadclient``) run in
``bench/.venv-bench`` (uvloop, picows), so no benchmark dependency leaks into
the server under test. This file imports nothing: both import the package.
"""
