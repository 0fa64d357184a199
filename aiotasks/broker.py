"""Broker: the one module that talks to Redis for clients (sending, reading, revoking).

The worker's hot path lives in worker.py but goes through the same Scripts and pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import codec
from .config import RetryPolicy, Settings
from .errors import CONNECTION_ERRORS, BrokerConnectionError
from .handle import TaskInfo, TaskState
from .keys import Keys
from .message import Message, now
from .notifier import Notifier
from .scripts import Scripts

log = logging.getLogger(__name__)

T = TypeVar("T")


def hide_password(url: str) -> str:
    """The URL with its password replaced by ***: an alias of config.redact_url."""
    from .config import redact_url

    return redact_url(url)


class Broker:
    """A Redis client, its scripts and its result notifier, for one App."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        # A blocking pool makes a burst of sends wait for a connection instead of
        # failing with MaxConnectionsError past the limit.
        self.pool = BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=settings.max_connections,
            timeout=None,
            health_check_interval=30,
            # A pooled connection that died with the server (a restart, a failover) is
            # replaced on its next use instead of failing that command.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.redis: Redis = Redis(connection_pool=self.pool)
        self.scripts = Scripts(self.redis)
        self.notifier = Notifier(settings.redis_url, self.keys)

    async def close(self) -> None:
        """Close the notifier and every pooled connection."""
        await self.notifier.close()
        await self.redis.aclose()
        await self.pool.disconnect()

    async def ping(self) -> None:
        """Raise BrokerConnectionError unless Redis answers."""
        try:
            await self.redis.ping()
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(
                f"cannot reach Redis at {hide_password(self.settings.redis_url)}: {exc}"
            ) from exc

    async def with_retry(self, policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
        """Run `call`, retrying connection errors by `policy`, then BrokerConnectionError."""
        retry = 0
        while True:
            try:
                return await call()
            except CONNECTION_ERRORS as exc:
                if retry >= policy.max_retries:
                    raise BrokerConnectionError(
                        f"cannot reach Redis at {hide_password(self.settings.redis_url)} "
                        f"after {retry + 1} tries: {exc}"
                    ) from exc
                await asyncio.sleep(policy.delay(retry))
                retry += 1

    async def enqueue(
        self, messages: Sequence[Message], ttls: Sequence[int], policy: RetryPolicy
    ) -> list[int]:
        """Enqueue messages in one script call. Encoding errors raise before any I/O.

        Ids are fixed before the first try, so a retried call never enqueues twice.
        """
        min_size = self.settings.compress_min_size
        reply = self.notifier.reply_channel
        args = [
            msg.enqueue_args(self.keys, ttl, min_size, reply)
            for msg, ttl in zip(messages, ttls, strict=True)
        ]
        prefix = self.keys.prefix

        async def call() -> list[int]:
            return await self.scripts.enqueue(
                prefix=prefix, now_ms=int(now() * 1000), mode="send", tasks=args
            )

        return await self.with_retry(policy, call)

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
        return TaskInfo.from_hash(task_id, await self.task_hash(task_id))

    async def task_state(self, task_id: str) -> TaskState:
        """The state of a task (PENDING when unknown)."""
        key = self.keys.task(task_id)

        async def call() -> bytes | None:
            raw: bytes | None = await cast(Any, self.redis).hget(key, "state")
            return raw

        raw = await self.with_retry(self.settings.retry_policy, call)
        return TaskState(raw.decode()) if raw else TaskState.PENDING

    async def revoke(self, task_id: str, terminate: bool = False) -> None:
        """Revoke a task; with terminate, tell the worker running it to cancel it."""
        prev = await self.scripts.revoke(
            prefix=self.keys.prefix,
            task_id=task_id,
            now_ms=int(now() * 1000),
            ttl=self.settings.result_ttl,
        )
        if terminate and prev == "STARTED":
            await self.redis.publish(self.keys.control_channel, f"revoke {task_id}")

    async def forget(self, task_id: str) -> None:
        """Delete a task's stored state and result."""
        await self.redis.delete(self.keys.task(task_id))

    async def store_progress(self, task_id: str, meta: dict[str, Any]) -> None:
        """Store progress metadata in the task hash and notify watchers."""
        key = self.keys.task(task_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            cast(Any, pipe).hset(key, "progress", codec.encode(meta, "msgpack")[0])
            pipe.publish(self.keys.done_channel(task_id), "progress")
            await pipe.execute()

    async def rate_wait(self, task_name: str, interval_ms: float) -> int:
        """Reserve a start slot under a task's rate limit; ms to wait for it."""
        return await self.scripts.rate(
            key=self.keys.rate(task_name), interval_ms=interval_ms, now_ms=int(now() * 1000)
        )

    async def chord_results(self, chord_id: str) -> list[Any]:
        """The header results of a chord, in header order."""
        raw: dict[bytes, bytes] = await cast(Any, self.redis).hgetall(
            self.keys.chord_results(chord_id)
        )
        out: list[Any] = [None] * len(raw)
        for idx, value in raw.items():
            ct, _, data = value.partition(b"\n")
            out[int(idx)] = codec.decode(data, ct.decode())
        return out

    async def chord_failure(self, chord_id: str) -> dict[str, Any]:
        """What made a chord fail: chord_id, task_id, exc_type, exc_message."""
        h: dict[bytes, bytes] = await cast(Any, self.redis).hgetall(self.keys.chord(chord_id))
        return {
            "chord_id": chord_id,
            "task_id": h.get(b"failed_id", b"").decode(),
            "exc_type": h.get(b"exc_type", b"").decode(),
            "exc_message": h.get(b"exc_message", b"").decode(),
        }
