"""The client's address, also behind a load balancer.

Every per-address limit (connection slots, the abuse cooldown, login
throttling) keys on the address this module returns. Without a proxy that
is ``REMOTE_ADDR``. Behind a load balancer ``REMOTE_ADDR`` is the balancer,
and every client would share one limit; the balancer says who the client
was in ``X-Forwarded-For``, which it *appends* to whatever the client sent.

So the header is read from the right: entries added by the proxies we trust
(``OFFLOAD_TRUSTED_PROXIES``) are skipped, and the first untrusted entry is
the client. Entries to its left were written by the client itself and are
never believed: a client cannot pick the address its limits count against.
A request whose ``REMOTE_ADDR`` is not trusted is taken as it came: its
header is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import conf
from .core.forwarded import Network, parse_networks, rightmost_untrusted

__all__ = ["client_address", "parse_networks", "rightmost_untrusted"]

_networks: dict[str, tuple[Network, ...]] = conf.cache()


def _trusted() -> tuple[Network, ...]:
    try:
        return _networks["trusted"]
    except KeyError:
        setting = conf.get("OFFLOAD_TRUSTED_PROXIES")
        if isinstance(setting, str):
            setting = setting.split(",")
        networks = _networks["trusted"] = parse_networks(setting or ())
        return networks


def client_address(environ: Mapping[str, str]) -> str:
    """The address per-client limits count against, from a WSGI environ (or ``request.META``).

    ``REMOTE_ADDR`` unless it is one of ``OFFLOAD_TRUSTED_PROXIES``; then
    the right-most untrusted entry of ``X-Forwarded-For`` (see the module docstring).
    """
    remote = environ.get("REMOTE_ADDR", "")
    networks = _trusted()
    if not networks:
        return remote
    return rightmost_untrusted(remote, environ.get("HTTP_X_FORWARDED_FOR", ""), networks)
