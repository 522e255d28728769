"""Start and stop one Channels anchor server (the orchestrator imports this module, not the rest).

The server runs under ``bench/.venv-channels`` (``requirements-channels.txt``),
one process and one event loop, to compare with one uWSGI worker; it speaks
the part of ``docs/protocol.md`` the load client uses. Every start gets its
own channel-layer prefix, so group members left in the shared Redis by an
earlier run cannot slow this one down. Worth knowing when reading results:
the core layer drops whole broadcasts, silently, once 100 group messages wait
for one server process (``capacity``); the pubsub layer never drops, its
per-socket queues grow instead.
"""

from __future__ import annotations

from pathlib import Path

from ..anchor import AnchorServer

HERE = Path(__file__).resolve().parent
PYTHON = HERE.parent / ".venv-channels" / "bin" / "python"
#: every setup the comparison runs, in a stable order: ``<server>-<layer>``
COMBINATIONS = ("uvicorn-pubsub", "uvicorn-core", "daphne-pubsub", "daphne-core")
LAYER_NAMES = {"core": "RedisChannelLayer", "pubsub": "RedisPubSubChannelLayer"}


class ChannelsServer(AnchorServer):
    """One Django Channels server: ``combo`` is ``<daphne|uvicorn>-<core|pubsub>``."""

    python, cwd = PYTHON, HERE

    def __init__(self, combo: str, redis_url: str, log_path: Path) -> None:
        self.server, self.layer = combo.split("-")
        if self.server not in ("daphne", "uvicorn") or self.layer not in LAYER_NAMES:
            raise ValueError(f"unknown Channels setup {combo!r}; known: {', '.join(COMBINATIONS)}")
        super().__init__(
            f"channels-{combo}", redis_url, log_path, f"Channels 4 + {self.server} + {LAYER_NAMES[self.layer]}"
        )

    def argv(self) -> list[str]:
        if not self.python.exists():
            venv = "python3 -m venv bench/.venv-channels && bench/.venv-channels/bin/pip install -r"
            raise RuntimeError(f"{self.python} missing: {venv} bench/requirements-channels.txt")
        return [str(self.python), str(HERE / "run.py"), self.server, self.layer, str(self.port), self.redis_url]
