"""Client: the one object that owns a connection to Redis, for every layer.

It holds the connection pool, the key names, the Lua scripts and the result notifier.
Handles, task contexts, the canvas, workers and admin each hold a Client; none of them
reach Redis any other way. `App` makes it (see `App.client`) and keeps only the task
registry, settings and factories.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import codec, topology
from .config import InvalidRedisURL, RetryPolicy, Settings, redact_url
from .contract import SEND, TaskRecord, unpack_reply
from .errors import CLUSTER_TRANSIENT, CONNECTION_ERRORS, BrokerConnectionError, BrokerRefusedError
from .keys import GROUP, Keys
from .message import now
from .notifier import Notifier
from .scripts import Scripts
from .sendbatch import SendBatcher
from .state import PAYLOAD, TaskInfo, TaskState, entry_payload, pack_payload
from .transport import guard_connections

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Error replies that mean "Redis answered, but will not do it", and what to do about them.
_REFUSAL_HINTS = {
    "OOM": "the server is out of memory: raise maxmemory or free memory",
    "NOPERM": "the ACL user lacks a permission: see the README's ACL line",
    "READONLY": "this is a read-only replica: point the URL at the primary",
    "MISCONF": "the server cannot write to disk",
}
_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (OutOfMemoryError, "OOM"),
    (NoPermissionError, "NOPERM"),
    (ReadOnlyError, "READONLY"),
    (BusyLoadingError, "LOADING"),
    (AuthenticationError, "WRONGPASS"),
    (AuthorizationError, "NOPERM"),
)
#: Connection errors that are really refusals: a retry does not change the answer.
_REFUSED_CONNECTION = (AuthenticationError, AuthorizationError)


#: Error codes that redis-py leaves in the message of a plain ResponseError.
_OTHER_CODES = frozenset(
    {"MISCONF", "BUSY", "NOSCRIPT", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}
)


def error_code(exc: BaseException) -> str:
    """The error code of a Redis error reply ("OOM", "NOPERM", ...; "ERR" by default)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    first = str(exc).split(" ", 1)[0]
    return first if first in _OTHER_CODES else "ERR"


def broker_error(url: str, exc: BaseException) -> BrokerConnectionError | BrokerRefusedError:
    """The aiotasks error for a redis-py error: a refusal, or a connection problem."""
    if isinstance(exc, (ResponseError, BusyLoadingError, *_REFUSED_CONNECTION)):
        return refusal(url, exc)
    return BrokerConnectionError(f"cannot reach Redis at {url}: {exc}")


def refusal(url: str, exc: BaseException, what: str = "the command") -> BrokerRefusedError:
    """A BrokerRefusedError for an error reply, with its code and what it means."""
    code = error_code(exc)
    if isinstance(exc, AuthenticationError):
        return BrokerRefusedError(f"Redis at {url} refused the credentials: {exc}", code)
    text = str(exc) if code == "ERR" or str(exc).startswith(code) else f"{code} {exc}"
    hint = _REFUSAL_HINTS.get(code)
    message = f"Redis at {url} refused {what}: {text}" + (f" ({hint})" if hint else "")
    return BrokerRefusedError(message, code)


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
    scripts: Scripts
    notifier: Notifier
    sends: SendBatcher


class Client:
    """A Redis connection pool, its scripts, key names and result notifier.

    Connections open lazily. Used from a new event loop (a new test, a second
    `asyncio.run`), the client opens new connections: the old ones belong to the old
    loop and cannot be used from this one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        try:
            self.topology = topology.parse(settings.redis_url)
        except ValueError as exc:
            shown = redact_url(settings.redis_url)
            raise InvalidRedisURL(f"invalid Redis URL {shown!r}: {exc}") from None
        #: send's retry policy unless a send names one: the App's, or behind a Cluster or
        #: Sentinel URL and left at the default, one that outlasts a normal failover.
        self.retry_policy = settings.retry_policy
        if self.topology.failover and settings.retry_policy == RetryPolicy():
            self.retry_policy = RetryPolicy.of(topology.FAILOVER_RETRIES)
        #: Largest result body read back (results are written under max_message_size).
        self.read_limit = max(settings.max_message_size, codec.MAX_SIZE)
        self._conn: _Connection | None = None

    def _connect(self) -> _Connection:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        conn = self._conn
        if conn is not None and (loop is None or conn.loop in (None, loop)):
            if conn.loop is None:
                conn.loop = loop
            return conn
        s = self.settings
        top = self.topology
        pool: BlockingConnectionPool | None = None
        pick: Callable[[], Awaitable[Redis]] | None = None
        if top.kind == "single":
            # A blocking pool makes a burst of sends wait for a connection instead of
            # failing with MaxConnectionsError past the limit.
            pool = BlockingConnectionPool.from_url(
                s.redis_url,
                max_connections=s.max_connections,
                timeout=None,
                health_check_interval=30,
                # A pooled connection that died with the server (a restart, a failover)
                # is replaced on its next use instead of failing that command.
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
            redis = Redis(connection_pool=pool)
            guard_connections(redis)
            listener = None
        else:
            # A Cluster or a Sentinel-managed primary: redis-py's clients follow
            # failovers (and, on a cluster, slot moves).
            redis = topology.command_client(top, s.max_connections)
            listener = topology.listener(top)
            guard_connections(redis)
            guard_connections(listener)
            if top.kind == "cluster":

                async def pick() -> Redis:
                    return await topology.pubsub_client(top, self.keys.control_channel)

        self._conn = self._assemble(loop, pool, redis, listener, pick)
        return self._conn

    def _assemble(
        self,
        loop: asyncio.AbstractEventLoop | None,
        pool: BlockingConnectionPool | None,
        redis: Redis,
        listener: Redis | None,
        pick: Callable[[], Awaitable[Redis]] | None,
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
                return await scripts.watch(task_id=task_id, ttl=WATCH_MARK_TTL)
            except (ResponseError, *_REFUSED_CONNECTION) as exc:
                # A wait that cannot mark its task (OOM, NOPERM) would never be woken:
                # say why instead. Waiters ride out the transient ones (CLUSTERDOWN,
                # TRYAGAIN, LOADING) and a lost connection.
                raise refusal(self.url, exc, "marking a task watched") from exc

        s = self.settings
        notifier = Notifier(
            s.redis_url, self.keys, mark, redis=listener, pick=pick, sharded=sharded
        )
        return _Connection(loop, pool, redis, scripts, notifier, SendBatcher(enqueue))

    @property
    def redis(self) -> Redis:
        """The redis-py client of the current event loop."""
        return self._connect().redis

    @property
    def scripts(self) -> Scripts:
        """The Lua scripts, registered on the current loop's client."""
        return self._connect().scripts

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
        if conn is not None and conn.loop in (None, asyncio.get_running_loop()):
            # A connection of another (finished) loop is dropped, not closed from here.
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
        except (ResponseError, BusyLoadingError, *_REFUSED_CONNECTION) as exc:
            raise refusal(self.url, exc, "the connection") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"cannot reach Redis at {self.url}: {exc}") from exc

    def _transient(self, exc: BaseException) -> bool:
        """A cluster error that a failover or slot move explains (CLUSTERDOWN, TRYAGAIN,
        MOVED/ASK), or a primary turned replica (READONLY) behind a Cluster or Sentinel URL:
        worth retrying. Against one server READONLY is a refusal (a replica's URL)."""
        if isinstance(exc, CLUSTER_TRANSIENT):
            return True
        return isinstance(exc, ReadOnlyError) and self.topology.failover

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
                return await call()
            except (ResponseError, *_REFUSED_CONNECTION) as exc:
                if not self._transient(exc) or retry >= policy.max_retries:
                    raise refusal(self.url, exc) from exc
                await asyncio.sleep(policy.delay(retry))
                retry += 1
            except CONNECTION_ERRORS as exc:
                if retry >= policy.max_retries:
                    if isinstance(exc, BusyLoadingError):
                        raise refusal(self.url, exc) from exc
                    raise BrokerConnectionError(
                        f"cannot reach Redis at {self.url} after {retry + 1} tries: {exc}"
                    ) from exc
                await asyncio.sleep(policy.delay(retry))
                retry += 1

    # -- sending ------------------------------------------------------------------------

    async def enqueue(self, records: Sequence[TaskRecord], policy: RetryPolicy) -> list[int]:
        """Enqueue task records (1 = enqueued, 0 = a live id kept), in one script call
        with whatever else this loop sends in the same turn (sendbatch.py).

        Ids are fixed before the first try, so a retried call never enqueues twice.
        """
        return await self._connect().sends.enqueue([r.wire() for r in records], policy)

    async def apply(self, ops: Sequence[Mapping[str, Any]], policy: RetryPolicy) -> None:
        """Apply finish.lua ops atomically (a canvas being sent), retried by `policy`."""

        async def call() -> int:
            return await self.scripts.finish(streams=[], now_ms=now_ms(), ops=ops)

        await self.with_retry(policy, call)

    # -- reading a task -----------------------------------------------------------------

    async def task_hash(self, task_id: str) -> dict[bytes, bytes]:
        """The raw task hash (empty when unknown).

        Raises:
            BrokerConnectionError: Redis stayed unreachable through the retry policy.
        """
        key = self.keys.task(task_id)

        async def call() -> dict[bytes, bytes]:
            h: dict[bytes, bytes] = await cast(Any, self.redis).hgetall(key)
            return h

        return await self.with_retry(self.settings.retry_policy, call)

    async def task_info(self, task_id: str) -> TaskInfo:
        """The stored info of a task (PENDING when unknown)."""
        return TaskInfo.from_hash(task_id, await self.task_hash(task_id), self.read_limit)

    async def task_state(self, task_id: str) -> TaskState:
        """The state of a task (PENDING when unknown)."""
        key = self.keys.task(task_id)

        async def call() -> bytes | None:
            raw: bytes | None = await cast(Any, self.redis).hget(key, "state")
            return raw

        raw = await self.with_retry(self.settings.retry_policy, call)
        return TaskState(raw.decode()) if raw else TaskState.PENDING

    async def chord_results(self, chord_id: str) -> list[Any]:
        """The header results of a chord, in header order."""
        raw: dict[bytes, bytes] = await cast(Any, self.redis).hgetall(
            self.keys.chord_results(chord_id)
        )
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
        payload = await self._live_payload(task_id)  # read before the revoke deletes it
        prev = await self.scripts.revoke(
            task_id=task_id, now_ms=now_ms(), ttl=self.settings.result_ttl
        )
        if terminate and prev == "STARTED":
            await self.publish(self.keys.control_channel, f"revoke {task_id}")
        if payload is not None and prev in ("SCHEDULED", "PENDING", "STARTED"):
            await self._keep_payload(task_id, payload)
        return prev

    async def _live_payload(self, task_id: str) -> bytes | None:
        """A live task's payload (from its delayed record or its entry), for `aiotasks retry`."""
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
        """Delete a task's stored state and result."""
        await self.redis.delete(self.keys.task(task_id))

    async def publish(self, channel: str, message: str) -> None:
        """Publish on one of the namespace's channels: SPUBLISH on a Cluster, where the
        notifiers subscribe on the shard that owns the namespace's slot."""
        if self.topology.kind == "cluster":
            await cast(Any, self.redis).spublish(channel, message)
        else:
            await self.redis.publish(channel, message)

    async def store_progress(self, task_id: str, meta: dict[str, Any]) -> None:
        """Store progress metadata in the task hash and notify watchers."""
        key, channel = self.keys.task(task_id), self.keys.done_channel(task_id)
        packed = codec.encode(meta, "msgpack")[0]
        if self.topology.kind == "cluster":
            # A cluster pipeline takes no SPUBLISH: stored, then published.
            await cast(Any, self.redis).hset(key, "progress", packed)
            await self.publish(channel, "progress")
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            cast(Any, pipe).hset(key, "progress", packed)
            pipe.publish(channel, "progress")
            await pipe.execute()

    async def rate_wait(self, task_name: str, interval_ms: float) -> int:
        """Reserve a start slot under a task's rate limit; ms to wait for it."""
        return await self.scripts.rate(
            task_name=task_name, interval_ms=interval_ms, now_ms=now_ms()
        )

    async def acquire_slot(self, key: str, limit: int, task_id: str, lease_ms: int) -> bool:
        """Take (or keep) a concurrency slot of `key` for a task; False at the limit."""
        request = {"key": key, "limit": limit, "id": task_id, "lease": lease_ms}
        held = await self.scripts.acquire(now_ms=now_ms(), requests=[request])
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
        """Remove a stopping worker from the registry."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.worker(name))
            pipe.zrem(self.keys.workers, name)
            await pipe.execute()
        await self.worker_event(name, "LEFT")

    async def worker_event(self, name: str, state: str) -> None:
        """Add a worker's JOINED or LEFT to the namespace's event feed (when it is on)."""
        size = self.settings.events_size
        if size <= 0:
            return
        event = f"{state}\t\t\t\t{name}"  # a line of the feed (see index.py)
        await self.redis.xadd(
            self.keys.events, {"t": now_ms(), "e": event}, maxlen=size, approximate=True
        )

    async def has_work(self, streams: Sequence[str], within: float) -> bool:
        """Whether any stream has entries or a delayed task is due within `within` s."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            pipe.zcount(self.keys.delayed, "-inf", int((now() + within) * 1000))
            counts = await pipe.execute()
        return any(counts)

    # -- periodic ticks -----------------------------------------------------------------

    async def claim_tick(self, name: str, tick_ms: int, worker: str, ttl_ms: int) -> bool:
        """Claim one tick of a periodic schedule; False when another worker has it."""
        key = self.keys.periodic_tick(name, tick_ms)
        return bool(await self.redis.set(key, worker, nx=True, px=ttl_ms))

    async def publish_schedule(self, next_runs: dict[str, int], ttl_ms: int) -> None:
        """Record each periodic's next run (ms) for `aiotasks status`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            cast(Any, pipe).hset(self.keys.periodic, mapping=next_runs)
            pipe.pexpire(self.keys.periodic, ttl_ms)
            await pipe.execute()
