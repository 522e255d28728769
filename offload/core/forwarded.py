"""Which hop of ``X-Forwarded-For`` is the client, given the proxies we trust.

Pure functions, no Django: :mod:`offload.addresses` uses them for every
per-client limit, and the upstream gate (a process without Django) for the
address it forwards upstream. The rule is in :mod:`offload.addresses`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["Network", "parse_networks", "rightmost_untrusted"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDRs (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"::1"``) as networks.

    Raises:
        ValueError: an entry is neither (a typo must not silently trust nobody, or everybody).
    """
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip())


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
