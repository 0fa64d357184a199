"""TaskHandle and GroupHandle: waiting for, reading and acting on sent tasks."""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .backoff import Backoff
from .context import current_task_or_none
from .errors import (
    CONNECTION_ERRORS,
    BrokerConnectionError,
    BrokerRefusedError,
    ResultTimeout,
    TaskFailed,
    TaskLost,
    TaskRevoked,
)
from .state import TaskInfo, TaskState, with_success

if TYPE_CHECKING:
    from .client import Client
    from .notifier import Mailbox, Notifier

__all__ = ["GroupHandle", "TaskHandle", "TaskInfo", "TaskState"]

R = TypeVar("R")


_RIDE_OUT: tuple[type[BaseException], ...] = (BrokerConnectionError, *CONNECTION_ERRORS)
_WAIT_ERRORS: tuple[type[BaseException], ...] = (BrokerRefusedError, *_RIDE_OUT)


@dataclass(slots=True)
class _Sight:
    """What a waiter knows of its task across reconnects.

    `live`: the task existed (its record was read, or this App sent it); `epoch`: the
    notifier's reconnect count at that moment; `ridden_out`: a read failed on a lost
    connection since. A record that is gone after a reconnect was lost with the server's
    data: waiting on would never end.
    """

    live: bool
    epoch: int
    ridden_out: bool = False

    def check(self, task_id: str, raw: dict[bytes, bytes], notifier: Notifier) -> None:
        """Note a read of the task hash; raise TaskLost if its record vanished."""
        if b"state" in raw:  # a hash holding only a watch mark (_w) is no record
            self.live, self.epoch, self.ridden_out = True, notifier.reconnects, False
        elif self.live and (self.ridden_out or notifier.reconnects > self.epoch):
            raise TaskLost(task_id)


def _ride_out(exc: BaseException) -> bool:
    """Whether a waiter waits through this error (a lost connection, a loading server)."""
    if isinstance(exc, BrokerRefusedError):
        return exc.is_transient
    return isinstance(exc, _RIDE_OUT)


class TaskHandle(Generic[R]):
    """A sent task: wait for its result, read its state, revoke or forget it."""

    __slots__ = ("id", "client", "_load", "_sent_epoch", "_box")

    def __init__(
        self,
        client: Client,
        task_id: str,
        load: Callable[[Any], Any] | None = None,
        *,
        sent: bool = False,
        epoch: int | None = None,
        box: Mailbox | None = None,
    ) -> None:
        """`sent`: this App sent it; `epoch`: the notifier's reconnect count then, when
        the caller has read it already (a batch of sends reads it once); `box`: where
        its final state lands (Notifier.mailbox, taken before it was enqueued)."""
        client = client.for_task(task_id)  # the client of the task's shard
        self.client = client
        self.id = task_id
        # Rebuilds the value into the task's return annotation (a task known here).
        self._load = load
        # Sent by this App: the task existed then, so a later reconnect that finds no
        # record means the server lost it.
        if sent and epoch is None:
            epoch = client.notifier.reconnects
        self._sent_epoch = epoch if sent else None
        self._box = box

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def info(self) -> TaskInfo:
        """Everything stored about the task (PENDING when unknown)."""
        return await self.client.task_info(self.id)

    async def state(self) -> TaskState:
        """The task's current state."""
        return await self.client.task_state(self.id)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the task to finish and return its value.

        Waiting is woken by a notification, not by polling. Inside a task, the waiting
        task hands its worker slot back until it is woken.

        Raises:
            TaskFailed: the task raised (ChordError for a chord whose header failed).
            TaskRevoked: the task was revoked or expired.
            TaskLost: the task's record vanished across a reconnect (Redis lost its data).
            ResultTimeout: `timeout` seconds passed first.
        """
        ctx = current_task_or_none()
        try:
            async with asyncio.timeout(timeout):
                if ctx is None:
                    info = await self._wait_final()
                else:
                    async with ctx._slot_released():
                        info = await self._wait_final()
        except TimeoutError:
            raise ResultTimeout(f"task {self.id} did not finish within {timeout} s") from None
        return self._value(info)  # type: ignore[no-any-return]

    def _value(self, info: TaskInfo) -> Any:
        """The outcome of a final info: its value (rebuilt when we can), or the error."""
        value = info.outcome()
        return value if self._load is None or value is None else self._load(value)

    def _sight(self) -> _Sight:
        epoch = self._sent_epoch
        return _Sight(epoch is not None, epoch or 0)

    async def _read(self, sight: _Sight) -> tuple[TaskInfo, dict[bytes, bytes]]:
        client = self.client
        raw = await client.task_hash(self.id)
        sight.check(self.id, raw, client.notifier)
        return TaskInfo.from_hash(self.id, raw, client.read_limit), raw

    async def _wait_final(self) -> TaskInfo:
        box = self._box
        if box is not None and box.owner is self.client.notifier:
            # Sent from here while the reply channel was subscribed: its final state
            # comes to the mailbox, so no read first (one round trip less). Anything
            # but a success with its result (a failure, a reconnect) is read.
            state, ct, data = await box.get()
            if state == "SUCCESS" and ct is not None and data is not None:
                info = TaskInfo.from_hash(self.id, {})
                return with_success(info, ct, data, self.client.read_limit)
            self._box = None
        # Ride out a lost connection: re-subscribe and re-read until the caller's timeout.
        sight = self._sight()
        backoff = Backoff(start=0.05, cap=1.0)
        while True:
            try:
                return await self._wait_once(sight)
            except _WAIT_ERRORS as exc:
                if not _ride_out(exc):
                    raise
                sight.ridden_out = True
                await asyncio.sleep(backoff.next())

    async def _wait_once(self, sight: _Sight) -> TaskInfo:
        client = self.client
        notifier = client.notifier
        async with notifier.watch_reply(self.id) as reply:
            info, raw = await self._read(sight)
            if info.state.is_final:
                return info
            if raw.get(b"reply", b"").decode() == notifier.reply_channel:
                # Sent by this App: its final state comes on our reply channel.
                while True:
                    state, ct, data = await reply.get()
                    if state == "SUCCESS" and ct is not None and data is not None:
                        return with_success(info, ct, data, client.read_limit)
                    if state in reply.RECHECK:
                        info, _ = await self._read(sight)
                        if info.state.is_final:
                            return info
        async with notifier.watch(self.id) as watch:
            while True:
                info, _ = await self._read(sight)
                if info.state.is_final:
                    return info
                # Only a final state (or a reconnect) is worth another read.
                while (await watch.get())[0] not in watch.RECHECK:
                    pass

    async def updates(self) -> AsyncIterator[TaskInfo]:
        """Yield the task's info at each state or progress change; ends after a final state.

        Rides out a lost connection: it re-subscribes and re-reads, yielding only changes.

        Raises:
            TaskLost: the task's record vanished across a reconnect (Redis lost its data).
        """
        last: TaskInfo | None = None
        sight = self._sight()
        backoff = Backoff(start=0.05, cap=1.0)
        while True:
            try:
                async with self.client.notifier.watch(self.id) as watch:
                    while True:
                        info, _ = await self._read(sight)
                        backoff.reset()
                        if info != last:
                            yield info
                            last = info
                        if info.state.is_final:
                            return
                        await watch.get()
            except _WAIT_ERRORS as exc:
                if not _ride_out(exc):
                    raise
                sight.ridden_out = True
                await asyncio.sleep(backoff.next())

    async def revoke(self, terminate: bool = False) -> None:
        """Make sure the task never runs; with terminate=True also cancel it if running."""
        await self.client.revoke(self.id, terminate=terminate)

    async def forget(self) -> None:
        """Delete the stored result of a finished task; it reads as PENDING (unknown)
        afterwards. A task not finished yet is left alone: it has no result yet."""
        await self.client.forget(self.id)
        # A result that came to this handle's mailbox is forgotten too: result() reads
        # the task again, as a fresh handle of the id would.
        self._box = None


class GroupHandle:
    """The handles of a sent group, in order; `id` names the group itself."""

    def __init__(
        self,
        client: Client | None,
        handles: list[TaskHandle[Any]],
        group_id: str | None = None,
        *,
        empty: list[Any] | None = None,
    ) -> None:
        """`empty`: the result of a group that holds no task (`[[]]` for group(group([])))."""
        self.client = client
        self.handles = handles
        self.id = group_id or uuid.uuid4().hex
        self._empty = empty

    def __repr__(self) -> str:
        return f"GroupHandle({self.id!r}, {len(self.handles)} tasks)"

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Any:
        return iter(self.handles)

    async def results(
        self, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        """The values of every task, in order.

        With return_exceptions=True, a failed, revoked or lost task's exception takes its
        place in the list instead of being raised.

        Raises:
            ResultTimeout: `timeout` seconds passed before all finished.
        """
        if self._empty is not None:
            return copy.deepcopy(self._empty)
        ctx = current_task_or_none()
        waits = [self._one(h, return_exceptions) for h in self.handles]
        try:
            async with asyncio.timeout(timeout):
                if ctx is None:
                    return await _in_order(waits)
                async with ctx._slot_released():
                    return await _in_order(waits)
        except TimeoutError:
            raise ResultTimeout(f"group did not finish within {timeout} s") from None

    async def save(self, ttl: int | None = None) -> None:
        """Store the members' ids for `ttl` seconds (the App's result_ttl by default), so
        that `await app.group_handle(id)` finds the group in another process (Celery's
        GroupResult.save). Each save renews it.

        Raises:
            ValueError: the group holds no task (there is nothing to look up).
        """
        if self.client is None:
            raise ValueError("a group that holds no task has nothing to save")
        ttl = self.client.settings.result_ttl if ttl is None else int(ttl)
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 s, got {ttl}")
        await self.client.save_group(self.id, [h.id for h in self.handles], ttl)

    async def revoke(self, terminate: bool = False) -> None:
        """Revoke every member (Celery's GroupResult.revoke): each queued one never runs;
        with terminate=True a running one is cancelled. A member that is a chain or a
        chord is revoked through its final task, as its handle is."""
        # Last member first: those still queued are revoked before a running one is
        # cancelled, whose slot would otherwise go to the next member as it is reached.
        for handle in reversed(self.handles):
            await handle.revoke(terminate=terminate)

    @staticmethod
    async def _one(handle: TaskHandle[Any], return_exceptions: bool) -> Any:
        try:
            return handle._value(await handle._wait_final())
        except (TaskFailed, TaskRevoked, TaskLost) as exc:
            if return_exceptions:
                return exc
            raise


async def _in_order(waits: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Every wait's value, in order; all wait at once, and the first failure in member
    order is raised (as Celery's join does), not the first in time."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        return [await t for t in tasks]
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
            elif not t.cancelled():
                t.exception()  # retrieved: a later member's failure is not "never retrieved"
