"""Real Redis topologies for tests: a local Redis Cluster, and a Sentinel-watched master with a replica.

Both start real ``redis-server`` processes on free ports in a temporary
directory, wait until they are usable (``cluster_state:ok``; the sentinels
know the replica and each other), and kill every process they started on
:meth:`stop`. Failures are caused the way production sees them: a SIGKILLed
master, ``SENTINEL FAILOVER``, a slot migrated with ``MIGRATE``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .servers import redis_server_binary
from .waiting import free_port, wait_for

__all__ = ["LocalRedisCluster", "LocalRedisSentinel", "use_redis"]

_HOST = "127.0.0.1"
_MISSING = object()


@contextlib.contextmanager
def use_redis(url: str, namespaces: dict[str, dict] | None = None) -> Iterator[None]:
    """Point this process's offload at ``url`` (e.g. a cluster's :attr:`LocalRedisCluster.url`), and back after.

    Sets Django's ``OFFLOAD_REDIS_URL`` (plus ``namespaces`` added to
    ``OFFLOAD_NAMESPACES``) and drops the cached settings, policies and Redis
    clients on the way in and out.
    """
    from django.conf import settings

    from .. import conf, policies
    from ..backend import redis_client

    names = ("OFFLOAD_REDIS_URL", "OFFLOAD_NAMESPACES")
    saved: dict[str, Any] = {name: getattr(settings, name, _MISSING) for name in names}

    def refresh() -> None:
        conf.reset()
        policies.reset_cache()
        redis_client.reset()

    settings.OFFLOAD_REDIS_URL = url
    if namespaces:
        settings.OFFLOAD_NAMESPACES = {**conf.get("OFFLOAD_NAMESPACES"), **namespaces}
    refresh()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                delattr(settings, name)
            else:
                setattr(settings, name, value)
        refresh()


def _redis(port: int, timeout: float = 2, **tls: Any):
    import redis

    return redis.Redis(host=_HOST, port=port, socket_timeout=timeout, socket_connect_timeout=timeout, **tls)


class LocalTls:
    """A throwaway CA and a certificate for 127.0.0.1 (made with ``openssl``), for TLS-only test servers.

    ``redis-server`` is given :meth:`server_args`; clients trust the CA through
    :attr:`client_options` (redis-py) or :attr:`query` (an ``OFFLOAD_REDIS_URL``).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca, self.cert, self.key = (self.dir / name for name in ("ca.crt", "server.crt", "server.key"))
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
        self._openssl("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={_HOST}")
        (self.dir / "san.ext").write_text(f"subjectAltName=IP:{_HOST}\n")
        self._openssl(
            "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
        )  # fmt: skip

    def _openssl(self, *args: str) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("no openssl found: apt-get install openssl")
        subprocess.run([openssl, *args], cwd=self.dir, check=True, capture_output=True, timeout=60)

    def server_args(self) -> list[str]:
        """TLS for clients (no client certificates asked) and for replication."""
        return [
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        ]  # fmt: skip

    @property
    def client_options(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca)}

    @property
    def query(self) -> str:
        return f"?ssl_ca_certs={self.ca}"


def _as_dict(reply) -> dict:
    """A SENTINEL reply as a dict (redis-py parses some, returns others as flat lists)."""
    return reply if isinstance(reply, dict) else dict(zip(*[iter(reply)] * 2, strict=True))


class _Processes:
    """redis-server processes by port, in one temporary directory."""

    def __init__(self, directory: Path | None, prefix: str, tls: bool = False) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix=prefix))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[int, subprocess.Popen] = {}
        self.args: dict[int, list[str]] = {}
        self.tls = LocalTls(self.dir / "tls") if tls else None  # the nodes speak only TLS

    def url(self, kind: str, ports: list[int], path: str) -> str:
        """The ``OFFLOAD_REDIS_URL`` of a ``kind`` ("cluster", "sentinel") reached at ``ports``:
        ``rediss+`` trusting the throwaway CA when the nodes speak TLS."""
        hosts = ",".join(f"{_HOST}:{port}" for port in ports)
        return f"rediss+{kind}://{hosts}/{path}{self.tls.query}" if self.tls else f"redis+{kind}://{hosts}/{path}"

    def client(self, port: int, timeout: float = 2):
        """A ``redis.Redis`` to the node on ``port`` (over TLS if the nodes speak it)."""
        return _redis(port, timeout, **(self.tls.client_options if self.tls else {}))

    def port_args(self, port: int) -> list[str]:
        """redis-server's arguments for listening on ``port``: plain, or TLS only."""
        if self.tls is None:
            return ["--port", str(port)]
        return ["--port", "0", "--tls-port", str(port), *self.tls.server_args()]

    def spawn(self, port: int, *args: str) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        argv = [redis_server_binary(), *args]
        self.args[port] = argv
        self.procs[port] = subprocess.Popen(argv, cwd=node_dir)

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait until the process is gone."""
        if self.signal(port, sig):
            self.procs[port].wait(10)

    def signal(self, port: int, sig: int) -> bool:
        """Send ``sig`` if the process lives; whether it did."""
        proc = self.procs[port]
        if proc.poll() is not None:
            return False
        proc.send_signal(sig)
        return True

    def restart(self, port: int) -> None:
        """Start a killed node again with its arguments (a cluster node keeps its nodes.conf)."""
        self.kill(port)
        self.procs[port] = subprocess.Popen(self.args[port], cwd=self.dir / str(port))
        wait_for(lambda: self.client(port, 1).ping(), 10, f"redis-server on {port}")

    def stop(self) -> None:
        for port in list(self.procs):
            proc = self.procs[port]
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalRedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on 127.0.0.1.

    Args:
        masters: at least 3 (what ``redis-cli --cluster create`` accepts).
        replicas: replicas per master.
        node_timeout_ms: ``cluster-node-timeout``; a killed master's replica
            takes over about this long after the kill.
        directory: where the nodes keep their files (default: a new temp dir).
        tls: every node speaks only TLS (clients, replication and the cluster bus), with a
            throwaway CA (:class:`LocalTls`); :attr:`url` is then ``rediss+cluster://`` trusting it.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        directory: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._procs = _Processes(directory, "offload-cluster-", tls)
        self.ports: list[int] = []

    @property
    def dir(self) -> Path:
        return self._procs.dir

    @property
    def url(self) -> str:
        """``OFFLOAD_REDIS_URL`` for this cluster (every node a seed)."""
        return self._procs.url("cluster", self.ports, "")

    def start(self) -> LocalRedisCluster:
        ports: set[int] = set()
        while len(ports) < 2 * self.masters * (1 + self.replicas):
            ports.add(free_port())
        ordered = sorted(ports)
        count = self.masters * (1 + self.replicas)
        self.ports, bus_ports = ordered[:count], ordered[count:]
        for port, bus in zip(self.ports, bus_ports, strict=True):
            tls_bus = ["--tls-cluster", "yes"] if self._procs.tls else []
            self._procs.spawn(
                port,
                *self._procs.port_args(port),
                *tls_bus,
                "--bind", _HOST,
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync-delay", "0",
                "--dir", str(self.dir / str(port)),
                "--save", "",
                "--appendonly", "no",
                "--logfile", "redis.log",
            )  # fmt: skip
        for port in self.ports:
            wait_for(lambda port=port: self._procs.client(port, 1).ping(), 10, f"cluster node {port}")
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("no redis-cli found: apt-get install redis-tools")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"{_HOST}:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
                *(["--tls", "--cacert", str(self._procs.tls.ca)] if self._procs.tls else []),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()
        return self

    def node(self, port: int):
        """A ``redis.Redis`` to one node (CLUSTER commands, KEYSLOT, INFO)."""
        return self._procs.client(port)

    def live_ports(self) -> list[int]:
        return [p for p in self.ports if self._procs.alive(p)]

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says ``cluster_state:ok`` and agrees on the slot map, and every replica is in sync."""

        def ok() -> bool:
            views = set()
            for port in self.live_ports():
                node = self.node(port)
                if node.cluster("info").get("cluster_state") != "ok":
                    return False
                views.add(tuple(sorted((start, end, addr) for start, end, addr in self._slot_table(node))))
            return len(views) == 1

        wait_for(ok, timeout, "cluster_state:ok on every node")

        def replicas_in_sync() -> bool:
            for port in self.live_ports():
                info = self.node(port).info("replication")
                if info["role"] == "slave" and info["master_link_status"] != "up":
                    return False
            return True

        wait_for(replicas_in_sync, timeout, "every replica in sync with its master")

    @staticmethod
    def _slot_table(node) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) from CLUSTER SLOTS."""
        return [(int(r[0]), int(r[1]), int(r[2][1])) for r in node.execute_command("CLUSTER", "SLOTS")]

    def master_ports(self) -> list[int]:
        """The ports of the live masters that serve slots."""
        node = self.node(self.live_ports()[0])
        return sorted({port for _, _, port in self._slot_table(node)})

    def keyslot(self, key: str) -> int:
        return int(self.node(self.live_ports()[0]).execute_command("CLUSTER", "KEYSLOT", key))

    def master_of_slot(self, slot: int) -> int:
        for first, last, port in self._slot_table(self.node(self.live_ports()[0])):
            if first <= slot <= last:
                return port
        raise LookupError(f"no node serves slot {slot}")

    def replica_ports(self, port: int) -> list[int]:
        """The ports of the replicas of the master on ``port``."""
        lines = self.node(port).execute_command("CLUSTER", "REPLICAS", self.node_id(port))
        return [int(line.split()[1].decode().split("@")[0].rsplit(":", 1)[1]) for line in lines]

    def node_id(self, port: int) -> str:
        return self.node(port).execute_command("CLUSTER", "MYID").decode()

    def kill_master(self, port: int, timeout: float = 30, during: Callable[[], object] | None = None) -> int:
        """SIGKILL the master on ``port`` and wait until its replica took over; return the new master's port.

        ``during`` is called right after the kill, while the shard has no master.
        """
        slots = [(first, last) for first, last, p in self._slot_table(self.node(port)) if p == port]
        if not slots:
            raise ValueError(f"{port} serves no slot")
        self._procs.kill(port)
        if during is not None:
            during()

        def promoted() -> int | None:
            new = self.master_of_slot(slots[0][0])
            return new if new != port else None

        new_port = wait_for(promoted, timeout, f"a replica of {port} promoted")
        self.wait_ok(timeout)
        return new_port

    def restart(self, port: int) -> None:
        """Start a killed node again (it rejoins as a replica of whoever took its slots)."""
        self._procs.restart(port)
        self.wait_ok()

    def migrate_slot(self, slot: int, to_port: int, batch: int = 100) -> int:
        """Move ``slot`` with its keys to the master on ``to_port`` (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE).

        Returns: how many keys moved.
        """
        from_port = self.master_of_slot(slot)
        if from_port == to_port:
            return 0
        source, target = self.node(from_port), self.node(to_port)
        source_id, target_id = self.node_id(from_port), self.node_id(to_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            source.execute_command("MIGRATE", _HOST, to_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        # the target first, then the source, then every other master (the order the Redis docs give)
        target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.master_ports():
            if port not in (from_port, to_port):
                self.node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(lambda: self.master_of_slot(slot) == to_port, 10, f"slot {slot} served by {to_port}")
        return moved

    def flushall(self) -> None:
        for port in self.master_ports():
            self.node(port).flushall()

    def stop(self) -> None:
        """Kill every node and remove the directory."""
        self._procs.stop()


class LocalRedisSentinel:
    """One master, one replica and three sentinels (quorum 2) watching service ``service``, on 127.0.0.1.

    Args:
        service: the service name the sentinels monitor (the URL's path).
        down_after_ms: ``down-after-milliseconds``: how long a dead master is
            waited for before the failover starts.
        directory: where the servers keep their files (default: a new temp dir).
        tls: the master and the replica speak only TLS (to clients, to each other and to the
            sentinels, which stay plain themselves), with a throwaway CA (:class:`LocalTls`);
            :attr:`url` is then ``rediss+sentinel://`` trusting it.
    """

    def __init__(
        self, service: str = "offload", down_after_ms: int = 1000, directory: Path | None = None, tls: bool = False
    ) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self._procs = _Processes(directory, "offload-sentinel-", tls)
        self.data_ports: list[int] = []
        self.sentinel_ports: list[int] = []

    @property
    def dir(self) -> Path:
        return self._procs.dir

    @property
    def url(self) -> str:
        """``OFFLOAD_REDIS_URL`` for this service."""
        return self._procs.url("sentinel", self.sentinel_ports, self.service)

    def start(self) -> LocalRedisSentinel:
        ports: set[int] = set()
        while len(ports) < 5:
            ports.add(free_port())
        master, replica, *sentinels = sorted(ports)
        self.data_ports, self.sentinel_ports = [master, replica], sentinels
        for port in self.data_ports:
            extra = ["--replicaof", _HOST, str(master)] if port == replica else []
            self._procs.spawn(
                port,
                *self._procs.port_args(port),
                "--bind", _HOST,
                "--dir", str(self.dir / str(port)),
                "--save", "",
                "--appendonly", "no",
                "--logfile", "redis.log",
                "--repl-diskless-sync-delay", "0",
                *extra,
            )  # fmt: skip
        for port in self.data_ports:
            wait_for(lambda port=port: self.node(port).ping(), 10, f"redis-server on {port}")
        wait_for(lambda: self.node(replica).info("replication")["master_link_status"] == "up", 10, "replica in sync")
        tls = self._procs.tls
        # the sentinels listen plain and speak TLS to the data nodes
        tls_conf = (
            f"tls-replication yes\ntls-cert-file {tls.cert}\ntls-key-file {tls.key}\ntls-ca-cert-file {tls.ca}\n"
            if tls
            else ""
        )
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {_HOST}\ndir {self.dir}\nlogfile sentinel-{port}.log\n"
                f"sentinel monitor {self.service} {_HOST} {master} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                f"sentinel parallel-syncs {self.service} 1\n" + tls_conf
            )
            self._procs.spawn(port, str(conf), "--sentinel")
        self.wait_ready()
        return self

    def sentinel(self, port: int | None = None):
        """A ``redis.Redis`` to one sentinel (the first live one by default)."""
        if port is None:
            port = next(p for p in self.sentinel_ports if self._procs.alive(p))
        return _redis(port)

    def master_port(self) -> int:
        """The master's port, as the sentinels report it."""
        _host, port = self.sentinel().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def replica_port(self) -> int:
        master = self.master_port()
        return next(p for p in self.data_ports if p != master)

    def node(self, port: int):
        """A ``redis.Redis`` to a data node (over TLS if they speak it)."""
        return self._procs.client(port)

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every sentinel knows the master, one live replica and the two other sentinels."""

        def ready() -> bool:
            for port in self.sentinel_ports:
                s = _redis(port)
                state = _as_dict(s.execute_command("SENTINEL", "MASTER", self.service))
                if int(state[b"num-other-sentinels"]) != 2 or int(state[b"num-slaves"]) < 1:
                    return False
                replicas = s.execute_command("SENTINEL", "REPLICAS", self.service)
                flags = [_as_dict(r)[b"flags"] for r in replicas]
                if not any(f == b"slave" for f in flags):
                    return False
            return True

        wait_for(ready, timeout, "sentinels ready")

    def failover(self, kill: bool = True, timeout: float = 30) -> int:
        """Fail over to the replica: SIGKILL the master (``kill``), else ``SENTINEL FAILOVER``.

        Returns: the new master's port, once the sentinels report it and it answers as a master.
        """
        old = self.master_port()
        if kill:
            self._procs.kill(old)
            for port in self.data_ports:  # a replica frozen by pause() must answer to be promoted
                self.resume(port)
        else:
            self.sentinel().execute_command("SENTINEL", "FAILOVER", self.service)

        def promoted() -> int | None:
            port = self.master_port()
            if port == old or self.node(port).info("replication")["role"] != "master":
                return None
            # GET-MASTER-ADDR-BY-NAME names the promoted replica while the failover still runs; clients
            # (redis-py's discover_master) read SENTINEL MASTER, which names it only once it is over.
            for sentinel_port in filter(self._procs.alive, self.sentinel_ports):
                state = _as_dict(_redis(sentinel_port).execute_command("SENTINEL", "MASTER", self.service))
                if int(state[b"port"]) != port or state[b"flags"] != b"master":
                    return None
            return port

        return wait_for(promoted, timeout, "the sentinels promoted the replica")

    def pause(self, port: int) -> None:
        """Freeze a data node (SIGSTOP): it stops reading its replication link, as a stalled replica does."""
        self._procs.signal(port, signal.SIGSTOP)

    def resume(self, port: int) -> None:
        """Thaw a node :meth:`pause` froze (SIGCONT)."""
        self._procs.signal(port, signal.SIGCONT)

    def restart(self, port: int, timeout: float = 60) -> None:
        """Start a killed data node again and wait until the sentinels made it an in-sync replica.

        The sentinels notice it at their next INFO round (every 10 s), then it syncs: on a loaded
        machine that took more than 30 s once.
        """
        self._procs.restart(port)

        def in_sync() -> bool:
            info = self.node(port).info("replication")
            return info["role"] == "slave" and info["master_link_status"] == "up"

        wait_for(in_sync, timeout, f"{port} a replica in sync again")
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Kill every server and sentinel, and remove the directory."""
        self._procs.stop()
