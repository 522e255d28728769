"""The hub in a Redis Cluster: which master serves each channel, one link per master.

Live delivery uses sharded pub/sub: a channel's messages stay on the master
that serves its hash slot (the channel name is its own hash tag, so that is
also where its history lives). The hub keeps one :class:`~.hub_link.Link` per
master, the same loop as with one Redis, and routes each channel to the link
of its slot's master.

The slot map is read with ``CLUSTER SLOTS`` from any node known (the URL's
seeds and every node seen since). It is read again whenever the topology
may have changed: a link lost its node (maybe a failover), or a node said a
channel is no longer its own (an unasked ``sunsubscribe`` after a slot
migration or a failover, a ``-MOVED``/``-ASK`` answer). Then channels whose
master changed are lost on the old link (their subscribers re-sync from
history once ready again) and subscribed on the new one; links of nodes that
no longer serve slots are retired, new masters get a link.

The control channel is a sharded channel like the others (``{ctl}`` decides
its slot): one node carries it instead of every node (classic PUBLISH in a
Cluster is copied to all nodes), and it follows failovers the same way.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import gevent
import gevent.event
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from .. import conf
from .hub_link import CONTROL, Link, LinkOwner
from .redis_client import REDIS_ERRORS, pubsub_channel, target

if TYPE_CHECKING:
    from redis.client import PubSub

__all__ = ["ClusterRoutes"]

log = logging.getLogger("offload.backend.hub")

Node = tuple[str, int]
_SLOTS = 16384
_REFRESH_PAUSE = 0.1  # seconds between two slot map reads at most (a failover takes seconds)


class ClusterRoutes:
    """Channel -> slot -> master -> link, kept current with the Cluster's slot map."""

    def __init__(self, hub: LinkOwner) -> None:
        self.hub = hub
        self.links: dict[Node, Link] = {}
        self.refreshes = 0
        self._map: list[Node | None] = [None] * _SLOTS
        self._owner: dict[str, Node] = {}  # routed channels
        self._slots: dict[str, int] = {}
        self._unrouted: set[str] = {CONTROL}
        where = target()
        self._auth = where.connection_options()
        self._known: list[Node] = list(where.nodes)
        self._stale = gevent.event.Event()
        self._stale.set()
        self._refresher = gevent.spawn(self._refresh_loop)

    def close(self) -> None:
        self._refresher.kill()

    def slot_of(self, channel: str) -> int:
        slot = self._slots.get(channel)
        if slot is None:
            slot = key_slot(pubsub_channel(channel).encode())
            if channel == CONTROL or channel in self.hub._local:  # forgotten with the channel (remove)
                self._slots[channel] = slot
        return slot

    def add(self, channel: str) -> None:
        """A channel got its first local subscriber."""
        self._route(channel)

    def remove(self, channel: str) -> None:
        """A channel lost its last local subscriber."""
        self._unrouted.discard(channel)
        self._slots.pop(channel, None)
        link = self.links.get(self._owner.pop(channel, None))  # type: ignore[arg-type]
        if link is not None:
            link.wanted.discard(channel)  # type: ignore[attr-defined]
            link.wake()

    def unroute(self, channels: list[str]) -> None:
        """These channels' node said they are not its own: route them after a fresh map."""
        for channel in channels:
            link = self.links.get(self._owner.pop(channel, None))  # type: ignore[arg-type]
            if link is not None:
                link.wanted.discard(channel)  # type: ignore[attr-defined]
            if channel == CONTROL or channel in self.hub._local:
                self._unrouted.add(channel)
        self.refresh_soon()

    def refresh_soon(self) -> None:
        self._stale.set()

    def _route(self, channel: str) -> None:
        node = self._map[self.slot_of(channel)]
        link = self.links.get(node) if node is not None else None
        if link is None:  # no map yet, or a slot without a master: after the next refresh
            self._unrouted.add(channel)
            return
        self._owner[channel] = node  # type: ignore[assignment]
        link.wanted.add(channel)  # type: ignore[attr-defined]
        link.wake()

    # -- the refresher greenlet -----------------------------------------------------

    def _refresh_loop(self) -> None:
        while True:
            self._stale.wait()
            self._stale.clear()
            try:
                self._refresh()
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # every node unreachable, or a bug: try again
                log.warning("hub: no Cluster slot map: %s", exc)
                self._stale.set()
            if self._unrouted:  # a slot without a master (failover under way): ask again
                self._stale.set()
            gevent.sleep(_REFRESH_PAUSE)

    def _refresh(self) -> None:
        slot_map, nodes = self._read_map()
        self.refreshes += 1
        self._map = slot_map
        self._known = list(dict.fromkeys([*nodes, *self._known]))
        masters = {node for node in slot_map if node is not None}
        for node in [n for n in self.links if n not in masters]:
            link = self.links.pop(node)
            log.info("hub: %s:%s serves no slot now", *node)
            for channel in [c for c, owner in self._owner.items() if owner == node]:
                del self._owner[channel]
                self._unrouted.add(channel)
            link.retire()
            self.hub._closed_reconnects += link.reconnects
        for node in masters:
            if node not in self.links:
                self.links[node] = Link(self.hub, set(), self._pubsub_factory(node), True, f"{node[0]}:{node[1]}")
        for channel, node in list(self._owner.items()):
            if slot_map[self.slot_of(channel)] != node:
                old = self.links[node]
                del self._owner[channel]
                old.wanted.discard(channel)  # type: ignore[attr-defined]
                old.drop(channel)
                self._unrouted.add(channel)
        for channel in list(self._unrouted):
            self._unrouted.discard(channel)
            self._route(channel)

    def _read_map(self) -> tuple[list[Node | None], list[Node]]:
        """The masters of every slot, and every node seen, from the first node that answers."""
        timeout = conf.get("OFFLOAD_REDIS_TIMEOUT")
        error: Exception | None = None
        for host, port in self._known:
            client = redis.Redis(
                host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout, **self._auth
            )
            try:
                rows = client.execute_command("CLUSTER", "SLOTS")
            except (*REDIS_ERRORS, redis.ResponseError) as exc:
                error = exc
                continue
            finally:
                client.close()
            slot_map: list[Node | None] = [None] * _SLOTS
            nodes: list[Node] = []
            for start, end, master, *replicas in rows:
                node = (_text(master[0]) or host, int(master[1]))
                slot_map[start : end + 1] = [node] * (end + 1 - start)
                nodes.append(node)
                nodes.extend((_text(r[0]) or host, int(r[1])) for r in replicas)
            return slot_map, nodes
        raise ConnectionError(f"no Cluster node answered: {error}")

    def _pubsub_factory(self, node: Node):
        timeout = conf.get("OFFLOAD_REDIS_TIMEOUT")

        def connect() -> PubSub:
            client = redis.Redis(
                host=node[0],
                port=node[1],
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # a lost node is the hub's to report, not redis-py's to hide
                health_check_interval=30,
                client_name=f"offload-hub-{os.getpid()}",  # CLIENT LIST shows whose connection it is
                **self._auth,
            )
            return client.pubsub(ignore_subscribe_messages=False)

        return connect


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
