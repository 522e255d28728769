"""An address that broke a rate limit is refused everywhere for a while, checked without Redis.

The check on every websocket upgrade stays a dict lookup in the process
(:data:`offload.core.rates.cooldowns`); what crosses processes is the
penalty: the worker that closed a flooder refuses it at once and tells every
hub of every worker and instance on the control channel
(:func:`offload.backend.hub.send_control`), and each records it locally. So a
flooder behind a load balancer is refused by whichever instance it reaches
next, at the cost of one PUBLISH per penalty, never per upgrade.
"""

from __future__ import annotations

import logging
import math

from ..core.rates import cooldowns
from ..exceptions import BackendUnavailable
from .hub import on_control, send_control

__all__ = ["install", "penalise"]

log = logging.getLogger("offload.backend.abuse")

_COMMAND = "cooldown"
_MAX_SECONDS = 3600.0  # a control message cannot refuse an address for longer
_MAX_ADDRESS = 64  # characters: an IPv6 address with a zone fits


def penalise(address: str, seconds: float) -> None:
    """Refuse ``address`` for ``seconds`` here at once, and on every worker and instance."""
    if seconds <= 0 or not address:
        return
    cooldowns.penalise(address, seconds)
    try:
        send_control({"op": _COMMAND, "address": address, "seconds": seconds})
    except BackendUnavailable as exc:  # refused here still; elsewhere after its next flood
        log.warning("cooldown of %s not shared with the other workers: %s", address, exc)


def _on_control(command: dict) -> None:
    if command.get("op") != _COMMAND:
        return
    address, seconds = command.get("address"), command.get("seconds")
    if not isinstance(address, str) or not 0 < len(address) <= _MAX_ADDRESS:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return
    seconds = min(float(seconds), _MAX_SECONDS)
    cooldowns.penalise(address, seconds)
    log.info("refusing %s for %g s: a cooldown on the control channel", address, seconds)


def install() -> None:
    """Listen for other processes' penalties (``offload.apps`` calls it once)."""
    on_control(_on_control)
