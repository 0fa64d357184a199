"""Client: the one object that owns a connection to Redis, for every layer.

It holds the connection pool, the key names, the Lua scripts and the result notifier.
Handles, task contexts, the canvas, workers and admin each hold a Client; none of them
reach Redis any other way. `App` makes it (see `App.client`) and keeps only the task
registry, settings and factories.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import (
    BusyLoadingError,
    OutOfMemoryError,
    RedisClusterException,
    ResponseError,
)

from . import codec, topology
from .cancel import keep_cancel
from .config import InvalidRedisURL, RetryPolicy, Settings, redact_url
from .contract import SEND, Op, TaskRecord, unpack_reply
from .errors import (
    CLUSTER_TRANSIENT,
    CONNECTION_ERRORS,
    BrokerConnectionError,
    BrokerRefusedError,
    ConfigurationError,
    describe,
)
from .keys import GROUP, Keys, shard_of
from .message import now
from .notifier import Notifier
from .primary_watch import PrimaryWatch
from .refusals import (
    FAILOVER_REFUSALS,
    REFUSED_CONNECTION,
    error_code,
    not_a_cluster,
    refusal,
)
from .scripts import Scripts
from .sendbatch import SendBatcher
from .state import PAYLOAD, TaskInfo, TaskState, entry_payload, pack_payload

log = logging.getLogger(__name__)

T = TypeVar("T")


def _name(group: dict[Any, Any]) -> str:
    name = group.get("name", group.get(b"name", b""))
    return name.decode() if isinstance(name, bytes) else str(name)


#: Seconds a watch mark (scripts.watch) keeps the hash of a task not sent yet; one that
#: is sent gets its own TTL.
WATCH_MARK_TTL = 86_400


def now_ms() -> int:
    """Wall-clock milliseconds, as scripts take them."""
    return int(now() * 1000)


@dataclass(slots=True)
class _Connection:
    """What belongs to one event loop: the pool, its client, scripts and notifier."""

    loop: asyncio.AbstractEventLoop | None
    pool: BlockingConnectionPool | None  # None: a cluster's or Sentinel's client owns its pools
    redis: Redis
    listener: Redis | None  # the notifiers' client behind a Cluster or Sentinel URL
    scripts: Scripts
    notifier: Notifier
    sends: SendBatcher
    base: _Connection | None = None  # a shard's: the namespace client's connection it shares
    shards_checked: bool = False  # this connection's first send compared the shard counts
    checking: asyncio.Future[None] | None = None  # that comparison, shared by its senders
    owned: int = 0  # connections of the pool held by own_scripts() (the root's counts)
    watch: PrimaryWatch | None = None  # behind a Sentinel URL: leaves a demoted primary


class Client:
    """A Redis connection pool, its scripts, key names and result notifier.

    Connections open lazily. Used from a new event loop (a new test, a second
    `asyncio.run`), the client opens new connections: the old ones belong to the old
    loop and cannot be used from this one.
    """

    def __init__(self, settings: Settings, *, _shard: int = 0, _root: Client | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace, _shard, settings.shards)
        self._conn: _Connection | None = None
        #: A client per shard, shard 0 (which also holds the namespace-wide keys) first;
        #: tasks live in shard `shard_of(id)`. A shard's client shares the root's pool.
        self.shards: list[Client]
        self.topology: topology.Topology
        #: send's retry policy unless a send names one: the App's, or behind a Cluster or
        #: Sentinel URL and left at the default, one that outlasts a normal failover.
        self.retry_policy: RetryPolicy
        #: Largest result body read back (results are written under max_message_size).
        self.read_limit: int
        if _root is not None:
            self._root = _root
            self.topology, self.retry_policy = _root.topology, _root.retry_policy
            self.read_limit = _root.read_limit
            self.shards = _root.shards
            return
        self._root = self
        try:
            self.topology = topology.parse(settings.redis_url)
        except ValueError as exc:
            shown = redact_url(settings.redis_url)
            raise InvalidRedisURL(f"invalid Redis URL {shown!r}: {exc}") from None
        self.retry_policy = settings.retry_policy
        if self.topology.failover and settings.retry_policy == RetryPolicy():
            self.retry_policy = RetryPolicy.of(topology.FAILOVER_RETRIES)
        self.read_limit = max(settings.max_message_size, codec.MAX_SIZE)
        self.shards = [self]
        self.shards += [Client(settings, _shard=k, _root=self) for k in range(1, settings.shards)]

    def for_task(self, task_id: str) -> Client:
        """The client of the shard that holds `task_id`."""
        shards = self.shards
        return shards[shard_of(task_id, len(shards))] if len(shards) > 1 else self

    @property
    def root(self) -> Client:
        """The namespace's client (shard 0, with the namespace-wide keys)."""
        return self._root

    def _connect(self) -> _Connection:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        conn = self._conn
        if self._root is not self:
            base = self._root._connect()
            if conn is None or conn.base is not base:
                self._conn = conn = self._assemble(
                    base.loop, None, base.redis, base.listener, self._pick(), base
                )
            return conn
        if conn is not None and (loop is None or conn.loop in (None, loop)):
            if conn.loop is None and loop is not None:
                conn.loop = loop
                if conn.watch is not None:
                    conn.watch.start()
            return conn
        s = self.settings
        top = self.topology
        pool: BlockingConnectionPool | None = None
        pick: Callable[[], Awaitable[Redis]] | None = None
        if top.kind == "single":
            redis, pool = topology.single_client(top, s.max_connections)
            listener = None
        else:
            # A Cluster or a Sentinel-managed primary: redis-py's clients follow
            # failovers (and, on a cluster, slot moves).
            redis = topology.command_client(top, s.max_connections)
            listener = topology.listener(top)
            pick = self._pick()
        self._conn = self._assemble(loop, pool, redis, listener, pick)
        if top.kind == "sentinel" and listener is not None:
            pools = [redis.connection_pool, listener.connection_pool]
            self._conn.watch = PrimaryWatch(cast(list[SentinelConnectionPool], pools))
            if loop is not None:
                self._conn.watch.start()
        return self._conn

    def _pick(self) -> Callable[[], Awaitable[Redis]] | None:
        """On a Cluster: how the notifier finds the master that owns this shard's slot."""
        top = self.topology
        if top.kind != "cluster":
            return None

        async def pick() -> Redis:
            return await topology.pubsub_client(top, self.keys.control_channel)

        return pick

    def _assemble(
        self,
        loop: asyncio.AbstractEventLoop | None,
        pool: BlockingConnectionPool | None,
        redis: Redis,
        listener: Redis | None,
        pick: Callable[[], Awaitable[Redis]] | None,
        base: _Connection | None = None,
    ) -> _Connection:
        """The scripts, notifier and send batcher on top of a command client."""
        sharded = self.topology.kind == "cluster"
        scripts = Scripts(redis, self.keys, sharded_pubsub=sharded)

        async def enqueue(tasks: list[dict[str, Any]], policy: RetryPolicy) -> list[int]:
            async def call() -> list[int]:
                return await scripts.enqueue(now_ms=now_ms(), mode=SEND, tasks=tasks)

            return await self.with_retry(policy, call)

        async def mark(task_id: str) -> int:
            try:
                return await keep_cancel(scripts.watch(task_id=task_id, ttl=WATCH_MARK_TTL))
            except (ResponseError, *REFUSED_CONNECTION) as exc:
                # A wait that cannot mark its task (OOM, NOPERM) would never be woken:
                # say why instead. Waiters ride out the transient ones (CLUSTERDOWN,
                # TRYAGAIN, LOADING) and a lost connection.
                raise refusal(self.url, exc, "marking a task watched") from exc

        s = self.settings
        notifier = Notifier(
            s.redis_url,
            self.keys,
            mark,
            redis=listener,
            pick=pick,
            sharded=sharded,
            # A quarter of the pool: Sentinel's and a Cluster node's pools refuse past it.
            marks_at_once=min(32, s.max_connections // 4),
        )
        return _Connection(
            loop, pool, redis, listener, scripts, notifier, SendBatcher(enqueue), base
        )

    @property
    def redis(self) -> Redis:
        """The redis-py client of the current event loop."""
        return self._connect().redis

    @property
    def scripts(self) -> Scripts:
        """The Lua scripts, registered on the current loop's client."""
        return self._connect().scripts

    def own_scripts(self) -> Scripts:
        """The scripts on a connection of their own, taken from this loop's pool, for a
        loop that makes one call at a time (a worker's fetches, its commits): each call
        then skips the pool's checkout and return, a third of redis-py's work per
        command (a PING: 267k instructions through the pool, 180k on a connection of its
        own); pipelines (a worker's blocking wait) still take one from the pool. At most
        a quarter of the pool is held so (the rest is for blocking waits, heartbeats and
        sends, which queue for it): past that, and behind a Cluster or Sentinel URL, the
        shared scripts. `Scripts.close()` gives the connection back."""
        conn = self._connect()
        root = conn.base or conn
        if self.topology.kind != "single" or root.owned >= self.settings.max_connections // 4:
            return conn.scripts
        root.owned += 1

        def given_back() -> None:
            root.owned -= 1

        scripts = Scripts(conn.redis.client(), self.keys, own=True, on_close=given_back)
        scripts.functions = conn.scripts.functions  # what the shared ones found, if any
        return scripts

    @property
    def notifier(self) -> Notifier:
        """The shared result subscription of the current loop."""
        return self._connect().notifier

    @property
    def url(self) -> str:
        """The Redis URL with its password hidden."""
        return redact_url(self.settings.redis_url)

    async def close(self) -> None:
        """Close the notifier and every pooled connection (later use opens new ones)."""
        conn, self._conn = self._conn, None
        if self._root is not self:
            if conn is not None and conn.loop in (None, asyncio.get_running_loop()):
                await conn.notifier.close()  # the pool is the root's
            return
        for shard in self.shards[1:]:
            await shard.close()
        if conn is not None and conn.loop in (None, asyncio.get_running_loop()):
            # A connection of another (finished) loop is dropped, not closed from here.
            if conn.watch is not None:
                await conn.watch.close()
            await conn.notifier.close()
            await conn.redis.aclose()
            if conn.pool is not None:
                await conn.pool.disconnect()

    async def ping(self) -> None:
        """Check that Redis answers.

        Raises:
            BrokerConnectionError: Redis cannot be reached.
            BrokerRefusedError: Redis refused (credentials, database, ACL, loading).
        """
        try:
            await self.redis.ping()
        except (ResponseError, BusyLoadingError, *REFUSED_CONNECTION) as exc:
            raise refusal(self.url, exc, "the connection") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(
                f"cannot reach Redis at {self.url}: {describe(exc, self.url)}"
            ) from exc
        except RedisClusterException as exc:
            if not_a_cluster(exc):
                raise refusal(self.url, exc, "the connection") from exc
            raise

    def transient(self, exc: BaseException) -> bool:
        """A cluster error that a failover or slot move explains (CLUSTERDOWN, TRYAGAIN,
        MOVED/ASK), or, behind a Cluster or Sentinel URL, a primary turned replica
        (READONLY) or one whose replica was just promoted (NOREPLICAS, with
        min-replicas-to-write): worth retrying as a lost connection is. Against one
        server both are refusals (a replica's URL; a replica that is down)."""
        if isinstance(exc, CLUSTER_TRANSIENT):
            return True
        if not self.topology.failover or not isinstance(exc, ResponseError):
            return False
        # error_code reads through Redis 6's wrapping of a script's error and redis-py's
        # of a pipeline's.
        return error_code(exc) in FAILOVER_REFUSALS

    def waits_out(self, exc: BaseException) -> bool:
        """A lost connection, or a failover's refusal (transient()): what a worker waits
        out rather than turning into a task's failure."""
        if isinstance(exc, BrokerRefusedError):  # a refusal with_retry gave up on
            return self.topology.failover and exc.code in FAILOVER_REFUSALS
        return isinstance(exc, CONNECTION_ERRORS) or self.transient(exc)

    async def with_retry(self, policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`, retrying connection errors (and a loading server) by `policy`.

        Raises:
            BrokerConnectionError: Redis stayed unreachable through the policy.
            BrokerRefusedError: Redis refused the command (OOM, NOPERM, READONLY, or
                LOADING through the policy); nothing was done.
        """
        retry = 0
        while True:
            try:
                return await keep_cancel(call())
            except (ResponseError, *REFUSED_CONNECTION) as exc:
                if not self.transient(exc) or retry >= policy.max_retries:
                    raise refusal(self.url, exc) from exc
                await asyncio.sleep(policy.delay(retry))
                retry += 1
            except CONNECTION_ERRORS as exc:
                if retry >= policy.max_retries:
                    if isinstance(exc, BusyLoadingError):
                        raise refusal(self.url, exc) from exc
                    raise BrokerConnectionError(
                        f"cannot reach Redis at {self.url} after {retry + 1} tries: "
                        f"{describe(exc, self.url)}"
                    ) from exc
                await asyncio.sleep(policy.delay(retry))
                retry += 1
            except RedisClusterException as exc:
                if not_a_cluster(exc):  # a single server: no retry changes that
                    raise refusal(self.url, exc) from exc
                raise

    # -- sending ------------------------------------------------------------------------

    async def enqueue(self, records: Sequence[TaskRecord], policy: RetryPolicy) -> list[int]:
        """Enqueue task records (1 = enqueued, 0 = a live id kept), in one script call
        with whatever else this loop sends in the same turn (sendbatch.py).

        Ids are fixed before the first try, so a retried call never enqueues twice. With
        several shards, each shard's records go in a call of their own, concurrently
        (several calls: one may fail after another enqueued its records).

        Raises:
            ConfigurationError: the namespace's workers use another shard count.
        """
        await self._root.check_sender(policy)
        if len(self.shards) == 1:
            return await self._connect().sends.enqueue([r.wire() for r in records], policy)
        by_shard: dict[int, list[int]] = {}
        for i, r in enumerate(records):
            by_shard.setdefault(shard_of(r.id, len(self.shards)), []).append(i)
        calls = [
            self.shards[k]._connect().sends.enqueue([records[i].wire() for i in idx], policy)
            for k, idx in by_shard.items()
        ]
        out = [0] * len(records)
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for idx, got in zip(by_shard.values(), replies, strict=True):
            if isinstance(got, BaseException):
                raise got  # the first failed shard's; the others' were retrieved
            for i, flag in zip(idx, got, strict=True):
                out[i] = flag
        return out

    async def apply(self, ops: Sequence[Op], policy: RetryPolicy) -> None:
        """Apply finish.lua ops atomically (a canvas being sent), retried by `policy`."""
        await self._root.check_sender(policy)

        async def call() -> int:
            return await self.scripts.finish(streams=[], now_ms=now_ms(), ops=ops)

        await self.with_retry(policy, call)

    # -- reading a task -----------------------------------------------------------------

    async def task_hash(self, task_id: str) -> dict[bytes, bytes]:
        """The raw task hash (empty when unknown).

        Raises:
            BrokerConnectionError: Redis stayed unreachable through the retry policy.
        """
        c = self.for_task(task_id)
        key = c.keys.task(task_id)

        async def call() -> dict[bytes, bytes]:
            h: dict[bytes, bytes] = await cast(Any, c.redis).hgetall(key)
            return h

        return await self.with_retry(self.settings.retry_policy, call)

    async def task_info(self, task_id: str) -> TaskInfo:
        """The stored info of a task (PENDING when unknown)."""
        return TaskInfo.from_hash(task_id, await self.task_hash(task_id), self.read_limit)

    async def task_state(self, task_id: str) -> TaskState:
        """The state of a task (PENDING when unknown)."""
        c = self.for_task(task_id)
        key = c.keys.task(task_id)

        async def call() -> bytes | None:
            raw: bytes | None = await cast(Any, c.redis).hget(key, "state")
            return raw

        raw = await self.with_retry(self.settings.retry_policy, call)
        return TaskState(raw.decode()) if raw else TaskState.PENDING

    async def save_group(self, group_id: str, task_ids: list[str], ttl: int) -> None:
        """Store a group's member ids for `ttl` s, in the shard its id falls in."""
        c = self.for_task(group_id)
        key, packed = c.keys.group(group_id), codec.encode(task_ids, "msgpack")[0]

        async def call() -> None:
            await cast(Any, c.redis).set(key, packed, ex=ttl)

        await self.with_retry(self.settings.retry_policy, call)

    async def saved_group(self, group_id: str) -> list[str] | None:
        """The member ids save_group() stored, or None (never saved, or expired)."""
        c = self.for_task(group_id)
        key = c.keys.group(group_id)

        async def call() -> bytes | None:
            raw: bytes | None = await cast(Any, c.redis).get(key)
            return raw

        raw = await self.with_retry(self.settings.retry_policy, call)
        if raw is None:
            return None
        ids = codec.decode(raw, "msgpack")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"group {group_id!r}: {key} does not hold a list of task ids")
        return ids

    async def chord_results(self, chord_id: str) -> list[Any]:
        """The header results of a chord, in header order."""
        c = self.for_task(chord_id)
        raw: dict[bytes, bytes] = await cast(Any, c.redis).hgetall(c.keys.chord_results(chord_id))
        out: list[Any] = [None] * len(raw)
        for idx, value in raw.items():
            ct, _, data = value.partition(b"\n")
            out[int(idx)] = codec.decode(data, ct.decode(), self.read_limit)
        return out

    # -- acting on a task ---------------------------------------------------------------

    async def revoke(self, task_id: str, terminate: bool = False) -> str:
        """Revoke a task; with terminate, tell the worker running it to cancel it.

        Returns the state before the revoke ('' when unknown).
        """
        c = self.for_task(task_id)
        payload = await c._live_payload(task_id)  # read before the revoke deletes it
        prev = await c.scripts.revoke(
            task_id=task_id, now_ms=now_ms(), ttl=self.settings.result_ttl
        )
        if terminate and prev == "STARTED":
            # Workers listen on the namespace's control channel, in shard 0.
            await self._root.publish(self._root.keys.control_channel, f"revoke {task_id}")
        if payload is not None and prev in ("SCHEDULED", "PENDING", "STARTED"):
            await c._keep_payload(task_id, payload)
        return prev

    async def _live_payload(self, task_id: str) -> bytes | None:
        """A live task's payload (from its delayed record or its entry), for `aiotasks retry`
        (called on the task's shard)."""
        rec, entry, stream = await cast(Any, self.redis).hmget(
            self.keys.task(task_id), "_rec", "_e", "_st"
        )
        if rec:
            r = unpack_reply(rec)
            return pack_payload(r[b"m"], r[b"ct"], int(r[b"priority"]))
        if entry and stream:
            found = await cast(Any, self.redis).xrange(stream, entry, entry)
            if found:
                return entry_payload(found[0][1], int(stream.rpartition(b":")[2]))
        return None

    async def _keep_payload(self, task_id: str, payload: bytes) -> None:
        key = self.keys.task(task_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            cast(Any, pipe).hset(key, PAYLOAD, payload)
            pipe.pttl(key)
            _, ttl_ms = await pipe.execute()
        if ttl_ms == -1:  # it expired meanwhile and HSET made it anew: everything expires
            await self.redis.pexpire(key, self.settings.result_ttl * 1000)

    async def forget(self, task_id: str) -> None:
        """Delete a finished task's stored state and result. A task not finished yet
        keeps its record (its queue entry, revoke marks and waiters need it): there is
        no result to forget yet."""
        await self.for_task(task_id).scripts.forget(task_id=task_id)

    async def publish(self, channel: str, message: str) -> None:
        """Publish on one of the namespace's channels: SPUBLISH on a Cluster, where the
        notifiers subscribe on the shard that owns the namespace's slot."""
        if self.topology.kind == "cluster":
            await cast(Any, self.redis).spublish(channel, message)
        else:
            await self.redis.publish(channel, message)

    async def store_progress(self, task_id: str, meta: dict[str, Any]) -> None:
        """Store progress metadata in the task hash and notify watchers."""
        c = self.for_task(task_id)
        key, channel = c.keys.task(task_id), c.keys.done_channel(task_id)
        packed = codec.encode(meta, "msgpack")[0]

        async def call() -> None:
            if self.topology.kind == "cluster":
                # A cluster pipeline takes no SPUBLISH: stored, then published.
                await cast(Any, c.redis).hset(key, "progress", packed)
                await c.publish(channel, "progress")
                return
            async with c.redis.pipeline(transaction=True) as pipe:
                cast(Any, pipe).hset(key, "progress", packed)
                pipe.publish(channel, "progress")
                await pipe.execute()

        await self.with_retry(self.settings.retry_policy, call)

    async def rate_wait(self, task_name: str, interval_ms: float) -> int:
        """Reserve a start slot under a task's rate limit; ms to wait for it (one limit
        for the namespace: kept in shard 0)."""
        return await self._root.scripts.rate(
            task_name=task_name, interval_ms=interval_ms, now_ms=now_ms()
        )

    async def acquire_slot(self, key: str, limit: int, task_id: str, lease_ms: int) -> bool:
        """Take (or keep) a concurrency slot of `key` for a task; False at the limit.

        The slots live in the task's shard: a send draws the id of a task with a
        concurrency key in that key's shard (task.pinned_id), so each key has one limit."""
        request = {"key": key, "limit": limit, "id": task_id, "lease": lease_ms}
        held = await self.for_task(task_id).scripts.acquire(now_ms=now_ms(), requests=[request])
        return bool(held[0])

    # -- workers ------------------------------------------------------------------------

    async def ensure_groups(self, streams: Sequence[str]) -> list[str]:
        """Create the consumer group on every stream that lacks one (existing ones are
        kept); the streams whose group had to be created.

        Raises:
            BrokerRefusedError: Redis refused to create a missing group (NOPERM, OOM,
                READONLY, LOADING).
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        refused = {
            stream: res
            for stream, res in zip(streams, results, strict=True)
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res)
        }
        if refused and all(isinstance(r, OutOfMemoryError) for r in refused.values()):
            # Out of memory refuses XGROUP CREATE even where the group exists: look.
            for stream in await self._with_group(list(refused)):
                del refused[stream]
        if refused:
            stream, exc = next(iter(refused.items()))
            raise refusal(self.url, exc, f"creating the consumer group of {stream}") from exc
        return [stream for stream, res in zip(streams, results, strict=True) if res is True]

    async def _with_group(self, streams: Sequence[str]) -> list[str]:
        """The streams among `streams` that have the consumer group."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            results = await pipe.execute(raise_on_error=False)
        return [
            stream
            for stream, groups in zip(streams, results, strict=True)
            if isinstance(groups, list) and any(_name(g) == GROUP for g in groups)
        ]

    async def register_worker(
        self, name: str, description: dict[str, str | int], ttl: float
    ) -> bool:
        """Publish a worker's description (for `aiotasks status`), expiring unless renewed.

        Returns True when there was no description before (a first registration, or one
        that expired or was lost).
        """
        key = self.keys.worker(name)
        beat = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            cast(Any, pipe).hset(key, mapping=description)
            pipe.pexpire(key, int(ttl * 1000))
            pipe.zadd(self.keys.workers, {name: beat})
            # Workers silent for a day leave the index (their hash expired long ago).
            pipe.zremrangebyscore(self.keys.workers, "-inf", beat - 86_400_000)
            added, *_ = await pipe.execute()
        return bool(added)

    async def unregister_worker(self, name: str) -> None:
        """Remove a stopping worker from the registry, and say LEFT in the event feed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.worker(name))
            pipe.zrem(self.keys.workers, name)
            self._worker_event(pipe, name, "LEFT")
            await pipe.execute()

    async def worker_event(self, name: str, state: str) -> None:
        """Add a worker's JOINED or LEFT to the namespace's event feed (when it is on)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if self._worker_event(pipe, name, state):
                await pipe.execute()

    def _worker_event(self, pipe: Any, name: str, state: str) -> bool:
        size = self.settings.events_size
        if size <= 0:
            return False
        event = f"{state}\t\t\t\t{name}"  # a line of the feed (see index.py)
        pipe.xadd(self.keys.events, {"t": now_ms(), "e": event}, maxlen=size, approximate=True)
        return True

    async def has_work(self, streams: Sequence[str], within: float) -> bool:
        """Whether any stream has entries or a delayed task is due within `within` s."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            pipe.zcount(self.keys.delayed, "-inf", int((now() + within) * 1000))
            counts = await pipe.execute()
        return any(counts)

    async def recorded_shards(self) -> int | None:
        """The shard count the namespace's workers recorded (None before any did)."""
        root = self._root
        raw = await cast(Any, root.redis).hget(root.keys.meta, "shards")
        return int(raw) if raw and raw.isdigit() else None

    async def check_sender(self, policy: RetryPolicy) -> None:
        """On a connection's first send: refuse to send with a shard count other than the
        one the namespace's workers recorded (their tasks would land where no worker
        reads). One HGET per connection; a refused read skips the check.

        Raises:
            ConfigurationError: the counts differ.
        """
        conn = self._connect()
        if conn.shards_checked:
            return
        if conn.checking is None:
            # Shared: the senders of one loop turn wait for one read, then send together
            # (still one batch); cancelling one of them does not cancel it.
            conn.checking = asyncio.ensure_future(self._check_once(conn, policy))
        await asyncio.shield(conn.checking)

    async def _check_once(self, conn: _Connection, policy: RetryPolicy) -> None:
        async def call() -> int | None:
            return await self.recorded_shards()

        try:
            recorded = await self.with_retry(policy, call)
        except BrokerRefusedError:
            recorded = None
        except BaseException:
            conn.checking = None  # the next send tries again
            raise
        if recorded is not None and recorded != self.settings.shards:
            conn.checking = None
            raise self._mismatch(recorded)
        conn.shards_checked = True

    def _mismatch(self, recorded: int) -> ConfigurationError:
        return ConfigurationError(
            f"namespace {self.keys.namespace!r} is spread over {recorded} shard(s), but this "
            f"App has shards={self.settings.shards}: every process of a namespace must use "
            "the same number (to change it, drain the namespace, then delete its 'meta' hash)"
        )

    async def check_shards(self) -> None:
        """Record this App's shard count for the namespace, or refuse another one.

        Raises:
            ConfigurationError: the namespace's tasks are spread over another number of
                shards (a worker with fewer would never read some of them).
        """
        root, n = self._root, self.settings.shards
        try:
            await cast(Any, root.redis).hsetnx(root.keys.meta, "shards", n)
            recorded = await self.recorded_shards()
        except ResponseError as exc:
            # A safety net, never a reason not to start (a server out of memory refuses
            # the write even where the count is recorded; an ACL may not reach `meta`).
            log.warning("cannot check the namespace's shard count (%s)", exc)
            return
        if recorded is not None and recorded != n:
            raise self._mismatch(recorded)

    # -- periodic ticks -----------------------------------------------------------------

    async def claim_tick(self, name: str, tick_ms: int, worker: str, ttl_ms: int) -> bool:
        """Claim one tick of a periodic schedule; False when another worker has it."""
        key = self.keys.periodic_tick(name, tick_ms)
        return bool(await self.redis.set(key, worker, nx=True, px=ttl_ms))

    async def publish_schedule(self, next_runs: dict[str, int], ttl_ms: int) -> None:
        """Record each periodic's next run (ms) for `aiotasks status`: the whole map, so
        a schedule removed meanwhile leaves it (every worker fires the same schedules)."""
        # Not a transaction (a Cluster pipeline may refuse one): a reader between the
        # two writes sees no next runs for a moment, nothing worse.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.periodic)
            if next_runs:
                cast(Any, pipe).hset(self.keys.periodic, mapping=next_runs)
                pipe.pexpire(self.keys.periodic, ttl_ms)
            await pipe.execute()
