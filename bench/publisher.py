"""``python -m bench.publisher CONFIG_JSON`` (project .venv): ``offload.publish()`` from a Django process, through
the library itself as a view or a task does (no copy of the publish code). ``mode``: ``gevent`` (as uWSGI views run)
or ``threads``; ``call=presence_count``: that instead; with ``prefix`` (a Node.js anchor), Redis PUBLISH of the
envelope its publish view builds, as a Django app beside Node.js would."""

from __future__ import annotations

import json
import os
import sys
import time


def main(cfg: dict) -> None:
    if cfg.get("mode", "gevent") == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from . import publoop

    names, callers = publoop.names(cfg), int(cfg["concurrency"])
    call, warm = (node_calls if "prefix" in cfg else offload_calls)(cfg, names)
    publoop.run_threads(publoop.PublishRun(count=callers), warm, callers)  # connections and script ready
    publoop.ready_then_go()
    run = publoop.PublishRun(int(cfg["first"]), float(cfg["seconds"]), cfg.get("rate"))
    publoop.run_threads(run, call, callers)
    publoop.finish(run)


def offload_calls(cfg: dict, names: list[str]):
    """``offload.publish()`` (or ``presence_count()``) with the project's settings, and its warm-up call."""
    os.environ.update(DJANGO_SETTINGS_MODULE=cfg.get("settings", "project.settings"), REDIS_URL=cfg["redis_url"])
    os.environ.update(OFFLOAD_VAR_DIR=cfg["var_dir"])
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-publisher-not-secret")
    import django

    django.setup()
    from offload import presence_count, publish

    warm = lambda _: publish("public:warmup", {})  # noqa: E731
    if cfg.get("call") == "presence_count":
        return (lambda _g: presence_count(names[0])), warm
    return (lambda g: publish(names[g % len(names)], {"t": time.time_ns(), "seq": g})), warm


def node_calls(cfg: dict, names: list[str]):
    """A Node.js anchor (``bench/node/server.js``): PUBLISH on Redis the envelope its publish view builds."""
    import redis

    from . import publoop

    client = redis.Redis.from_url(cfg["redis_url"])

    def call(g: int) -> None:
        name = names[g % len(names)]
        envelope = f'{{"type":"message","channel":{json.dumps(name)},"id":"{g}-0","data":'
        client.publish(cfg["prefix"] + name, envelope.encode() + publoop.stamp(g) + b"}")

    return call, (lambda _: client.publish(cfg["prefix"] + "warmup", "{}"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
