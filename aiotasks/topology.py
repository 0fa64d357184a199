"""Where Redis is: one server, a Cluster, or a Sentinel-managed primary, from the URL.

- `redis://`, `rediss://`, `unix://`: one server (redis-py's connection pool).
- `redis+cluster://h1:7000,h2:7001[?...]` (`rediss+cluster://` for TLS): a Redis or Valkey
  Cluster through redis-py's RedisCluster, seeded by any of the listed nodes. Every key
  of a namespace carries its `{namespace}` hash tag, so each script is one atomic call
  on the master that owns that slot.
- `redis+sentinel://h1:26379,h2:26379/<service>[/db][?...]` (`rediss+sentinel://`: TLS to
  the primary): the primary Sentinel names for `<service>`, followed across failovers by
  redis-py's Sentinel support.

Query parameters (`?password=`, `?ssl_cert_reqs=`, ...) and the userinfo's credentials go
to every node (for Sentinel: to the primary and its replicas; `sentinel_password=` /
`sentinel_username=` to the Sentinels themselves).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .transport import guard_connections

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")

#: How `send` retries by default against a Cluster or Sentinel: long enough to ride out a
#: normal failover (a cluster's node timeout plus an election, or Sentinel's
#: down-after-milliseconds plus an election, kept at a few seconds) before giving up.
FAILOVER_RETRIES = {
    "max_retries": 40,
    "interval_start": 0.1,
    "interval_step": 0.1,
    "interval_max": 0.5,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    """A parsed Redis URL: kind ('single', 'cluster' or 'sentinel') and where to reach it."""

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    sentinel_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def failover(self) -> bool:
        """A Cluster or a Sentinel: failovers are normal events to ride out."""
        return self.kind != "single"


def parse(url: str) -> Topology:
    """Read `url`.

    Raises:
        ValueError: naming what is wrong (the caller hides passwords).
    """
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if scheme not in CLUSTER_SCHEMES + SENTINEL_SCHEMES:
        return Topology("single", url)
    tls = scheme.startswith("rediss")
    parts = urlsplit(url)
    userinfo, _at, hostlist = parts.netloc.rpartition("@")
    nodes = tuple(
        _node(n, 26379 if scheme in SENTINEL_SCHEMES else 6379) for n in hostlist.split(",")
    )
    if not nodes or not all(h for h, _ in nodes):
        raise ValueError("no host: expected host:port[,host:port...]")
    options, sentinel_opts = _options(tls, userinfo, nodes[0], parts.query)
    if scheme in CLUSTER_SCHEMES:
        if parts.path.strip("/"):
            raise ValueError("a cluster has only database 0: drop the path after the hosts")
        options.pop("db", None)
        return Topology("cluster", url, nodes, options=options)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("no service name: expected redis+sentinel://host:port/<service>")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("expected /<service> or /<service>/<db> after the hosts")
    db = int(path[1]) if len(path) == 2 else 0
    options.pop("db", None)
    return Topology("sentinel", url, nodes, path[0], db, options, sentinel_opts)


def _options(
    tls: bool, userinfo: str, first: tuple[str, int], query_text: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The node options as redis-py reads them from a plain URL (credentials, TLS, the
    query), and the Sentinels' own credentials (`sentinel_password=`, `sentinel_username=`)."""
    plain = f"{'rediss' if tls else 'redis'}://{userinfo + '@' if userinfo else ''}"
    plain += f"{first[0]}:{first[1]}"
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    sentinel_opts: dict[str, Any] = {}
    for key in ("sentinel_password", "sentinel_username"):
        if key in query:
            sentinel_opts[key.removeprefix("sentinel_")] = query.pop(key)
    rest = urlencode(query)
    options: dict[str, Any] = dict(parse_url(plain + ("?" + rest if rest else "")))
    for key in ("host", "port", "protocol"):  # the listener speaks RESP2 whatever is asked
        options.pop(key, None)
    # redis-py's URL parser says TLS with a connection class; RedisCluster, Sentinel
    # pools and a plain Redis all take `ssl=True` instead (and keep their own class).
    if options.pop("connection_class", None) is not None or tls:
        options["ssl"] = tls
    options.update(connect_timeout_default(options))
    if sentinel_opts:  # given, redis-py no longer copies the socket options to Sentinels
        sentinel_opts.update({k: v for k, v in options.items() if k.startswith("socket_")})
    return options, sentinel_opts


#: Seconds to connect (TCP and TLS handshake) where the URL names no timeout: redis-py's
#: default is its 5 s socket timeout, and its pool tries a connect three times, so an
#: address that never answers (a black hole, TLS to a plain server) held a send's four
#: tries for a minute.
CONNECT_TIMEOUT = 2.0


def connect_timeout_default(options: Mapping[str, Any]) -> dict[str, float]:
    """`socket_connect_timeout=CONNECT_TIMEOUT`, unless `options` (a URL's) name a timeout."""
    if "socket_connect_timeout" in options or "socket_timeout" in options:
        return {}
    return {"socket_connect_timeout": CONNECT_TIMEOUT}


def unknown_options_problem(unknown: list[str]) -> str:
    """What to say of the options unknown_url_options() found."""
    names = ", ".join(repr(k) for k in unknown)
    hint = "; TLS options need rediss://" if any(k.startswith("ssl") for k in unknown) else ""
    return f"unknown option {names} after '?' (not a redis-py connection option{hint})"


def unknown_url_options(options: dict[str, Any]) -> list[str]:
    """The options of a single server's URL, parsed by redis-py's `parse_url`, that its
    connection would refuse (no such argument): a typo in the query, or a TLS option on
    a redis:// URL. Said before connecting; otherwise a TypeError at the first
    connection. (A Cluster's or Sentinel's client takes options of its own.)"""
    cls = options.get("connection_class", Connection)
    known = _connection_args(cls)
    return sorted(k for k in options if k not in known)


@functools.cache
def _connection_args(cls: type) -> frozenset[str]:
    # The pool's own arguments (`timeout`: a BlockingConnectionPool's wait for a free
    # connection), and the connection class's, up its base classes (the TLS and Unix
    # socket connections pass the rest on as **kwargs).
    names = {"connection_class", "max_connections", "timeout"}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in _NAMED)
    return frozenset(names)


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        return text.strip(), default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the port of {text!r} is not a port (1..65535)")
    return host.strip("[]"), int(port)


# Every client below comes back with its connections guarded (transport.py): a redis-py
# race can tear a connection's transport from under a command, and that must read as a
# lost connection, which every caller retries, not as an AttributeError.


def single_client(top: Topology, max_connections: int) -> tuple[Redis, BlockingConnectionPool]:
    """The client for commands and scripts on one server, and its pool.

    A blocking pool makes a burst of sends wait for a connection instead of failing with
    MaxConnectionsError past the limit.
    """
    pool = BlockingConnectionPool.from_url(
        top.url,
        **connect_timeout_default(_query(top.url)),
        max_connections=max_connections,
        timeout=None,
        health_check_interval=30,
        # A pooled connection that died with the server (a restart, a failover) is
        # replaced on its next use instead of failing that command.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return guard_connections(Redis(connection_pool=pool)), pool


def notifier_client(url: str) -> Redis:
    """A notifier's own client on one server: RESP2 (see Notifier)."""
    options: dict[str, Any] = {"protocol": 2, **connect_timeout_default(_query(url))}
    return guard_connections(Redis.from_url(url, **options))


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def command_client(top: Topology, max_connections: int, **pool: Any) -> Redis:
    """The client for commands and scripts behind a Cluster or Sentinel URL.

    A RedisCluster is returned typed as Redis: aiotasks calls only what both have
    (commands on its namespace's keys, scripts, non-transactional pipelines).
    """
    return guard_connections(_command_client(top, max_connections, **pool))


def _command_client(top: Topology, max_connections: int, **pool: Any) -> Redis:
    if top.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in top.nodes],
            max_connections=max_connections,
            # A failover or a slot migration: re-read the topology and try again.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 6),
            **top.options,
        )
        return cast(Redis, cluster)
    if top.kind == "sentinel":
        primary = sentinel(top).master_for(
            top.service, db=top.db, max_connections=max_connections, **top.options
        )
        return cast(Redis, primary)
    raise ValueError("command_client is for a cluster or a Sentinel")


def sentinel(top: Topology) -> Sentinel:
    """redis-py's Sentinel for `top`'s Sentinels."""
    return Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8.2
        list(top.nodes),
        sentinel_kwargs=dict(top.sentinel_options) or None,
        **top.options,
    )


def listener(top: Topology) -> Redis:
    """The notifier's first client: the primary (Sentinel) or the first listed node."""
    if top.kind == "sentinel":
        primary = sentinel(top).master_for(top.service, db=top.db, protocol=2, **top.options)
        return guard_connections(cast(Redis, primary))
    host, port = top.nodes[0]
    return guard_connections(Redis(host=host, port=port, protocol=2, **top.options))


async def pubsub_client(top: Topology, key: str) -> Redis:
    """A client whose pub/sub connection hears the namespace's channels.

    Behind Sentinel, the primary. On a Cluster, notifications are sharded (SPUBLISH),
    so the master that owns `key`'s slot (every channel of a namespace shares its hash
    tag), as the first node that answers sees the slot map; asked again at every
    reconnect, which a slot move forces (Redis unsubscribes the slot's channels).
    """
    if top.kind == "sentinel":
        return listener(top)
    slot = key_slot(key.encode())
    last: Exception | None = None
    for host, port in top.nodes:
        probe = guard_connections(Redis(host=host, port=port, protocol=2, **top.options))
        try:
            slots = await cast(Any, probe).execute_command("CLUSTER", "SLOTS")
            for first, end, owner, *_ in slots:
                if first <= slot <= end:
                    owner_host = owner[0].decode() if isinstance(owner[0], bytes) else owner[0]
                    owner_port = int(owner[1])
                    client = guard_connections(
                        Redis(host=owner_host or host, port=owner_port, protocol=2, **top.options)
                    )
                    try:
                        await client.ping()
                    except BaseException:
                        await client.aclose()
                        raise
                    return client
            last = RuntimeError(f"no node serves slot {slot} yet")
        except Exception as exc:
            last = exc
        finally:
            await probe.aclose()
    raise ConnectionError(f"no node of the cluster answers for slot {slot}: {last}")
