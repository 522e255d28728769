"""Presence on the real servers (issue 13): who is in a room, across workers and instances.

Two uWSGI instances of the demo share one redis-server, as two machines behind
a load balancer would: A with two workers, B with one. They share the secret
key and a copy of one database, so one session cookie works on both. A third
instance, R, shares the Redis for the reload storms (200 users). Presence
timings are short, set through the environment: heartbeat 0.5 s, lease 3 s,
grace 3 s, coalescing 0.2 s. Dead-peer detection is short too: a ping after
1 s of silence, dropped 1 s later. So the bounds below are seconds, not
minutes.

Every client is a real websocket of a real Django session, read by its own
thread, so that pings are answered while the test waits. A network drop is a
black hole in a TCP proxy (tests/integration/blackhole.py), not a clean close.
The storms use the selector swarm of test_resilience.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import websocket

from offload.testing import LiveServer, RedisServer, WaitTimeout, timeout_factor, wait_for
from tests.integration.blackhole import BlackHoleProxy
from tests.integration.demo import DemoServer
from tests.integration.instances import User, running_instances
from tests.integration.test_resilience import Subscriber, Swarm
from tests.integration.test_sse import SseClient

pytestmark = pytest.mark.timeout(300)

HEARTBEAT, LEASE_TTL, GRACE, COALESCE = 0.5, 3.0, 3.0, 0.2
PING_INTERVAL, PING_TIMEOUT = 1.0, 1.0
DEAD_PEER = PING_INTERVAL + PING_TIMEOUT  # silence after which a server drops a socket, at most
TIMINGS = {
    "OFFLOAD_PRESENCE_HEARTBEAT": str(HEARTBEAT),
    "OFFLOAD_PRESENCE_LEASE_TTL": str(LEASE_TTL),
    "OFFLOAD_PRESENCE_GRACE": str(GRACE),
    "OFFLOAD_PRESENCE_COALESCE": str(COALESCE),
    "OFFLOAD_PING_INTERVAL": str(PING_INTERVAL),
    "OFFLOAD_PING_TIMEOUT": str(PING_TIMEOUT),
}
STORM = 200  # users reconnecting together after a reload
R_LEASE_TTL = 5.0  # the storm instance's lease: a storm may keep a worker busy for a while
SLACK = 1.5  # seconds of scheduling and delivery on a busy 2-core machine, beyond each bound


# -- users and servers ---------------------------------------------------------------


@dataclass
class Cluster:
    a: DemoServer  # two workers
    b: DemoServer  # one worker
    r: DemoServer  # the storm instance: prepared, started by the storm tests
    redis: RedisServer
    users: dict[str, User]

    def user(self, n: int) -> User:
        return self.users[f"user{n:03}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    envs = {"a": {"WORKERS": "2"}, "b": {"WORKERS": "1"}, "r": {"WORKERS": "2"}}
    with running_instances(tmp_path_factory, envs, start=("a", "b"), users=STORM, env=TIMINGS) as running:
        redis, servers, users = running
        yield Cluster(servers["a"], servers["b"], servers["r"], redis, users)


def fresh_channel(kind: str) -> str:
    return f"room:{kind}-{uuid.uuid4().hex[:8]}"


# -- clients ------------------------------------------------------------------------------


class Client:
    """One websocket of one user, read by its own thread.

    The thread answers pings at once (the servers here drop a peer after 2 s
    of silence) and keeps every JSON message with its arrival time, for the
    test to wait on.
    """

    def __init__(self, url: str, user: User | None, origin: str) -> None:
        self.user = user
        self.ws = websocket.create_connection(
            url, timeout=10, origin=origin, cookie=user.cookie if user else None, enable_multithread=True
        )
        self.ws.sock.settimeout(None)  # the reader blocks until something comes
        self.local_port = self.ws.sock.getsockname()[1]
        self.messages: list[tuple[float, dict]] = []
        self.close_code: int | None = None
        self.ended = False
        self._cond = threading.Condition()
        self._refs = itertools.count()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data()  # pings are answered inside
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    return
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    message = json.loads(data)
                    with self._cond:
                        self.messages.append((time.monotonic(), message))
                        self._cond.notify_all()
        except (websocket.WebSocketException, OSError, ValueError):
            return
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    # -- waiting ------------------------------------------------------------------

    def wait(self, predicate: Callable[[dict], bool], timeout: float, what: str, start: int = 0) -> tuple[float, dict]:
        """The first message from index ``start`` on that satisfies ``predicate``, and when it came."""
        deadline = time.monotonic() + timeout * timeout_factor()
        with self._cond:
            while True:
                for arrived, message in self.messages[start:]:
                    if predicate(message):
                        return arrived, message
                remaining = deadline - time.monotonic()
                if self.ended or remaining <= 0:
                    state = "the connection ended" if self.ended else f"timed out after {timeout:.1f} s"
                    raise WaitTimeout(f"{state} waiting for {what}; got {[m for _, m in self.messages[start:]]}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        """Where the next message will be (for :meth:`wait` and :meth:`events`)."""
        with self._cond:
            return len(self.messages)

    def events(self, channel: str, start: int = 0) -> list[tuple[float, dict]]:
        """The presence events of ``channel`` received from index ``start`` on."""
        with self._cond:
            return [(t, m) for t, m in self.messages[start:] if m["type"] == "presence" and m["channel"] == channel]

    # -- commands -----------------------------------------------------------------

    def send(self, **command) -> None:
        self.ws.send(json.dumps(command))

    def request(self, timeout: float = 10, **command) -> dict:
        """Send a command with a fresh ``ref``; its reply (or error)."""
        ref = f"r{next(self._refs)}"
        start = self.mark()
        self.send(ref=ref, **command)
        return self.wait(lambda m: m.get("ref") == ref, timeout, f"the reply to {command}", start)[1]

    def subscribe(self, channel: str) -> None:
        reply = self.request(type="subscribe", channel=channel)
        assert reply["type"] == "subscribed", reply

    def members(self, channel: str, **options) -> dict:
        reply = self.request(type="members", channel=channel, **options)
        assert reply["type"] == "members", reply
        return reply

    def all_members(self, channel: str, limit: int = 100) -> tuple[list[str], int]:
        """Every member id, page after page (no duplicate, in order), and the last count."""
        ids: list[str] = []
        after = None
        while True:
            page = self.members(channel, limit=limit, **({"after": after} if after else {}))
            ids += [info["id"] for info in page["members"]]
            after = page["next"]
            if after is None:
                assert ids == sorted(set(ids)), f"pages repeat or disorder members: {ids}"
                return ids, page["count"]

    # -- the end ------------------------------------------------------------------

    def close(self) -> None:
        """A clean close: a close frame; the reader takes the server's answer."""
        try:
            self.ws.send_close()
        except (websocket.WebSocketException, OSError):
            pass
        self._thread.join(5)
        self.ws.shutdown()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        sock = self.ws.sock  # the reader sets it to None when it sees the end
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        self._thread.join(5)


def connect(server: LiveServer, user: User | None, *channels: str, via: int | None = None) -> Client:
    """A websocket of ``user`` on ``server`` (through the proxy on port ``via``), subscribed to ``channels``."""
    port = server.port if via is None else via
    client = Client(f"ws://127.0.0.1:{port}/ws/", user, server.base_url)
    for channel in channels:
        client.subscribe(channel)
    return client


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients a test opens; whatever is still open at its end is closed."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        if not client.ended:
            client.close()


# -- what an observer sees ----------------------------------------------------------------


def observe(server: LiveServer, user: User, channel: str, clients: list[Client]) -> tuple[Client, int]:
    """``user`` in ``channel`` on ``server``, once its own join came: the client, and where what follows starts."""
    observer = connect(server, user, channel)
    clients.append(observer)
    wait_joined(observer, channel, {user.member})
    return observer, observer.mark()


def joins_and_leaves(events: list[tuple[float, dict]]) -> tuple[Counter, Counter]:
    """How many times each member joined and left in these events (a reset lists nobody)."""
    joins, leaves = Counter(), Counter()
    for _, event in events:
        joins.update(info["id"] for info in event.get("joins", ()))
        leaves.update(event.get("leaves", ()))
    return joins, leaves


def wait_joined(observer: Client, channel: str, members: set[str], start: int = 0, timeout: float = 10) -> float:
    """Wait until ``observer`` saw every one of ``members`` join; when the last join came."""
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        for arrived, event in observer.events(channel, start):
            for info in event.get("joins", ()):
                seen.setdefault(info["id"], arrived)
        return members <= seen.keys()

    wait_for(all_seen, timeout, f"{observer.user.name} to see {sorted(members)} join")
    return max(seen[m] for m in members)


def wait_left(
    observer: Client, channel: str, members: set[str], start: int = 0, timeout: float = 10
) -> dict[str, float]:
    """Wait until ``observer`` saw every one of ``members`` leave; when each leave came."""
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        for arrived, event in observer.events(channel, start):
            for member in event.get("leaves", ()):
                seen.setdefault(member, arrived)
        return members <= seen.keys()

    wait_for(all_seen, timeout, f"{observer.user.name} to see {sorted(members)} leave")
    return {m: seen[m] for m in members}


def quiet(seconds: float) -> None:
    """Let the servers run for ``seconds``: a promise that nothing happens needs some time to be kept.

    Only for absences (no duplicate leave, no event at all); every presence
    waits on what clients observe.
    """
    time.sleep(seconds * timeout_factor())


def presence_key(channel: str, part: str) -> str:
    """A key of ``lua/presence.lua``'s model: m members, g grace periods, n leases per member, ..."""
    from offload.backend.presence_store import presence_keys

    return presence_keys(channel)["mgnilc".index(part)]


def in_grace(redis: RedisServer, channel: str, member: str) -> bool:
    return redis.client().zscore(presence_key(channel, "g"), member) is not None


def leases_holding(redis: RedisServer, channel: str, member: str) -> int:
    """How many workers (leases) hold ``member`` in ``channel``."""
    return int(redis.client().hget(presence_key(channel, "n"), member) or 0)


def worker_of(server: LiveServer, peer_port: int) -> int:
    """The pid of the worker that holds the server's side of the connection from ``peer_port``."""

    def holder() -> int | None:
        inodes = server.sockets_of([peer_port])
        for pid in server.worker_pids():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link[8:-1] in inodes and link.startswith("socket:["):
                    return pid
        return None

    return wait_for(holder, 10, f"the worker holding the connection from port {peer_port}")


# -- two instances, two workers -----------------------------------------------------------


def test_a_member_on_one_instance_is_seen_from_the_other_join_and_leave(cluster, clients):
    channel = fresh_channel("cross")
    alice, bob = cluster.users["alice"], cluster.users["bob"]
    on_b, start = observe(cluster.b, bob, channel, clients)  # a connection gets its own join too
    on_a = connect(cluster.a, alice, channel)
    clients.append(on_a)
    wait_joined(on_b, channel, {alice.member}, start)
    wait_joined(on_a, channel, {alice.member})
    (_, event), *_ = [(t, e) for t, e in on_b.events(channel, start) if e.get("joins")]
    assert event == {
        "type": "presence",
        "channel": channel,
        "count": 2,
        "joins": [{"id": alice.member, "user": alice.pk, "name": "alice"}],
        "leaves": [],
    }
    # And the other way round: alice on A sees bob, who was there first, in the listing.
    listing = on_a.members(channel)
    assert listing["count"] == 2 and listing["next"] is None
    assert sorted(listing["members"], key=lambda i: i["id"]) == sorted(
        [{"id": m.member, "user": m.pk, "name": m.name} for m in (alice, bob)], key=lambda i: i["id"]
    )

    start = on_a.mark()
    on_b.close()
    closed_at = time.monotonic()
    left = wait_left(on_a, channel, {bob.member}, start, timeout=GRACE + 5)[bob.member]
    assert left - closed_at >= GRACE - 0.1, "bob left before his grace period ended"
    (_, event), *more = on_a.events(channel, start)
    assert event == {"type": "presence", "channel": channel, "count": 1, "joins": [], "leaves": [bob.member]}
    assert not more
    print(f"\nclean close on B -> leave seen on A: {left - closed_at:.2f} s (grace {GRACE} s)")


def test_an_event_stream_is_a_member_and_gets_the_same_presence_events(cluster, clients):
    channel = fresh_channel("sse")
    alice, bob = cluster.users["alice"], cluster.users["bob"]
    stream = SseClient(cluster.b, f"/sse/?channel={channel}", {"Cookie": alice.cookie})
    try:
        stream.subscribed()
        cursor = stream.last_id
        own = stream.event(presence=True)
        assert own.pop("id") == cursor  # a notice is not in history: the resume cursor stays
        assert own == {
            "event": "presence",
            "data": {
                "type": "presence",
                "channel": channel,
                "count": 1,
                "joins": [{"id": alice.member, "user": alice.pk, "name": "alice"}],
                "leaves": [],
            },
        }
        on_a = connect(cluster.a, bob, channel)
        clients.append(on_a)
        event = stream.event(presence=True)
        assert event["data"]["joins"] == [{"id": bob.member, "user": bob.pk, "name": "bob"}]
        assert event["data"]["count"] == 2
        assert [info["id"] for info in on_a.members(channel)["members"]] == sorted([alice.member, bob.member])
    finally:
        stream.close()


def test_a_users_tabs_on_two_workers_and_two_instances_are_one_member(cluster, clients):
    channel = fresh_channel("tabs")
    carol, bob = cluster.users["carol"], cluster.users["bob"]
    observer, start = observe(cluster.b, carol, channel, clients)

    # bob's tabs: one on each worker of A, one on B.
    tabs: dict[int, Client] = {}
    spare: list[Client] = []
    while len(tabs) < 2 and len(spare) < 40:
        tab = connect(cluster.a, bob, channel)
        clients.append(tab)
        pid = worker_of(cluster.a, tab.local_port)
        if pid in tabs:
            spare.append(tab)
        else:
            tabs[pid] = tab
    assert len(tabs) == 2, f"{len(spare) + 1} connections, all accepted by one worker of A"
    for tab in spare:  # bob still has a tab on that worker: nothing changes
        tab.close()
    on_b = connect(cluster.b, bob, channel)
    clients.append(on_b)
    ordered = [*tabs.values(), on_b]

    wait_joined(observer, channel, {bob.member}, start)
    wait_for(
        lambda: leases_holding(cluster.redis, channel, bob.member) == 3, 5, "A's two workers and B's one to hold bob"
    )
    assert observer.members(channel)["count"] == 2

    # Closing tabs: only the last one makes bob leave, once, after the grace period.
    for remaining, tab in zip((2, 1), ordered[:2], strict=True):
        tab.close()
        wait_for(
            lambda n=remaining: leases_holding(cluster.redis, channel, bob.member) == n,
            5,
            f"{remaining} workers holding bob",
        )
        assert not in_grace(cluster.redis, channel, bob.member)
    ordered[2].close()
    closed_at = time.monotonic()
    wait_for(lambda: in_grace(cluster.redis, channel, bob.member), 5, "bob's grace period to start")
    left = wait_left(observer, channel, {bob.member}, start, timeout=GRACE + 5)[bob.member]
    assert left - closed_at >= GRACE - 0.1
    quiet(HEARTBEAT * 2 + COALESCE)
    joins, leaves = joins_and_leaves(observer.events(channel, start))
    assert (joins, leaves) == (Counter({bob.member: 1}), Counter({bob.member: 1}))
    assert observer.members(channel)["members"] == [{"id": carol.member, "user": carol.pk, "name": "carol"}]


# -- the grace period against a real network drop -----------------------------------------


@pytest.fixture
def proxy(cluster) -> Iterator[BlackHoleProxy]:
    """A TCP proxy in front of instance A."""
    hole = BlackHoleProxy(cluster.a.port)
    hole.start()
    yield hole
    hole.stop()


def drop(proxy: BlackHoleProxy, server: LiveServer) -> tuple[float, float]:
    """Black-hole every connection through ``proxy``; wait until ``server`` gives up on them.

    Returns:
        When the network dropped, and how long the server took to drop the sockets.
    """
    pairs = proxy.black_hole()
    dropped_at = time.monotonic()
    assert pairs
    wait_for(
        lambda: all(pair.server_closed_at for pair in pairs),
        DEAD_PEER + 5,
        "the server to drop the silent sockets as dead peers",
    )
    return dropped_at, max(pair.server_closed_at for pair in pairs) - dropped_at


def bob_behind_the_proxy(cluster: Cluster, proxy: BlackHoleProxy, clients: list[Client], kind: str):
    """carol watching on B, bob on A through the proxy, in a fresh channel; once she saw him join.

    Returns:
        The channel, carol's client and where its events start, bob's client.
    """
    channel = fresh_channel(kind)
    observer, start = observe(cluster.b, cluster.users["carol"], channel, clients)
    bob = connect(cluster.a, cluster.users["bob"], channel, via=proxy.port)
    clients.append(bob)
    wait_joined(observer, channel, {bob.user.member}, start)
    return channel, observer, start, bob


def test_a_client_that_reconnects_within_the_grace_period_after_a_network_drop_never_left(cluster, proxy, clients):
    channel, observer, start, first = bob_behind_the_proxy(cluster, proxy, clients, "grace")
    bob, carol = cluster.users["bob"], cluster.users["carol"]

    _, detected_in = drop(proxy, cluster.a)
    # The server dropped bob's only socket: he is in his grace period, not gone.
    wait_for(lambda: in_grace(cluster.redis, channel, bob.member), 5, "bob's grace period to start")
    assert not first.ended  # the client noticed nothing: no FIN, no RST
    again = connect(cluster.a, bob, channel, via=proxy.port)  # through the network, once it is back
    clients.append(again)
    wait_for(lambda: not in_grace(cluster.redis, channel, bob.member), 5, "bob to be back from his grace period")
    returned_at = time.monotonic()
    # Past the end of the grace period he would have had, nobody saw him go or come.
    quiet(GRACE + HEARTBEAT + COALESCE)
    joins, leaves = joins_and_leaves(observer.events(channel, start))
    assert joins == Counter({bob.member: 1}) and not leaves, observer.events(channel, start)
    assert [info["id"] for info in observer.members(channel)["members"]] == sorted([bob.member, carol.member])
    first.abort()
    print(
        f"\nblack hole: the server dropped the socket after {detected_in:.2f} s (pings 1 s + 1 s); "
        f"bob was back {returned_at - proxy.pairs[0].server_closed_at:.2f} s into his {GRACE} s grace period"
    )


def test_a_network_drop_without_reconnect_gives_one_leave_after_dead_peer_time_and_grace(cluster, proxy, clients):
    channel, observer, start, lost = bob_behind_the_proxy(cluster, proxy, clients, "drop")
    bob = cluster.users["bob"]

    dropped_at, detected_in = drop(proxy, cluster.a)
    server_dropped_at = dropped_at + detected_in
    left = wait_left(observer, channel, {bob.member}, start, timeout=DEAD_PEER + GRACE + 5)[bob.member]
    assert left - server_dropped_at >= GRACE - 0.1, "the leave came before the grace period ended"
    assert left - dropped_at <= DEAD_PEER + GRACE + HEARTBEAT + COALESCE + SLACK
    quiet(HEARTBEAT * 2 + COALESCE)
    joins, leaves = joins_and_leaves(observer.events(channel, start))
    assert leaves == Counter({bob.member: 1}) and joins == Counter({bob.member: 1})
    assert observer.members(channel)["count"] == 1
    lost.abort()
    print(
        f"\nnetwork drop: leave seen {left - dropped_at:.2f} s after the drop "
        f"(dead peer {detected_in:.2f} s + grace {GRACE} s)"
    )


# -- a worker SIGKILLed ----------------------------------------------------------------------


def test_the_members_of_a_sigkilled_worker_leave_within_the_bound_once_each(cluster, clients):
    channel = fresh_channel("kill")
    carol = cluster.users["carol"]
    observer, start = observe(cluster.b, carol, channel, clients)
    users = [cluster.user(n) for n in range(8)]
    on_a = [connect(cluster.a, user, channel) for user in users]
    clients.extend(on_a)
    by_worker: dict[int, set[str]] = {}
    for client in on_a:
        by_worker.setdefault(worker_of(cluster.a, client.local_port), set()).add(client.user.member)
    wait_joined(observer, channel, {u.member for u in users}, start)
    victim = max(by_worker, key=lambda pid: len(by_worker[pid]))
    doomed = by_worker[victim]
    survivors = {u.member for u in users} - doomed

    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    bound = LEASE_TTL + GRACE + HEARTBEAT  # docs: a dead worker's members leave within it
    left = wait_left(observer, channel, doomed, start, timeout=bound + SLACK + 5)
    slowest = max(left.values()) - killed_at
    quiet(HEARTBEAT * 2 + COALESCE)
    joins, leaves = joins_and_leaves(observer.events(channel, start))
    assert leaves == Counter(dict.fromkeys(doomed, 1)), f"not one leave each for {sorted(doomed)}: {leaves}"
    assert joins == Counter(dict.fromkeys([*doomed, *survivors], 1))
    assert min(left.values()) - killed_at >= GRACE - 0.1, "the killed worker's members skipped their grace period"
    assert slowest <= bound + COALESCE + SLACK, f"the last leave came {slowest:.2f} s after the kill (bound {bound})"
    ids, count = observer.all_members(channel)
    assert ids == sorted(survivors | {carol.member}) and count == len(ids)
    print(
        f"\nSIGKILL of a worker holding {len(doomed)} of {len(users)} members: leaves seen on the other instance "
        f"{min(left.values()) - killed_at:.2f}-{slowest:.2f} s after the kill "
        f"(bound lease {LEASE_TTL} + grace {GRACE} + heartbeat {HEARTBEAT} = {bound} s)"
    )
    wait_for(lambda: len(p := cluster.a.worker_pids()) == 2 and victim not in p, 20, "A's master to respawn the worker")


# -- queries ------------------------------------------------------------------------------------


@pytest.fixture
def python_api(settings, cluster) -> None:
    """offload.presence() and presence_count() in this process, on the cluster's Redis."""
    from offload.backend import redis_client

    settings.OFFLOAD_REDIS_URL = cluster.redis.url
    redis_client.reset()
    yield
    redis_client.reset()


def test_a_paginated_listing_and_the_count_over_the_websocket_and_from_python(cluster, clients, python_api):
    import offload

    channel = fresh_channel("list")
    users = [cluster.user(n) for n in range(25)]
    for n, user in enumerate(users):  # on both instances, all three workers
        clients.append(connect(cluster.a if n % 2 else cluster.b, user, channel))
    expected = sorted(u.member for u in users)
    wait_for(lambda: offload.presence_count(channel) == 25, 10, "25 members")
    infos = {u.member: {"id": u.member, "user": u.pk, "name": u.name} for u in users}

    asker = clients[0]
    pages, after = [], None
    for _ in range(3):
        page = asker.members(channel, limit=10, **({"after": after} if after else {}))
        assert page["count"] == 25 and page["channel"] == channel
        pages.append(page["members"])
        after = page["next"]
    assert [len(p) for p in pages] == [10, 10, 5] and after is None
    assert [info["id"] for p in pages for info in p] == expected  # in id order: no duplicate, no gap
    assert [info for p in pages for info in p] == [infos[m] for m in expected]
    assert pages[0][-1]["id"] == asker.members(channel, limit=10)["next"]

    py_pages, after = [], None
    while True:
        page = offload.presence(channel, after=after, limit=10)
        assert page.count == 25
        py_pages.append(page.members)
        after = page.next
        if after is None:
            break
    assert [[name for name, _ in p] for p in py_pages] == [[i["id"] for i in p] for p in pages]
    assert [info for p in py_pages for _, info in p] == [infos[m] for m in expected]
    assert offload.presence_count(channel) == 25

    # Counts only (limit 0), from a user who may subscribe but did not.
    outsider = connect(cluster.b, cluster.users["alice"])
    clients.append(outsider)
    assert outsider.members(channel, limit=0) == {
        "type": "members",
        "ref": outsider.messages[-1][1]["ref"],
        "channel": channel,
        "count": 25,
        "members": [],
        "next": None,
    }
    gone = clients[:5]
    for client in gone:
        client.close()
    wait_for(lambda: offload.presence_count(channel) == 20, GRACE + 5, "five members to leave")
    remaining = sorted(set(expected) - {c.user.member for c in gone})
    assert outsider.all_members(channel, limit=7) == (remaining, 20)
    assert [name for name, _ in offload.presence(channel, limit=1000).members] == remaining


@pytest.mark.parametrize(
    "command, code",
    [
        ({"channel": "public:news"}, "presence_disabled"),
        ({"channel": "stats:workers"}, "presence_disabled"),
        ({"channel": "user:ALICE"}, "forbidden"),  # bob may not subscribe to alice's channel
        ({"channel": "staff:x"}, "forbidden"),
        ({"channel": "nope:x"}, "unknown_namespace"),
        ({"channel": "room:a b"}, "invalid_channel"),
        ({"channel": "room:general", "limit": -1}, "bad_message"),
        ({"channel": "room:general", "limit": "10"}, "bad_message"),
        ({"channel": "room:general", "limit": True}, "bad_message"),
        ({"channel": "room:general", "limit": 1.5}, "bad_message"),
        ({"channel": "room:general", "after": ""}, "bad_message"),
        ({"channel": "room:general", "after": 7}, "bad_message"),
        ({"channel": "room:general", "after": "a b"}, "bad_message"),
        ({"channel": "room:general", "after": "x" * 81}, "bad_message"),
        ({}, "bad_message"),
    ],
)
def test_refused_members_queries(cluster, clients, command, code):
    bob = connect(cluster.a, cluster.users["bob"])
    clients.append(bob)
    if command.get("channel") == "user:ALICE":
        command = {"channel": f"user:{cluster.users['alice'].pk}"}
    reply = bob.request(type="members", **command)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert bob.request(type="ping")["type"] == "pong"  # the connection goes on


def test_an_anonymous_client_may_not_list_a_room(cluster, clients):
    anonymous = connect(cluster.b, None)
    clients.append(anonymous)
    reply = anonymous.request(type="members", channel="room:general")
    assert (reply["type"], reply["code"], reply["channel"]) == ("error", "forbidden", "room:general"), reply


def test_the_python_api_refuses_a_namespace_without_presence(python_api):
    import offload

    for call in (offload.presence, offload.presence_count):
        with pytest.raises(offload.ChannelError) as refused:
            call("public:news")
        assert refused.value.code == "presence_disabled"


# -- storms: a reload of an instance with 200 users ----------------------------------------------


@dataclass(eq=False)
class TokenSubscriber(Subscriber):
    """A swarm subscriber that connects as its user, with a connection token."""

    token: str = ""

    def path(self) -> str:
        return f"{super().path()}&token={self.token}"


@pytest.fixture
def instance_r(cluster) -> Iterator[Callable[[str | None], LiveServer]]:
    """Starts R with a grace period (None: the default, 10 s) and coalescing over the default 0.5 s."""
    r = cluster.r

    def start(grace: str | None) -> LiveServer:
        for name in ("OFFLOAD_PRESENCE_GRACE", "OFFLOAD_PRESENCE_COALESCE"):
            r.env.pop(name, None)
        r.env.update({"OFFLOAD_PRESENCE_LEASE_TTL": str(R_LEASE_TTL), "OFFLOAD_PRESENCE_HEARTBEAT": "1"})
        if grace is not None:
            r.env["OFFLOAD_PRESENCE_GRACE"] = grace
        return r.start()

    yield start
    r.stop()


@pytest.fixture
def swarm_of() -> Iterator[Callable[[LiveServer, str, list[User]], tuple[Swarm, list[TokenSubscriber]]]]:
    """Users subscribed to a channel from the selector swarm (reconnecting like offload.js)."""
    swarms: list[Swarm] = []

    def start(server: LiveServer, channel: str, users: list[User]) -> tuple[Swarm, list[TokenSubscriber]]:
        subs = [TokenSubscriber(n, channel, token=user.token) for n, user in enumerate(users)]
        swarm = Swarm(server.port, subs)
        swarms.append(swarm)
        swarm.start()
        wait_for(swarm.all_live, 60, f"{len(users)} users subscribed")
        return swarm, subs

    yield start
    for swarm in swarms:
        swarm.stop()


def reload(server: LiveServer, subs: list[TokenSubscriber], swarm: Swarm) -> dict:
    """SIGHUP to the master: every socket closed with 1012, new workers, everyone back."""
    old = server.worker_pids()
    hup_at = time.monotonic()
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: all(any(t >= hup_at for t, _ in s.closes) for s in subs), 10, "every socket closed by the reload")
    codes = Counter(code for s in subs for t, code in s.closes if t >= hup_at)
    server.wait_for_new_workers(old, 30)
    wait_for(swarm.all_live, 60, "every user back after the reload")
    return {"codes": dict(codes), "back_in_s": round(time.monotonic() - hup_at, 2)}


def wait_settled(cluster: Cluster, channel: str, members: int) -> None:
    """Redis holds exactly ``members`` members of ``channel``, none in a grace period."""
    client = cluster.redis.client()

    def settled() -> bool:
        return client.zcard(presence_key(channel, "m")) == members and client.zcard(presence_key(channel, "g")) == 0

    wait_for(settled, 30, f"{members} members of {channel} and no grace period in Redis")


def storm_users(cluster: Cluster) -> list[User]:
    return [cluster.user(n) for n in range(STORM)]


def test_a_reload_within_the_default_grace_period_makes_no_presence_event(cluster, clients, instance_r, swarm_of):
    channel = fresh_channel("reload-grace")
    carol = cluster.users["carol"]
    observer, _ = observe(cluster.b, carol, channel, clients)
    r = instance_r(None)
    swarm, subs = swarm_of(r, channel, storm_users(cluster))
    expected = sorted({carol.member} | {u.member for u in storm_users(cluster)})
    wait_settled(cluster, channel, STORM + 1)
    quiet(1.0)  # the joins' last window (0.5 s) is announced
    start = observer.mark()

    measured = reload(r, subs, swarm)
    assert measured["codes"] == {1012: STORM}, measured
    wait_settled(cluster, channel, STORM + 1)
    quiet(1.0 + HEARTBEAT * 2)
    events = observer.events(channel, start)
    assert events == [], f"{len(events)} presence events for a reload within the grace period: {events[:3]}"
    assert observer.all_members(channel) == (expected, STORM + 1)
    print(f"\nreload of R with {STORM} users, grace 10 s: {measured}; 0 presence events on B")


def test_a_reload_without_grace_is_a_handful_of_coalesced_events_that_converge(cluster, clients, instance_r, swarm_of):
    channel = fresh_channel("reload-storm")
    carol = cluster.users["carol"]
    observer, _ = observe(cluster.b, carol, channel, clients)
    r = instance_r("0")
    swarm, subs = swarm_of(r, channel, storm_users(cluster))
    expected = sorted({carol.member} | {u.member for u in storm_users(cluster)})
    wait_settled(cluster, channel, STORM + 1)
    quiet(1.0)
    start = observer.mark()
    before, _ = observer.all_members(channel)
    assert before == expected

    measured = reload(r, subs, swarm)
    wait_settled(cluster, channel, STORM + 1)
    quiet(1.0 + HEARTBEAT * 2)
    events = observer.events(channel, start)
    # What a client does with them: apply joins and leaves, read the list again after a reset.
    view = set(before)
    for _, event in events:
        if event.get("reset"):
            view = set(observer.all_members(channel)[0])
        else:
            view |= {info["id"] for info in event["joins"]}
            view -= set(event["leaves"])
    kinds = Counter("reset" if e.get("reset") else "listed" for _, e in events)
    print(f"\nreload of R with {STORM} users, grace 0: {measured}; {len(events)} presence events on B {dict(kinds)}")
    assert measured["codes"] == {1012: STORM}, measured
    assert 1 <= len(events) <= 10, f"{len(events)} presence events for one reload"
    assert sorted(view) == expected
    assert observer.all_members(channel) == (expected, STORM + 1)


def test_without_grace_a_close_is_a_leave_at_once_and_a_stopped_instance_leaves_once_each(cluster, clients, instance_r):
    channel = fresh_channel("stop")
    carol = cluster.users["carol"]
    observer, start = observe(cluster.b, carol, channel, clients)
    r = instance_r("0")
    users = [cluster.user(n) for n in range(6)]
    on_r = [connect(r, user, channel) for user in users]
    clients.extend(on_r)
    wait_joined(observer, channel, {u.member for u in users}, start)

    on_r[0].close()
    closed_at = time.monotonic()
    latency = wait_left(observer, channel, {users[0].member}, start)[users[0].member] - closed_at

    stopping_at = time.monotonic()
    r.stop()  # SIGTERM: the workers let go of their members as they stop
    rest = {u.member for u in users[1:]}
    left = wait_left(observer, channel, rest, start, timeout=R_LEASE_TTL + GRACE + HEARTBEAT + 5)
    # Let go at once, not found out after R's lease expired (and then after a sweeper's grace period).
    assert max(left.values()) - stopping_at < R_LEASE_TTL, f"leaves {max(left.values()) - stopping_at:.2f} s after"
    quiet(HEARTBEAT * 2 + COALESCE)
    joins, leaves = joins_and_leaves(observer.events(channel, start))
    assert leaves == Counter(dict.fromkeys([u.member for u in users], 1)), leaves
    assert joins == Counter(dict.fromkeys([u.member for u in users], 1)), joins
    assert observer.all_members(channel) == ([carol.member], 1)
    print(
        f"\ngrace 0: a clean close on R -> leave seen on B in {latency:.2f} s (coalescing 0.5 s); "
        f"R stopped -> {len(rest)} leaves within {max(left.values()) - stopping_at:.2f} s"
    )
