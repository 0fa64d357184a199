"""Scripts: loads `lua/*.lua` and calls each as one typed, atomic EVALSHA.

`lua/_lib.lua` holds the helpers that several scripts share; it is prepended to every
script, so the shared logic lives in one file and each script stays a single call.
Each method's parameters follow the KEYS/ARGV header of its `.lua` file.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import msgpack  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .keys import GROUP

Arg = str | bytes | int | float

# Batches go to Lua as one msgpack argument (cmsgpack.unpack there): redis-py packs one
# argument instead of dozens per task. The old raw type carries bytes, as cmsgpack wants.
_packer = msgpack.Packer(use_bin_type=False)


def pack(value: Any) -> bytes:
    """Encode a batch for a Lua script's cmsgpack.unpack."""
    return _packer.pack(value)  # type: ignore[no-any-return]


_NAMES = (
    "enqueue",
    "fetch",
    "start",
    "reclaim",
    "release",
    "heartbeat",
    "finish",
    "revoke",
    "rate",
)


def _source(name: str) -> str:
    lua = resources.files("aiotasks") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


SOURCES: dict[str, str] = {name: _source(name) for name in _NAMES}


class Scripts:
    """The Lua scripts registered on one Redis client."""

    def __init__(self, redis: Redis) -> None:
        self._s: dict[str, AsyncScript] = {
            name: redis.register_script(src) for name, src in SOURCES.items()
        }

    async def enqueue(
        self, *, prefix: str, now_ms: int, mode: str, tasks: Sequence[Sequence[Arg]]
    ) -> list[int]:
        """Enqueue a batch; each task is the 14 values of enqueue.lua."""
        return await self._s["enqueue"](keys=[prefix], args=[now_ms, mode, pack(tasks)])  # type: ignore[no-any-return]

    async def fetch(
        self,
        *,
        prefix: str,
        streams: Sequence[str],
        consumer: str,
        count: int,
        now_ms: int,
        worker: str,
        promote_limit: int,
        default_ttl: int,
    ) -> list[Any]:
        """Promote due tasks, then read and start up to `count` entries."""
        return await self._s["fetch"](  # type: ignore[no-any-return]
            keys=[prefix, *streams],
            args=[GROUP, consumer, count, now_ms, worker, promote_limit, default_ttl],
        )

    async def start(
        self,
        *,
        prefix: str,
        streams: Sequence[str],
        now_ms: int,
        worker: str,
        default_ttl: int,
        entries: Sequence[Arg],
    ) -> list[int]:
        """Start entries delivered by a blocking read; 8 values per entry (see start.lua)."""
        return await self._s["start"](  # type: ignore[no-any-return]
            keys=[prefix, *streams], args=[GROUP, now_ms, worker, default_ttl, *entries]
        )

    async def release(
        self,
        *,
        prefix: str,
        streams: Sequence[str],
        consumer: str,
        entries: Sequence[Arg],
    ) -> int:
        """Give entries read ahead but never begun back to their streams (see release.lua)."""
        return await self._s["release"](  # type: ignore[no-any-return]
            keys=[prefix, *streams], args=[GROUP, consumer, *entries]
        )

    async def reclaim(
        self,
        *,
        prefix: str,
        streams: Sequence[str],
        consumer: str,
        min_idle_ms: int,
        count: int,
        now_ms: int,
        worker: str,
        max_deliveries: int,
        default_ttl: int,
    ) -> list[Any]:
        """Claim entries idle past the visibility timeout; dead-letter over-delivered ones."""
        return await self._s["reclaim"](  # type: ignore[no-any-return]
            keys=[prefix, *streams],
            args=[GROUP, consumer, min_idle_ms, count, now_ms, worker, max_deliveries, default_ttl],
        )

    async def heartbeat(
        self, *, prefix: str, streams: Sequence[str], consumer: str, entries: Sequence[Arg]
    ) -> int:
        """Refresh the idle time of running entries; `entries` is key_index, entry_id pairs."""
        return await self._s["heartbeat"](  # type: ignore[no-any-return]
            keys=[prefix, *streams], args=[GROUP, consumer, *entries]
        )

    async def finish(
        self, *, prefix: str, streams: Sequence[str], now_ms: int, ops: Sequence[Sequence[Any]]
    ) -> int:
        """Apply a batch of done/ack/dead/enqueue/chord ops atomically (see finish.lua)."""
        return await self._s["finish"](  # type: ignore[no-any-return]
            keys=[prefix, *streams], args=[now_ms, pack(ops)]
        )

    async def rate(self, *, key: str, interval_ms: float, now_ms: int) -> int:
        """Reserve the next start slot under a rate limit; ms to wait for it (0 = now)."""
        return int(await self._s["rate"](keys=[key], args=[interval_ms, now_ms]))

    async def revoke(self, *, prefix: str, task_id: str, now_ms: int, ttl: int) -> str:
        """Revoke a task; returns its state before the call ('' when unknown)."""
        res = await self._s["revoke"](keys=[prefix], args=[task_id, now_ms, ttl])
        return res.decode() if isinstance(res, bytes) else str(res)
