"""``python -m bench.publisher CONFIG_JSON`` (project .venv): ``offload.publish()`` from a Django process.

The bench publishes from Python through the library itself (pooled Redis
client, Lua script, idempotency token) with the project's own settings, as a
view or a task does: it measures what users run and keeps no copy of the
publish code. ``mode`` ``gevent``: greenlets after monkey-patching, as views
run in the project's uWSGI workers; ``threads``: OS threads, as in a threaded
server or a task runner. Each caller publishes once to ``public:warmup``
before ``ready`` (connections and script loaded); then ``bench.publoop``'s
protocol. ``call`` ``presence_count``: each call is ``offload.presence_count()``
of the channel instead (``settings``: a settings module that declares it).
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

    os.environ.update(DJANGO_SETTINGS_MODULE=cfg.get("settings", "project.settings"), REDIS_URL=cfg["redis_url"])
    os.environ.update(OFFLOAD_VAR_DIR=cfg["var_dir"])
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-publisher-not-secret")
    import django

    django.setup()
    from offload import presence_count, publish

    from . import publoop, spread

    names, callers = spread.names(cfg), int(cfg["concurrency"])

    def call(g: int) -> None:
        publish(names[g % len(names)], {"t": time.time_ns(), "seq": g})

    def count(_g: int) -> None:
        presence_count(names[0])

    publoop.run_threads(publoop.PublishRun(count=callers), lambda _: publish("public:warmup", {}), callers)
    publoop.ready_then_go()
    run = publoop.PublishRun(int(cfg["first"]), float(cfg["seconds"]), cfg.get("rate"))
    publoop.run_threads(run, count if cfg.get("call") == "presence_count" else call, callers)
    publoop.finish(run)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
