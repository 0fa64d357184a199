"""TaskHandle, GroupHandle, TaskInfo and TaskState: reading a task from outside."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import codec
from .backoff import Backoff
from .context import current_task_or_none
from .errors import (
    CONNECTION_ERRORS,
    BrokerConnectionError,
    ChordError,
    ResultTimeout,
    SerializationError,
    TaskFailed,
    TaskRevoked,
)

if TYPE_CHECKING:
    from .app import App

R = TypeVar("R")


_RIDE_OUT: tuple[type[BaseException], ...] = (BrokerConnectionError, *CONNECTION_ERRORS)


class TaskState(StrEnum):
    """Where a task is in its life. PENDING also means unknown."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"

    @property
    def is_final(self) -> bool:
        """True for SUCCESS, FAILURE and REVOKED."""
        return self in _FINAL


_FINAL = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})


def _ts(raw: bytes | None) -> datetime | None:
    return datetime.fromtimestamp(int(raw) / 1000, UTC) if raw else None


def _text(raw: bytes | None) -> str | None:
    return raw.decode() if raw is not None else None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """Everything stored about a task. Timestamps are aware UTC datetimes."""

    id: str
    name: str | None
    state: TaskState
    result: Any
    exc_type: str | None
    exc_message: str | None
    traceback: str | None
    progress: dict[str, Any] | None
    attempts: int
    queue: str | None
    worker: str | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    failed_task_id: str | None = None

    @classmethod
    def from_hash(cls, task_id: str, h: dict[bytes, bytes]) -> TaskInfo:
        """Build from the task hash (an empty hash reads as PENDING)."""
        state = TaskState(h[b"state"].decode()) if b"state" in h else TaskState.PENDING
        result = progress = None
        if b"result" in h:
            try:
                result = codec.decode(h[b"result"], h.get(b"ct", b"msgpack").decode())
            except SerializationError as exc:
                result = exc
        if b"progress" in h:
            progress = codec.decode(h[b"progress"], "msgpack")
        return cls(
            id=task_id,
            name=_text(h.get(b"name")),
            state=state,
            result=result,
            exc_type=_text(h.get(b"exc_type")),
            exc_message=_text(h.get(b"exc_message")),
            traceback=_text(h.get(b"traceback")),
            progress=progress,
            attempts=int(h.get(b"attempts", 0)),
            queue=_text(h.get(b"queue")),
            worker=_text(h.get(b"worker")),
            enqueued_at=_ts(h.get(b"enqueued_at")),
            started_at=_ts(h.get(b"started_at")),
            finished_at=_ts(h.get(b"finished_at")),
            failed_task_id=_text(h.get(b"failed_task_id")),
        )

    def outcome(self) -> Any:
        """The result of a final state: the value, or the matching exception raised."""
        if self.state == TaskState.SUCCESS:
            if isinstance(self.result, SerializationError):
                raise self.result
            return self.result
        if self.state == TaskState.REVOKED:
            raise TaskRevoked(self.id)
        if self.exc_type == "ChordError":
            raise ChordError(
                self.id,
                "ChordError",
                self.exc_message or "",
                self.traceback,
                failed_task_id=self.failed_task_id or "",
            )
        raise TaskFailed(
            self.id, self.exc_type or "Exception", self.exc_message or "", self.traceback
        )


def _success(info: TaskInfo, ct: bytes, data: bytes) -> TaskInfo:
    """The info of a task whose success (and result) came in a notification."""
    try:
        result: Any = codec.decode(data, ct.decode())
    except SerializationError as exc:
        result = exc
    return replace(info, state=TaskState.SUCCESS, result=result)


class TaskHandle(Generic[R]):
    """A sent task: wait for its result, read its state, revoke or forget it."""

    __slots__ = ("id", "app")

    def __init__(self, app: App, task_id: str) -> None:
        self.app = app
        self.id = task_id

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def info(self) -> TaskInfo:
        """Everything stored about the task (PENDING when unknown)."""
        return await self.app.broker.task_info(self.id)

    async def state(self) -> TaskState:
        """The task's current state."""
        return await self.app.broker.task_state(self.id)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the task to finish and return its value.

        Waiting is woken by a notification, not by polling. Inside a task, the waiting
        task hands its worker slot back until it is woken.

        Raises:
            TaskFailed: the task raised (ChordError for a chord whose header failed).
            TaskRevoked: the task was revoked or expired.
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
        return info.outcome()  # type: ignore[no-any-return]

    async def _wait_final(self) -> TaskInfo:
        # Ride out a lost connection: re-subscribe and re-read until the caller's timeout.
        backoff = Backoff(start=0.05, cap=1.0)
        while True:
            try:
                return await self._wait_once()
            except _RIDE_OUT:
                await asyncio.sleep(backoff.next())

    async def _wait_once(self) -> TaskInfo:
        broker = self.app.broker
        notifier = broker.notifier
        async with notifier.watch_reply(self.id) as reply:
            raw = await broker.task_hash(self.id)
            info = TaskInfo.from_hash(self.id, raw)
            if info.state.is_final:
                return info
            if raw.get(b"reply", b"").decode() == notifier.reply_channel:
                # Sent by this App: its final state comes on our reply channel.
                while True:
                    state, ct, data = await reply.get()
                    if state == "SUCCESS" and ct is not None and data is not None:
                        return _success(info, ct, data)
                    if state in reply.RECHECK:
                        info = await broker.task_info(self.id)
                        if info.state.is_final:
                            return info
        async with notifier.watch(self.id) as watch:
            while True:
                info = await broker.task_info(self.id)
                if info.state.is_final:
                    return info
                # Only a final state (or a reconnect) is worth another read.
                while (await watch.get())[0] not in watch.RECHECK:
                    pass

    async def updates(self) -> AsyncIterator[TaskInfo]:
        """Yield the task's info at each state or progress change; ends after a final state.

        Rides out a lost connection: it re-subscribes and re-reads, yielding only changes.
        """
        last: TaskInfo | None = None
        backoff = Backoff(start=0.05, cap=1.0)
        while True:
            try:
                async with self.app.broker.notifier.watch(self.id) as watch:
                    while True:
                        info = await self.app.broker.task_info(self.id)
                        backoff.reset()
                        if info != last:
                            yield info
                            last = info
                        if info.state.is_final:
                            return
                        await watch.get()
            except _RIDE_OUT:
                await asyncio.sleep(backoff.next())

    async def revoke(self, terminate: bool = False) -> None:
        """Make sure the task never runs; with terminate=True also cancel it if running."""
        await self.app.broker.revoke(self.id, terminate=terminate)

    async def forget(self) -> None:
        """Delete the stored result; the task reads as PENDING (unknown) afterwards."""
        await self.app.broker.forget(self.id)


class GroupHandle:
    """The handles of a sent group, in order."""

    def __init__(self, app: App, handles: list[TaskHandle[Any]]) -> None:
        self.app = app
        self.handles = handles

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Any:
        return iter(self.handles)

    async def results(
        self, timeout: float | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        """The values of every task, in order.

        With return_exceptions=True, a failed or revoked task's exception takes its place
        in the list instead of being raised.

        Raises:
            ResultTimeout: `timeout` seconds passed before all finished.
        """
        ctx = current_task_or_none()
        waits = (self._one(h, return_exceptions) for h in self.handles)
        try:
            async with asyncio.timeout(timeout):
                if ctx is None:
                    return await asyncio.gather(*waits)
                async with ctx._slot_released():
                    return await asyncio.gather(*waits)
        except TimeoutError:
            raise ResultTimeout(f"group did not finish within {timeout} s") from None

    @staticmethod
    async def _one(handle: TaskHandle[Any], return_exceptions: bool) -> Any:
        try:
            return (await handle._wait_final()).outcome()
        except (TaskFailed, TaskRevoked) as exc:
            if return_exceptions:
                return exc
            raise
