"""TaskContext and current_task(): what a running task knows about itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from .errors import CONNECTION_ERRORS, BrokerConnectionError, Replace, Retry, SoftTimeLimitExceeded

if TYPE_CHECKING:
    from .app import App
    from .client import Client

log = logging.getLogger("aiotasks.worker")
_UNREACHABLE: tuple[type[BaseException], ...] = (BrokerConnectionError, *CONNECTION_ERRORS)


class Slot(Protocol):
    """A worker concurrency slot that a waiting task can hand back."""

    def release(self) -> None: ...

    def take_now(self) -> None: ...

    async def acquire(self) -> None: ...


class Ending(Protocol):
    """Whether a run was cancelled to end it (execution.Limits)."""

    hard_fired: bool
    revoked: bool


@dataclass(slots=True)
class TaskContext:
    """The running task: `id`, `name`, `attempt` (1-based), `max_retries`, `queue`, `app`."""

    id: str
    name: str
    attempt: int
    max_retries: int
    queue: str
    app: App
    client: Client
    retries: int = 0
    started: float = 0.0  # time.perf_counter() when the run began
    _slot: Slot | None = field(default=None, repr=False)
    inline: bool = False  # called as `await task(...)`: no worker, no broker
    # The run's timer state: whether it was cancelled to end (a hard timeout, a revoke).
    # Not a callback into the Execution: that would make every run a reference cycle.
    _limits: Ending | None = field(default=None, repr=False)
    # Progress not stored for a lost Redis was said once: a task reporting per item must
    # not fill the log with one line per item.
    _progress_lost: bool = field(default=False, repr=False)

    def retry(
        self,
        countdown: float | None = None,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """Build a Retry to raise: `raise current_task().retry(countdown=5)`."""
        return Retry(countdown=countdown, eta=eta, exc=exc, max_retries=max_retries)

    def replace(self, canvas: Any) -> Replace:
        """Build a Replace to raise: `raise current_task().replace(other.s(x))`.

        The task's handle then resolves to the final result of `canvas` (a signature or
        any canvas), which inherits this task's callbacks, chord and chain.
        """
        from .nodes import is_canvas

        if not is_canvas(canvas):
            raise TypeError(f"replace() takes a signature or a canvas, got {canvas!r:.60}")
        return Replace(canvas)

    async def progress(self, **meta: Any) -> None:
        """Store progress metadata; callers see it in info().progress and updates().
        A task called inline has no record to store it in: nothing is stored. A lost
        connection is retried as a send's is; past that the update is dropped, with a
        warning, and the task goes on (its outcome is stored once Redis is back)."""
        if self.inline:
            return
        try:
            await self.client.store_progress(self.id, meta)
        except _UNREACHABLE as exc:
            if not self._progress_lost:
                self._progress_lost = True
                log.warning(
                    "task %s[%s]: progress not stored (%s); later reports may be lost too",
                    self.name,
                    self.id,
                    exc,
                )

    @asynccontextmanager
    async def _slot_released(self) -> AsyncIterator[None]:
        # A parent waiting on a child gives its slot back, so the child can run here
        # even when every slot holds a waiting parent (no deadlock).
        slot = self._slot
        if slot is None:
            yield
            return
        slot.release()
        try:
            yield
        except asyncio.CancelledError:
            limits = self._limits
            if limits is not None and (limits.hard_fired or limits.revoked):
                # Ending (its hard timeout, a revoke): it runs no more work, so it does not
                # wait in line for a slot its child may hold for long; none is taken back.
                raise
            await slot.acquire()  # a timeout of its own (asyncio.timeout): it goes on
            raise
        except SoftTimeLimitExceeded:
            # Told to wrap up now: it goes on at once, over the limit until a task ends,
            # rather than after the children that hold the slots.
            slot.take_now()
            raise
        except BaseException:
            await slot.acquire()
            raise
        await slot.acquire()


class Run(Protocol):
    """A worker's run of a task (execution.Execution), which makes its TaskContext only
    when it is asked for: most bodies never ask."""

    def context(self) -> TaskContext: ...

    async def in_thread(self, call: Callable[[], Any]) -> Any:
        """Run a `def` body in one of the worker's threads (counted, limited)."""


#: The running task: its context, or the worker's run that makes it on first use.
_current: ContextVar[TaskContext | Run | None] = ContextVar("aiotasks_current_task", default=None)


def current_task() -> TaskContext:
    """The context of the task running in this coroutine or thread.

    Raises:
        RuntimeError: when called outside a task run by a worker.
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_task() called outside a running task")
    return ctx if isinstance(ctx, TaskContext) else ctx.context()


def current_task_or_none() -> TaskContext | None:
    """Like current_task(), but None outside a task."""
    ctx = _current.get()
    return ctx if ctx is None or isinstance(ctx, TaskContext) else ctx.context()
