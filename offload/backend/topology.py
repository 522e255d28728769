"""Which Redis ``OFFLOAD_REDIS_URL`` names: one server, a Cluster, or a Sentinel-watched master.

Pure parsing (no redis import), so the URL forms are tested without a server:

- ``redis://``, ``rediss://``, ``unix://``: one Redis, handed to redis-py as is.
- ``redis+cluster://[user:password@]host:port[,host:port...]/``: a Redis Cluster;
  the hosts are seed nodes, the client discovers the rest. ``rediss+cluster``
  speaks TLS.
- ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]``:
  the master of ``<service>`` as the sentinels at those addresses know it,
  followed on failover. The credentials are the master's; the sentinels are
  asked without. ``rediss+sentinel`` speaks TLS to the master.

The ``rediss+`` forms take redis-py's TLS options in the query, for a private
CA or client certificates: ``?ssl_ca_certs=/etc/redis/ca.crt`` (and
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs=required|optional|none``).
Any other query parameter is an error, not silently ignored.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

__all__ = ["TLS_OPTIONS", "RedisTarget", "parse_redis_url"]

Kind = Literal["single", "cluster", "sentinel"]

#: Query parameters of a ``rediss+cluster``/``rediss+sentinel`` URL, passed to every connection as is.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("required", "optional", "none")


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names. ``url`` is the original text (what a ``single`` client is made from)."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    tls: tuple[tuple[str, str], ...] = ()  # TLS_OPTIONS given in the query

    def connection_options(self) -> dict:
        """Credentials and TLS for a redis-py connection to any node of a Cluster, or to Sentinel's master."""
        return {"username": self.username, "password": self.password, "ssl": self.ssl, **dict(self.tls)}


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``OFFLOAD_REDIS_URL``.

    Raises:
        ValueError: an unknown scheme, a missing or malformed node list, a
            Sentinel URL without a service name, or a Cluster URL with a
            database other than 0 (a Cluster has only database 0).
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a Redis URL: {url!r}")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("single", url, ssl=scheme == "rediss")
    base, plus, kind = scheme.partition("+")
    if not plus or base not in ("redis", "rediss") or kind not in ("cluster", "sentinel"):
        raise ValueError(f"unknown Redis URL scheme {scheme!r} (redis, rediss, unix, redis+cluster, redis+sentinel)")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    tls = _tls_options(query, base == "rediss", url)
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    nodes = tuple(_node(item, url) for item in hosts.split(","))
    parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
    if kind == "cluster":
        if parts not in ([], ["0"]):
            raise ValueError(f"a Redis Cluster has only database 0: {url!r}")
        return RedisTarget("cluster", url, nodes, username=username, password=password, ssl=base == "rediss", tls=tls)
    if not parts or len(parts) > 2:
        raise ValueError(f"a Sentinel URL names its service: redis+sentinel://host:port/<service>[/db], not {url!r}")
    db = _int(parts[1], "database", url) if len(parts) == 2 else 0
    return RedisTarget("sentinel", url, nodes, parts[0], db, username, password, base == "rediss", tls)


def _tls_options(query: str, ssl: bool, url: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = urllib.parse.parse_qsl(query, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(f"malformed query in {url!r}") from None
    for name, value in pairs:
        if name not in TLS_OPTIONS:
            raise ValueError(f"unknown option {name!r} in {url!r} (the query takes {', '.join(TLS_OPTIONS)})")
        if not ssl:
            raise ValueError(f"{name} needs TLS: rediss+cluster:// or rediss+sentinel://, not {url!r}")
        if name == "ssl_cert_reqs" and value not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs is one of {', '.join(_CERT_REQS)}, not {value!r}")
    if len({name for name, _ in pairs}) != len(pairs):
        raise ValueError(f"an option is given twice in {url!r}")
    return tuple(pairs)


def _node(item: str, url: str) -> tuple[str, int]:
    host, colon, port = item.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f"every node is host:port in {url!r}")
    return host.strip("[]"), _int(port, "port", url)


def _int(text: str, what: str, url: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"bad {what} {text!r} in {url!r}") from None
