"""Automatic batching of sends: the enqueues that coroutines ask for in one turn of the
event loop go to Redis as one enqueue.lua call (like ioredis' enableAutoPipelining).

A web server sending from a hundred requests at once pays one round trip per batch
instead of one per send. Each caller still gets its own result and its own error: a
batch that Redis refuses for what a record holds is split, so one bad record fails only
its own sender; a refusal about the server (OOM, NOPERM, NOREPLICAS...) fails all. A
lone send waits one loop turn more than it would unbatched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .config import RetryPolicy
from .errors import BrokerRefusedError

#: Most task records in one script call: a bigger batch is split, so one call never
#: holds the server for long.
MAX_BATCH = 1000

Enqueue = Callable[[list[dict[str, Any]], RetryPolicy], Awaitable[list[int]]]


class _Pending:
    __slots__ = ("tasks", "policy", "future")

    def __init__(
        self, tasks: list[dict[str, Any]], policy: RetryPolicy, future: asyncio.Future[list[int]]
    ) -> None:
        self.tasks = tasks
        self.policy = policy
        self.future = future


class SendBatcher:
    """Collects the enqueues of one loop turn and sends them together (one per loop).

    The first sender of a turn leads: it yields once, so that every coroutine ready in
    this turn can join, then sends. Alone (a sequential sender), it sends from its own
    task, paying one loop turn; with company, the batch goes from a task of its own, so
    that cancelling one sender never cancels the others' sends.
    """

    def __init__(self, enqueue: Enqueue) -> None:
        self._enqueue = enqueue
        self._pending: list[_Pending] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self, tasks: list[dict[str, Any]], policy: RetryPolicy) -> list[int]:
        """Enqueue `tasks` with the others sent in this loop turn; 1/0 per task."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if self._pending is not None:  # a leader collects this turn's sends
            self._pending.append(_Pending(tasks, policy, future))
            return await future
        self._pending = [_Pending(tasks, policy, future)]
        try:
            await asyncio.sleep(0)  # every coroutine ready in this turn has its go
        except asyncio.CancelledError:
            future.cancel()  # the others still go; this one does not
            raise
        finally:
            pending, self._pending = self._pending, None
            if len(pending) > 1:
                self._flush(pending)
        if len(pending) == 1:
            return await self._enqueue(tasks, policy)
        return await future

    def _flush(self, pending: list[_Pending]) -> None:
        by_policy: dict[RetryPolicy, list[_Pending]] = {}
        for p in pending:
            if not p.future.done():  # its sender was cancelled before the batch left
                by_policy.setdefault(p.policy, []).append(p)
        for policy, group in by_policy.items():
            batch: list[_Pending] = []
            size = 0
            for p in group:
                if batch and size + len(p.tasks) > MAX_BATCH:
                    self._start(batch, policy)
                    batch, size = [], 0
                batch.append(p)
                size += len(p.tasks)
            if batch:
                self._start(batch, policy)

    def _start(self, batch: list[_Pending], policy: RetryPolicy) -> None:
        task = asyncio.get_running_loop().create_task(self._send(batch, policy))
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending], policy: RetryPolicy) -> None:
        try:
            await self._send_batch(batch, policy)
        finally:
            # Whatever happened (the loop shutting down included), no sender waits on.
            for p in batch:
                if not p.future.done():
                    p.future.cancel()

    async def _send_batch(self, batch: list[_Pending], policy: RetryPolicy) -> None:
        tasks = [t for p in batch for t in p.tasks]
        try:
            out = await self._enqueue(tasks, policy)
        except BrokerRefusedError as exc:
            if len(batch) == 1 or exc.code != "ERR":
                # One sender, or a refusal about the server, not a record (its memory, an
                # ACL, its replicas, a failover, a loading server): each record would be
                # refused alike, and each alone again after its retries. Every sender
                # hears it as it would alone.
                for p in batch:
                    _fail(p, exc)
                return
            # Refused for what a record holds (enqueue.lua's error, an argument too big):
            # find whose; the others go through alone.
            await asyncio.gather(*(self._send_batch([p], policy) for p in batch))
            return
        except Exception as exc:  # unreachable Redis: all fail alike
            for p in batch:
                _fail(p, exc)
            return
        i = 0
        for p in batch:
            n = len(p.tasks)
            if not p.future.done():
                p.future.set_result(out[i : i + n])
            i += n


def _fail(p: _Pending, exc: BaseException) -> None:
    if not p.future.done():
        p.future.set_exception(exc)
