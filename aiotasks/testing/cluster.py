"""A Redis Cluster and a Sentinel setup on loopback, owned by the code that starts them
(tests, `make bench`), built from OwnServer processes.

    with OwnCluster(masters=3, replicas=1) as cluster:   # cluster_state:ok, replicas synced
        cluster.url            # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...
        cluster.master_of(key) # the OwnServer serving the key's slot
        cluster.kill(server)   # SIGKILL; its replica takes over within the node timeout

    with OwnSentinel() as s:   # a primary, a replica and one Sentinel (quorum 1)
        s.url                  # redis+sentinel://127.0.0.1:<sentinel port>/aiotasks
        s.kill_primary()       # SIGKILL; the Sentinel promotes the replica
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

import redis

from .server import Owned, OwnServer, _free_port, server_binary

SLOTS = 16384
_HOST = "127.0.0.1"


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too."""
    return _free_port(bus_offset=10_000)


def supports_cluster(binary: str | None = None) -> bool:
    """Whether the server binary starts in cluster mode (Redis and Valkey do; a build
    without it refuses the option)."""
    try:
        config = {"cluster-enabled": "yes"}
        with OwnServer(binary, _cluster_port(), config=config, start_timeout=5):
            return True
    except (RuntimeError, OSError):
        return False


def _wait(what: str, check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not happen within {timeout:g} s ({last})")


class OwnCluster(Owned):
    """`masters` masters sharing the slots evenly, each with `replicas` replicas."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 2000) -> None:
        self.binary = server_binary()
        config = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": str(node_timeout_ms),
            # A replica may take over however long it was cut off: the drills kill masters.
            "cluster-replica-validity-factor": "0",
        }
        self.masters = [
            OwnServer(self.binary, _cluster_port(), config=config) for _ in range(masters)
        ]
        self.replicas = [
            OwnServer(self.binary, _cluster_port(), config=config)
            for _ in range(masters * replicas)
        ]
        self.servers = self.masters + self.replicas

    @property
    def url(self) -> str:
        """A cluster URL listing every node (a client needs any one that answers)."""
        return "redis+cluster://" + ",".join(f"{_HOST}:{s.port}" for s in self.servers)

    def client(self, server: OwnServer) -> redis.Redis:
        return redis.Redis(host=_HOST, port=server.port, socket_timeout=5)

    def start(self) -> Self:
        with self.stopped_on_error():
            for s in self.servers:
                s.start()
            self._build()
        return self

    def _build(self) -> None:
        n = len(self.masters)
        ids = {}
        for i, m in enumerate(self.masters):
            first, last = i * SLOTS // n, (i + 1) * SLOTS // n - 1
            with self.client(m) as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
                ids[m.port] = c.execute_command("CLUSTER", "MYID").decode()
        with self.client(self.masters[0]) as c:
            for s in self.servers[1:]:
                c.execute_command("CLUSTER", "MEET", _HOST, s.port)
        _wait("every node meeting every other", lambda: all(self._known(s) for s in self.servers))
        for i, r in enumerate(self.replicas):
            master = self.masters[i % n]
            with self.client(r) as c:
                c.execute_command("CLUSTER", "REPLICATE", ids[master.port])
        _wait("the cluster being ok", self._ok)
        _wait("every replica's first sync", self._synced)

    def _known(self, s: OwnServer) -> bool:
        with self.client(s) as c:
            nodes = c.execute_command("CLUSTER", "NODES")
            text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
            return len(text.strip().splitlines()) == len(self.servers)

    def _ok(self) -> bool:
        for s in self.servers:
            if not s.is_running():
                continue
            with self.client(s) as c:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
        return True

    def _synced(self) -> bool:
        for r in self.replicas:
            if not r.is_running():
                continue
            with self.client(r) as c:
                info = c.info("replication")
                if info.get("role") != "slave" or info.get("master_link_status") != "up":
                    return False
        return True

    def master_of(self, key: str) -> OwnServer:
        """The running master that serves `key`'s slot now."""
        for s in self.servers:
            if not s.is_running():
                continue
            with self.client(s) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for first, last, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last:
                        port = int(primary[1])
                        return next(x for x in self.servers if x.port == port)
        raise RuntimeError("no running node answers")

    def kill(self, server: OwnServer, *, wait_failover: bool = False) -> None:
        """SIGKILL one node (a crash); optionally wait until the cluster is ok again."""
        server.kill()
        if wait_failover:
            _wait("the failover", self._ok, timeout=60)

    def keys_per_master(self, pattern: str = "*") -> dict[int, int]:
        """How many keys matching `pattern` each running master holds."""
        out = {}
        for m in self.servers:
            if not m.is_running():
                continue
            with self.client(m) as c:
                if c.info("replication").get("role") == "master":
                    out[m.port] = sum(1 for _ in c.scan_iter(match=pattern, count=1000))
        return out

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


class OwnSentinel(Owned):
    """A primary, one replica and one Sentinel watching them as `service` (quorum 1)."""

    def __init__(self, service: str = "aiotasks", *, down_after_ms: int = 1000) -> None:
        self.binary = server_binary()
        self.service = service
        self.down_after_ms = down_after_ms
        self.primary = OwnServer(self.binary)
        self.replica = OwnServer(self.binary)
        self.sentinel_port = _free_port()
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://{_HOST}:{self.sentinel_port}/{self.service}"

    def start(self) -> Self:
        with self.stopped_on_error():
            self.primary.start()
            self.replica.start()
            with redis.Redis(host=_HOST, port=self.replica.port) as c:
                c.execute_command("REPLICAOF", _HOST, self.primary.port)
            _wait("the replica's first sync", self._synced)
            self._start_sentinel()
        return self

    def _synced(self) -> bool:
        with redis.Redis(host=_HOST, port=self.replica.port) as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    def _start_sentinel(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="aiotasks-sentinel-")
        conf = Path(self._dir, "sentinel.conf")
        conf.write_text(
            f"port {self.sentinel_port}\nbind {_HOST}\ndir {self._dir}\n"
            f"sentinel monitor {self.service} {_HOST} {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        log = open(Path(self._dir, "sentinel.log"), "wb")
        self._proc = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            start_new_session=True,
        )

        def ready() -> bool:
            with redis.Redis(host=_HOST, port=self.sentinel_port) as c:
                return bool(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service))

        _wait("the Sentinel answering", ready)

    def primary_port(self) -> int:
        """The port of the primary the Sentinel names now."""
        with redis.Redis(host=_HOST, port=self.sentinel_port) as c:
            _host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return int(port)

    def kill_primary(self, *, wait_failover: bool = False) -> None:
        """SIGKILL the current primary; optionally wait until the Sentinel names another."""
        port = self.primary_port()
        victim = self.primary if self.primary.port == port else self.replica
        victim.kill()
        if wait_failover:
            _wait("the Sentinel failover", lambda: self.primary_port() != port, timeout=60)

    def switchover(self) -> int:
        """A planned failover (SENTINEL FAILOVER), once the Sentinel knows the replica;
        waits until it names the new primary, whose port it returns. The old primary
        stays a writable primary until the Sentinel turns it into a replica, later."""
        old = self.primary_port()
        with redis.Redis(host=_HOST, port=self.sentinel_port) as c:

            def started() -> bool:
                try:
                    c.execute_command("SENTINEL", "FAILOVER", self.service)
                except redis.ResponseError as exc:  # NOGOODSLAVE: no replica known yet
                    if "NOGOODSLAVE" not in str(exc):
                        raise
                    return False
                return True

            _wait("the Sentinel to know the replica", started, timeout=30)
        _wait("the Sentinel to name the new primary", lambda: self.primary_port() != old, 30)
        new = self.primary_port()

        def listed() -> bool:
            # GET-MASTER-ADDR-BY-NAME names the promoted replica during the failover;
            # clients read SENTINEL MASTERS, which moves on +switch-master, a moment later.
            with redis.Redis(host=_HOST, port=self.sentinel_port) as c:
                state = c.sentinel_master(self.service)
            return int(state["port"]) == new

        _wait("the Sentinel to list the new primary", listed, 30)
        return new

    def role(self, port: int) -> str:
        """'master' or 'slave': what the server on `port` says it is."""
        with redis.Redis(host=_HOST, port=port) as c:
            return str(c.info("replication")["role"])

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self.primary.stop()
        self.replica.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
