"""Benchmark harness: the real uWSGI server under load, measured from outside.

Two Python environments take part, on purpose:

* the orchestrator (``python -m bench``) runs in the project's ``.venv``, so it
  starts the server exactly as the tests do (``offload.testing.LiveServer``)
  and reads the server's processes from ``/proc``;
* the load clients (``bench.loadclient``) run in ``bench/.venv-bench`` with
  uvloop and picows, as subprocesses that talk JSON lines on stdin/stdout, so
  no benchmark dependency ever leaks into the server under test.

Modules (small, one job each; new scenarios reuse all but their own):

* ``config``     knobs (``BENCH_*`` environment variables) and scale presets
* ``server``     one server under test: var dir, LiveServer, login, its pids
* ``clients``    spawning load clients and exchanging JSON lines with them
* ``cpu``        CPU seconds per process group from ``/proc`` (noisy box)
* ``progress``   a dependency-free progress bar on stderr
* ``stats``      percentiles and medians (stdlib only: both environments)
* ``report``     JSON + Markdown files; ``plot`` draws the PNG (bench venv)
* ``scenarios``  one module per scenario (``offload``: offloading on vs off)
* ``loadclient`` the asyncio/uvloop clients: subscribers, publisher, probes,
  slow downloads, tasks

This package's ``__init__`` imports nothing: it is imported by both
environments.
"""
