"""Start the Channels anchor under daphne or uvicorn (one process, one event loop).

Run with the channels venv's python (never the project's ``.venv``)::

    bench/.venv-channels/bin/python bench/channels_anchor/run.py \\
        --server uvicorn --layer pubsub --port 8765 \\
        --redis-url unix:///tmp/x/redis.sock --api-key secret

The server runs in this very process (its CLI entry point is called here, so
the pid you started is the server's pid: nothing forks). Equivalent to::

    daphne -e tcp:port=PORT:interface=HOST:backlog=1024 -v 0 channels_anchor.asgi:application
    uvicorn channels_anchor.asgi:application --host HOST --port PORT --backlog 1024 \\
        --loop uvloop --http httptools --ws websockets-sansio \\
        --log-level warning --no-access-log --lifespan off

``--backlog`` (default 1024, what the project's test server gives uWSGI
with UWSGI_LISTEN) is the listen queue of both servers: daphne's -b/-p
would leave Twisted's 50, and uvicorn's own default is 2048.

``--uvicorn-ws`` picks uvicorn's websocket implementation. The default,
``websockets-sansio``, is what uvicorn 0.54 itself picks (``--ws auto``) when
the ``websockets`` package is installed; ``websockets`` is the older
implementation on websockets' legacy API, deprecated by uvicorn (it warns at
start) and due to become an alias of ``websockets-sansio``.

``channels_anchor`` is registered as a package from this directory, so
nothing else under ``bench/`` lands on ``sys.path``. No access logs, no
database, no migrations. SIGTERM or SIGINT stops the server.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = "channels_anchor.asgi:application"


def register_package() -> None:
    """Make ``import channels_anchor`` find this directory, and nothing besides it."""
    spec = importlib.util.spec_from_file_location(
        "channels_anchor", HERE / "__init__.py", submodule_search_locations=[str(HERE)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["channels_anchor"] = module
    spec.loader.exec_module(module)
    # daphne's CLI puts "." on sys.path; make that this directory, which holds
    # only the anchor's own modules (no name of the standard library).
    os.chdir(HERE)
    # A bench/ directory on sys.path (e.g. via PYTHONPATH) could shadow modules.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--server", choices=["daphne", "uvicorn"], required=True)
    p.add_argument("--layer", choices=["core", "pubsub"], default=os.environ.get("CHANNEL_LAYER", "core"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="e.g. unix:///path/redis.sock")
    p.add_argument("--api-key", default=os.environ.get("API_KEY", ""))
    p.add_argument("--backlog", type=int, default=1024, help="listen queue (accept backlog)")
    p.add_argument("--uvicorn-ws", choices=["websockets-sansio", "websockets"], default="websockets-sansio")
    args = p.parse_args(argv)
    if not args.redis_url:
        p.error("--redis-url (or REDIS_URL) is required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ["REDIS_URL"] = args.redis_url
    os.environ["CHANNEL_LAYER"] = args.layer
    os.environ["API_KEY"] = args.api_key
    os.environ["DJANGO_SETTINGS_MODULE"] = "channels_anchor.settings"
    register_package()
    if args.server == "daphne":
        from daphne.cli import CommandLineInterface

        # -e is -b/-p plus a backlog (the host escaped as daphne.endpoints does).
        interface = args.host.strip("[]").replace(":", r"\:")
        endpoint = f"tcp:port={args.port}:interface={interface}:backlog={args.backlog}"
        # -v 0: no access log (daphne writes one to stdout from verbosity 1).
        CommandLineInterface().run(["-e", endpoint, "-v", "0", APP])
    else:
        from uvicorn.main import main as uvicorn_main

        uvicorn_main(
            [
                APP,
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--backlog",
                str(args.backlog),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--ws",
                args.uvicorn_ws,
                "--log-level",
                "warning",
                "--no-access-log",
                # Channels' ProtocolTypeRouter has no lifespan handler
                "--lifespan",
                "off",
            ],
            prog_name="uvicorn",
        )


if __name__ == "__main__":
    main()
