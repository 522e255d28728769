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

import ipaddress
from collections.abc import Iterable, Mapping

from . import conf

__all__ = ["client_address", "parse_networks", "rightmost_untrusted"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_networks: dict[str, tuple[Network, ...]] = conf.cache()


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDRs (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``) as networks.

    Raises:
        ValueError: an entry is neither (a typo must not silently trust nobody, or everybody).
    """
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip())


def _trusted() -> tuple[Network, ...]:
    try:
        return _networks["trusted"]
    except KeyError:
        setting = conf.get("OFFLOAD_TRUSTED_PROXIES")
        if isinstance(setting, str):
            setting = setting.split(",")
        networks = _networks["trusted"] = parse_networks(setting or ())
        return networks


def _is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # "unknown", a hostname, garbage: never a proxy of ours
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def rightmost_untrusted(remote_addr: str, forwarded_for: str, networks: tuple[Network, ...]) -> str:
    """The client's address given the peer, its ``X-Forwarded-For`` and the trusted proxies.

    Returns ``remote_addr`` when the peer is not trusted (its header is the
    client's own claim). Otherwise the right-most entry that is not a
    trusted proxy; if every entry is trusted (or the header is missing), the
    left-most hop we know of, since nobody untrusted wrote any of them.
    """
    if not networks or not _is_trusted(remote_addr, networks):
        return remote_addr
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            return hop
    return hops[0] if hops else remote_addr


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
