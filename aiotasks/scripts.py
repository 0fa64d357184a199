"""Scripts: the one registry of `lua/*.lua`, each called as one typed, atomic call.

Every script is `_contract.lua` (generated: key builders, protocol version, entry
fields) + `_lib.lua` (shared helpers) + its own file, so shared logic lives in one place
and each script stays a single call. Each method's parameters follow the KEYS/ARGV
header of its `.lua` file; records and batches travel as one msgpack argument of named
fields (see contract.py).

On Redis 7+ and Valkey the scripts are one function library (FUNCTION LOAD, then FCALL):
the helpers are defined once when it loads, where an EVALSHA defines them all again on
every call (~7 µs of Redis CPU per call). Where the server has no functions (Redis 6.2)
or the ACL grants none, each script is an EVALSHA of the three files joined, exactly as
docs/protocol.md tells other producers to run them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

from .contract import PUBLISH, SHARDED_PUBLISH, Op, pack, unpack_reply, wire_ops
from .keys import GROUP, Keys

log = logging.getLogger("aiotasks.scripts")
#: The reasons already logged for running scripts by EVALSHA.
_SAID_NO_FUNCTIONS: set[str] = set()

NAMES = (
    "enqueue",
    "fetch",
    "reclaim",
    "release",
    "heartbeat",
    "finish",
    "revoke",
    "rate",
    "purge",
    "requeue",
    "acquire",
    "watch",
    "forget",
)


def _read(*files: str) -> str:
    """Files of `aiotasks/lua`, joined with a newline."""
    lua = resources.files("aiotasks") / "lua"
    return "\n".join((lua / f).read_text() for f in files)


#: The part every script shares: the contract, then the helpers.
_PRELUDE = ("_contract.lua", "_lib.lua")


def _source(name: str) -> str:
    return _read(*_PRELUDE, f"{name}.lua")


SOURCES: dict[str, str] = {name: _source(name) for name in NAMES}


def sharded(source: str) -> str:
    """A script that publishes with SPUBLISH: on a Cluster a channel's messages then go
    to the shard that owns its slot (the namespace's), not to every master."""
    line = f"local PUBLISH = '{PUBLISH}'"
    if line not in source:
        raise RuntimeError("_contract.lua no longer names the publish command")
    return source.replace(line, f"local PUBLISH = '{SHARDED_PUBLISH}'", 1)


#: Scripts that still run on a server out of memory (a function without this flag is
#: refused before it starts): they grow no memory, or free it. The heartbeat keeps the
#: leases of running tasks, which would otherwise run again after the outage.
_ALLOW_OOM = frozenset({"forget", "purge", "heartbeat"})

# Stands for the library's name while its text is hashed.
_NAME = "@aiotasks-library@"


@dataclass(frozen=True)
class Library:
    """The scripts as one function library: `name` carries a hash of the source, so
    workers of two versions (or a Cluster's SPUBLISH variant) never share functions."""

    name: str
    source: str

    def function(self, script: str) -> str:
        """The function name of a script (function names are global to a server)."""
        return f"{self.name}_{script}"


def library(sharded_pubsub: bool = False) -> Library:
    """The library of every script in NAMES: `_contract.lua` and `_lib.lua` run once as
    it loads; each script file is the body of its function (KEYS, ARGV its arguments)."""
    prelude = _read(*_PRELUDE)
    if sharded_pubsub:
        prelude = sharded(prelude)
    parts = [prelude]
    for script in NAMES:
        body = _read(f"{script}.lua")
        flags = "'allow-oom'" if script in _ALLOW_OOM else ""
        parts.append(
            f"redis.register_function{{function_name = '{_NAME}_{script}', flags = {{{flags}}},"
            f"\ncallback = function(KEYS, ARGV)\n{body}\nend}}"
        )
    text = "\n".join(parts)
    # The whole text, flags and wrapping included: any change is a new library.
    name = f"aiotasks_{hashlib.sha1(text.encode()).hexdigest()[:16]}"
    return Library(name, f"#!lua name={name}\n" + text.replace(_NAME, name))


LIBRARIES: dict[bool, Library] = {False: library(False), True: library(True)}


def _missing_function(exc: ResponseError) -> bool:
    """The server lacks this version's library (never loaded, or a restart lost it)."""
    return "function not found" in str(exc).lower()


def _no_functions(exc: ResponseError) -> bool:
    """The server has no functions (Redis 6.2), or the ACL allows none (a refusal of a
    command inside a script is no NoPermissionError: ERR ACL failure in script)."""
    text = str(exc).lower()
    if isinstance(exc, NoPermissionError):
        return "'fcall'" in text or "'function" in text
    return text.startswith(("unknown command 'fcall'", "unknown command `fcall`"))  # 7.x, 6.x


Record = Mapping[str, Any]


#: redis-py's socket timeout where the client's settings name none (redis-py 8: 5 s).
_REDIS_PY_SOCKET_TIMEOUT = 5.0


def longest_block_ms(redis: Redis) -> int:
    """The longest blocking read the client's socket timeout lets through: half of it.
    A worker's idle wait (`block`) beyond it would read as a lost connection."""
    kwargs = (
        redis.nodes_manager.connection_kwargs
        if isinstance(redis, RedisCluster)
        else redis.connection_pool.connection_kwargs
    )
    timeout = kwargs.get("socket_timeout", _REDIS_PY_SOCKET_TIMEOUT)
    return max(1, int(timeout * 500)) if timeout else 2**31


class Scripts:
    """The Lua scripts registered on one Redis client, under one key prefix."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        sharded_pubsub: bool = False,
        own: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        """`sharded_pubsub`: the scripts publish with SPUBLISH (a Cluster). `own`: `redis`
        is theirs alone (Client.own_scripts), closed by close(), which then calls
        `on_close`."""
        self._own = own
        self._on_close = on_close
        self.prefix = keys.prefix
        # Every call names the prefix and the guard first (see Keys.guard).
        self._fixed = [keys.prefix, keys.guard]
        self._redis = redis
        self._s: dict[str, AsyncScript] = {
            name: redis.register_script(sharded(src) if sharded_pubsub else src)
            for name, src in SOURCES.items()
        }
        self._lib = LIBRARIES[sharded_pubsub]
        # None: not known yet; False: EVALSHA (no functions on this server, or no right).
        self.functions: bool | None = None
        self._longest_block_ms = longest_block_ms(redis)

    async def _call(self, script: str, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script: FCALL, loading the library when the server lacks it, or
        EVALSHA where functions are unavailable."""
        if self.functions is not False:
            try:
                res = await self._fcall(script, keys, args)
            except ResponseError as exc:
                if not _no_functions(exc):
                    raise
                self.functions = False
                if str(exc) not in _SAID_NO_FUNCTIONS:  # once per process, not per client
                    _SAID_NO_FUNCTIONS.add(str(exc))
                    log.info("Redis runs no functions here (%s): aiotasks uses EVALSHA", exc)
            else:
                self.functions = True
                return res
        return await self._s[script](keys=keys, args=args)

    async def _fcall(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        fcall = cast(Any, self._redis).fcall
        function = self._lib.function(script)
        try:
            return await fcall(function, len(keys), *keys, *args)
        except ResponseError as exc:
            if not _missing_function(exc):
                raise
        await self.load()
        return await fcall(function, len(keys), *keys, *args)

    @property
    def own(self) -> bool:
        """Whether these scripts hold a connection of their own (Client.own_scripts)."""
        return self._own

    async def close(self) -> None:
        """Give back the connection of scripts made with one of their own."""
        if self._own:
            self._own = False
            try:
                await self._redis.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close()

    @property
    def library_name(self) -> str:
        """The name of this release's function library."""
        return self._lib.name

    async def load(self) -> None:
        """Load this release's library (on every master of a Cluster). REPLACE: two
        processes may load it at once, and the code under one name is always the same
        (the name is a hash of it)."""
        await cast(Any, self._redis).function_load(self._lib.source, replace=True)

    async def enqueue(self, *, now_ms: int, mode: str, tasks: Sequence[Record]) -> list[int]:
        """Enqueue a batch of task records; 1 (enqueued) or 0 (kept) per record."""
        return await self._call(  # type: ignore[no-any-return]
            "enqueue",
            keys=self._fixed,
            args=[now_ms, mode, pack(tasks)],
        )

    async def fetch(
        self,
        *,
        streams: Sequence[str],
        consumer: str,
        count: int,
        now_ms: int,
        worker: str,
        promote_limit: int,
        default_ttl: int,
        wait: tuple[int, Mapping[str, bytes]] | None = None,
    ) -> dict[bytes, Any]:
        """Promote due tasks, then read and start up to `count` entries.

        `wait`: (block_ms, tips), tips being the reply of the fetch that read nothing:
        first wait up to block_ms for a new entry, in the same round trip (an idle
        worker's fetch).
        """
        keys = [*self._fixed, *streams]
        block_ms, tips = wait if wait is not None else (0, None)
        block_ms = min(block_ms, self._longest_block_ms)
        packed_tips: str | bytes = pack(dict(tips)) if tips is not None else ""
        args: list[str | int | bytes] = [consumer, count, now_ms, worker]
        args += [promote_limit, default_ttl, packed_tips, block_ms]
        if wait is None:
            raw = await self._call("fetch", keys=keys, args=args)
            return unpack_reply(raw)  # type: ignore[no-any-return]
        return await self._wait_then_fetch(keys, args, streams, consumer, block_ms)

    async def _wait_then_fetch(
        self,
        keys: list[str],
        args: list[str | int | bytes],
        streams: Sequence[str],
        consumer: str,
        block_ms: int,
    ) -> dict[bytes, Any]:
        """A blocking XREADGROUP (one consumer gets each new entry, so one idle worker
        wakes) and fetch.lua in one pipeline: Redis runs the fetch the moment the read
        returns, and it starts what the read delivered by fetch.lua's rules (revoked and
        expired entries, priorities)."""
        wait = {stream: ">" for stream in streams}
        if isinstance(self._redis, RedisCluster):
            # redis-py refuses scripts in a cluster pipeline: two round trips there.
            gone = False
            try:
                await self._redis.xreadgroup(GROUP, consumer, wait, count=1, block=block_ms)
            except ResponseError as exc:
                gone = "NOGROUP" in str(exc)  # see below
            reply: dict[bytes, Any] = unpack_reply(await self._call("fetch", keys=keys, args=args))
            if gone:
                reply[b"group_gone"] = 1
            return reply
        functions = self.functions is True
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xreadgroup(GROUP, consumer, wait, count=1, block=block_ms)  # type: ignore[arg-type]
            if functions:
                pipe.fcall(self._lib.function("fetch"), len(keys), *keys, *args)
            else:
                # EVALSHA by hand: a registered script in a pipeline costs a SCRIPT
                # EXISTS round trip on every execute.
                pipe.evalsha(self._s["fetch"].sha, len(keys), *keys, *args)
            woken, raw = await pipe.execute(raise_on_error=False)
        if isinstance(raw, NoScriptError) or (
            functions
            and isinstance(raw, ResponseError)
            and (_missing_function(raw) or _no_functions(raw))
        ):  # the server forgot it (restarted), or functions went (an ACL edit, a failover
            # to Redis 6.2): _call loads it, or falls back to EVALSHA, and runs it
            raw = await self._call("fetch", keys=keys, args=args)
        elif isinstance(raw, BaseException):
            raise raw
        res: dict[bytes, Any] = unpack_reply(raw)
        lost_group = isinstance(woken, ResponseError) and "NOGROUP" in str(woken)
        if isinstance(woken, BaseException) and not lost_group and not res[b"entries"]:
            raise woken  # e.g. NOPERM: say so rather than spin
        if lost_group:
            # A stream without its group: fetch.lua recreates it and reports the loss
            # when the stream holds entries; an empty one is left to the caller
            # (Client.ensure_groups), `group_gone` says so.
            res[b"group_gone"] = 1
        return res

    async def release(
        self, *, streams: Sequence[str], consumer: str, entries: Sequence[Record]
    ) -> int:
        """Give entries read ahead but never begun back to their streams."""
        return await self._call(  # type: ignore[no-any-return]
            "release",
            keys=[*self._fixed, *streams],
            args=[consumer, pack(entries)],
        )

    async def reclaim(
        self,
        *,
        streams: Sequence[str],
        consumer: str,
        min_idle_ms: int,
        count: int,
        now_ms: int,
        worker: str,
        max_deliveries: int,
        default_ttl: int,
        queue_of: Mapping[str, str],
        alone_from: int = 0,
        may_take_alone: bool = False,
    ) -> dict[bytes, Any]:
        """Claim entries idle past the visibility timeout; dead-letter over-delivered ones.

        An entry at its `alone_from`-th delivery or later is claimed only when
        `may_take_alone` (the caller runs nothing), and then alone (flagged `alone`);
        `waiting` counts those left for an idle worker."""
        raw = await self._call(
            "reclaim",
            keys=[*self._fixed, *streams],
            args=[
                consumer,
                min_idle_ms,
                count,
                now_ms,
                worker,
                max_deliveries,
                default_ttl,
                pack(dict(queue_of)),
                alone_from,
                "1" if may_take_alone else "0",
            ],
        )
        return unpack_reply(raw)  # type: ignore[no-any-return]

    async def heartbeat(
        self, *, streams: Sequence[str], consumer: str, entries: Sequence[Record], now_ms: int
    ) -> int:
        """Refresh the idle time (and slot leases) of running entries."""
        return await self._call(  # type: ignore[no-any-return]
            "heartbeat",
            keys=[*self._fixed, *streams],
            args=[consumer, pack(entries), now_ms],
        )

    async def acquire(self, *, now_ms: int, requests: Sequence[Record]) -> list[int]:
        """Take concurrency slots ({key, limit, id, lease} each); 1 = held, 0 = at limit."""
        return await self._call(  # type: ignore[no-any-return]
            "acquire",
            keys=self._fixed,
            args=[now_ms, pack(requests)],
        )

    async def watch(self, *, task_id: str, ttl: int) -> int:
        """Mark a task watched: its STARTED and final state get published (watch.lua)."""
        return await self._call(  # type: ignore[no-any-return]
            "watch",
            keys=self._fixed,
            args=[task_id, ttl],
        )

    async def forget(self, *, task_id: str) -> int:
        """Delete a finished task's record; 0 when it is live or unknown (forget.lua)."""
        return await self._call("forget", keys=self._fixed, args=[task_id])  # type: ignore[no-any-return]

    async def finish(self, *, streams: Sequence[str], now_ms: int, ops: Sequence[Op]) -> int:
        """Apply a batch of done/ack/dead/enqueue/chord ops atomically (see finish.lua)."""
        return await self._call(  # type: ignore[no-any-return]
            "finish",
            keys=[*self._fixed, *streams],
            args=[now_ms, pack(wire_ops(ops))],
        )

    async def rate(self, *, task_name: str, interval_ms: float, now_ms: int) -> int:
        """Reserve the next start slot under a rate limit; ms to wait for it (0 = now)."""
        return int(
            await self._call("rate", keys=self._fixed, args=[task_name, interval_ms, now_ms])
        )

    async def revoke(self, *, task_id: str, now_ms: int, ttl: int) -> str:
        """Revoke a task; returns its state before the call ('' when unknown)."""
        res = await self._call("revoke", keys=self._fixed, args=[task_id, now_ms, ttl])
        return res.decode() if isinstance(res, bytes) else str(res)

    async def purge(
        self,
        *,
        streams: Sequence[str],
        queue: str,
        now_ms: int,
        ttl: int,
        limit: int,
        mode: str,
        bound: str | bytes,
    ) -> tuple[int, bytes]:
        """Delete one chunk of a queue's waiting tasks: (deleted, next) (see purge.lua)."""
        raw = await self._call(
            "purge", keys=[*self._fixed, *streams], args=[queue, now_ms, ttl, limit, mode, bound]
        )
        res = unpack_reply(raw)
        return int(res[b"deleted"]), res[b"next"]

    async def requeue(
        self,
        *,
        dead: str,
        fallback: str,
        queue: str,
        now_ms: int,
        ttl: int,
        entries: Sequence[Record],
    ) -> list[bytes]:
        """Move dead letters ({entry, name} maps) back to their streams; the ids moved."""
        return await self._call(  # type: ignore[no-any-return]
            "requeue",
            keys=[*self._fixed, dead, fallback],
            args=[queue, now_ms, ttl, pack(entries)],
        )
