"""``python -m bench.publisher CONFIG_JSON`` (project .venv): ``offload.publish()`` from a Django process.

The bench publishes from Python through the library itself (pooled Redis
client, the Lua script, the idempotency token), with the project's own
settings, as a view or a task does: so it measures what users run and never
keeps a copy of the publish code in sync.

Config: ``redis_url`` (the server's Redis), ``var_dir`` (a scratch
``OFFLOAD_VAR_DIR`` for the settings), ``mode``, ``concurrency``,
``seconds``, ``first``, optionally ``rate`` (paced; else closed loop), and
``channel`` or ``channels`` (``bench/spread.py``). ``mode``:

* ``gevent``: greenlets after ``gevent.monkey.patch_all()``, as views run in
  the project's uWSGI workers (``gevent-early-monkey-patch``);
* ``threads``: OS threads, as in a threaded WSGI server or a task runner.

Every caller publishes once to ``public:warmup`` (nobody listens) before
``ready``, so connections and the script are loaded; then the ``bench.publoop``
protocol: ``go``, one ``result`` line, exit at EOF.
"""

from __future__ import annotations

import json
import os
import sys


def main(cfg: dict) -> None:
    if cfg.get("mode", "gevent") == "gevent":
        from gevent import monkey

        monkey.patch_all()
    import time

    os.environ.update(DJANGO_SETTINGS_MODULE="project.settings", REDIS_URL=cfg["redis_url"])
    os.environ.update(OFFLOAD_VAR_DIR=cfg["var_dir"])
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-publisher-not-secret")
    import django

    django.setup()
    from offload import publish

    from . import publoop, spread

    names, callers = spread.names(cfg), int(cfg["concurrency"])

    def call(g: int) -> None:
        publish(names[g % len(names)], {"t": time.time_ns(), "seq": g})

    publoop.run_threads(publoop.PublishRun(count=callers), lambda _: publish("public:warmup", {}), callers)
    publoop.ready_then_go()
    run = publoop.PublishRun(int(cfg["first"]), float(cfg["seconds"]), cfg.get("rate"))
    publoop.run_threads(run, call, callers)
    publoop.finish(run)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
