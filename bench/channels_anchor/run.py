"""``run.py SERVER LAYER PORT REDIS_URL`` (channels venv): the anchor under daphne or uvicorn, in this process, so
the pid the orchestrator started (and reads CPU from) is the server's. Backlog 1024 is what the project's test
server gives uWSGI (daphne's -p would leave Twisted's 50). Nothing else under ``bench/`` lands on ``sys.path``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = "channels_anchor.app:application"


def main(server: str, layer: str, port: str, redis_url: str) -> None:
    os.environ.update(REDIS_URL=redis_url, CHANNEL_LAYER=layer, DJANGO_SETTINGS_MODULE="channels_anchor.settings")
    init, where = HERE / "__init__.py", [str(HERE)]
    spec = importlib.util.spec_from_file_location("channels_anchor", init, submodule_search_locations=where)
    sys.modules["channels_anchor"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.chdir(HERE)  # daphne's CLI puts "." on sys.path: this directory holds only the anchor's modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
    if server == "daphne":
        from daphne.cli import CommandLineInterface

        CommandLineInterface().run(["-e", f"tcp:port={port}:interface=127.0.0.1:backlog=1024", "-v", "0", APP])
    else:
        from uvicorn.main import main as uvicorn

        options = "--backlog 1024 --loop uvloop --http httptools --ws websockets-sansio --log-level warning"
        uvicorn([APP, "--port", port, *options.split(), "--no-access-log", "--lifespan", "off"], prog_name="uvicorn")


if __name__ == "__main__":
    main(*sys.argv[1:5])
