"""Connections whose torn-down transport reads as a lost connection.

redis-py's asyncio connection can be disconnected by another coroutine between its
"connected?" check and its write or read: on a cluster, a topology refresh after a MOVED
or ASK closes connections a command has just taken. The write then fails inside asyncio
with AttributeError or TypeError ('NoneType' object has no attribute 'writelines'; also
redis-py#4287 for a peer reset), or under uvloop with RuntimeError ("the handler is
closed"). No retry policy recognises those, so a send raised them to its caller, and a
worker stopped, in the middle of a slot migration. Here that failure is what it is, a
ConnectionError, and every retry loop waits it out like any other lost connection.

They also pack commands faster (see `_Guarded.pack_command`).

A connection that breaks also leaves its error in a future of asyncio's own, which the
stream marks seen only when it is collected; a disconnect here marks it seen at once (see
`_Guarded.disconnect`).
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError as RedisConnectionError


def _torn(exc: BaseException) -> bool:
    """What a write or read on a transport torn down under it raises: an attribute of
    None (the writer, reader or transport the disconnect cleared), a call of one, or
    uvloop's refusal to use a closed handle."""
    if isinstance(exc, AttributeError):
        return exc.obj is None
    if isinstance(exc, TypeError):
        return "'NoneType'" in str(exc)
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


class _Guarded:
    """Mixed in before a redis-py connection class (see `guarded`)."""

    _fast_pack: bool | None = None  # whether pack_command may skip redis-py's encoding

    def pack_command(self, *args: Any) -> list[bytes]:
        # redis-py encodes every argument in Python before hiredis packs them, about
        # 0.5 µs an argument: an idle worker's wake (a blocking read and fetch.lua in one
        # pipeline) names its streams four times, some 50 arguments, 34 µs to pack where
        # hiredis alone takes 4 (with the finish, 30% of a lone task's worker
        # instructions). hiredis packs str (as UTF-8), int, float (as repr) and bytes as
        # that encoding does; anything else (a bool, which redis-py refuses, a bytearray),
        # a memoryview (redis-py sends a large one as a chunk of its own, uncopied, and
        # refuses one with strides, which hiredis would pack wrong), a command name
        # redis-py would split ("CLIENT SETINFO", or with whitespace around it) or an
        # encoding of the client's own goes redis-py's way.
        fast = self._fast_pack
        if fast is None:
            encoder = getattr(self, "encoder", None)
            fast = self._fast_pack = (
                getattr(encoder, "encoding", None) in ("utf-8", "utf8")
                and getattr(encoder, "encoding_errors", None) == "strict"
            )
        head = args[0] if args else None
        if (
            fast
            and type(head) is str
            and head.split() == [head]
            and memoryview not in map(type, args)
        ):
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, UnicodeError):
                pass
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except (AttributeError, TypeError, RuntimeError) as exc:
            if not _torn(exc):
                raise
            raise await self._lost(exc) from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except (AttributeError, TypeError, RuntimeError) as exc:
            if not _torn(exc):
                raise
            raise await self._lost(exc) from exc

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        writer = getattr(self, "_writer", None)
        try:
            await super().disconnect(*args, **kwargs)  # type: ignore[misc]
        finally:
            _mark_seen(writer)

    async def _lost(self, exc: BaseException) -> RedisConnectionError:
        await self.disconnect(nowait=True)
        return RedisConnectionError(f"the connection was closed under a command ({exc})")


def _mark_seen(writer: Any) -> None:
    """Mark the error a closed stream keeps in a future of asyncio's own as seen."""
    # asyncio's stream protocol sets a broken connection's error on its `_closed` future,
    # which only `wait_closed()` (skipped by a disconnect after a failed command) or the
    # protocol's collection marks seen. When the collector frees the future first,
    # asyncio prints "Future exception was never retrieved" and a traceback, in a CLI
    # after its one error line and in a worker's log, for an error the command has
    # already raised as a ConnectionError. (`_protocol._closed` is asyncio's own, in
    # 3.11 to 3.13; without it, nothing is marked.)
    closed = getattr(getattr(writer, "_protocol", None), "_closed", None)
    if isinstance(closed, asyncio.Future):
        if closed.done():
            _seen(closed)  # now: a callback would wait a turn of the loop
        else:
            closed.add_done_callback(_seen)


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_MADE: dict[type, type] = {}
C = TypeVar("C", bound=AbstractConnection)


def guarded(cls: type[C]) -> type[C]:
    """`cls` (Connection, SSLConnection, a Sentinel's, ...) reporting a transport torn
    down mid-command as redis-py's ConnectionError."""
    if issubclass(cls, _Guarded):
        return cls
    made = _MADE.get(cls)
    if made is None:
        made = _MADE[cls] = type(f"Guarded{cls.__name__}", (_Guarded, cls), {})
    return cast("type[C]", made)


R = TypeVar("R", Redis, RedisCluster)


def guard_connections(client: R) -> R:
    """Make every connection `client` opens from now on a `guarded` one; the client."""
    if isinstance(client, RedisCluster):
        # Nodes found later are built from these kwargs; the startup nodes already are.
        kwargs = client.get_connection_kwargs()
        kwargs["connection_class"] = guarded(kwargs.get("connection_class") or Connection)
        for node in client.startup_nodes:
            node.connection_class = guarded(node.connection_class)
    else:
        pool = client.connection_pool
        pool.connection_class = guarded(pool.connection_class)
    return client
