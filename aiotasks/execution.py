"""Running one delivered message: decode, context, soft/hard timeouts, and the outcome.

The outcome becomes finish.lua ops (see Worker.commit); nothing here talks to Redis
except reading a chord's header results for its body.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from . import codec
from .backoff import exponential
from .context import TaskContext, _current
from .errors import Retry, SerializationError, SoftTimeLimitExceeded
from .hooks import Hooks
from .message import RATE_RESERVED, Message, decode_entry, now
from .task import Task

if TYPE_CHECKING:
    from .slots import Lease
    from .worker import Delivery, Worker

log = logging.getLogger("aiotasks.worker")

#: Seconds a hard-timed-out coroutine gets to unwind before its slot is taken back.
HARD_TIMEOUT_GRACE = 0.5


@dataclass(slots=True)
class Limits:
    """Timer state shared between a running task and the callbacks that interrupt it."""

    soft: float | None
    hard: float | None
    soft_pending: bool = False
    soft_fired: bool = False
    hard_fired: bool = False
    revoked: bool = False
    abandoned: bool = False


class Interruptible:
    """Awaits a coroutine, turning our soft-timeout cancellation into SoftTimeLimitExceeded.

    asyncio can only inject CancelledError; this driver catches the cancellation we
    caused and throws SoftTimeLimitExceeded into the coroutine at its current await
    instead, so the task can `except SoftTimeLimitExceeded`, clean up and return.
    """

    __slots__ = ("coro", "limits")

    def __init__(self, coro: Coroutine[Any, Any, Any], limits: Limits) -> None:
        self.coro = coro
        self.limits = limits

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, limits = self.coro, self.limits
        value: Any = None
        exc: BaseException | None = None
        while True:
            try:
                if exc is None:
                    yielded = coro.send(value)
                else:
                    pending, exc = exc, None
                    yielded = coro.throw(pending)
            except StopIteration as stop:
                return stop.value
            value = None
            try:
                value = yield yielded
            except asyncio.CancelledError as cancel:
                if limits.soft_pending:
                    limits.soft_pending = False
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    exc = SoftTimeLimitExceeded(f"soft time limit ({limits.soft} s) exceeded")
                else:
                    exc = cancel
            except BaseException as other:
                exc = other


@dataclass(slots=True)
class Outcome:
    """How a run ended: state plus value, or the error's type, message and traceback."""

    state: str
    value: Any = None
    exc_type: str = ""
    exc_message: str = ""
    traceback: str = ""
    retry_at: float | None = None  # set when the task is to run again
    exc: BaseException | None = None


def failure(exc: BaseException, exc_type: str | None = None) -> Outcome:
    """A FAILURE outcome for an exception, with its formatted traceback."""
    tb = exc.__traceback__
    # Start the traceback at the task's own code, not at the worker's frames.
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return Outcome(
        "FAILURE",
        exc_type=exc_type or type(exc).__name__,
        exc_message=str(exc),
        traceback=text,
        exc=exc,
    )


class Execution:
    """One delivery being run by a worker."""

    def __init__(self, worker: Worker, delivery: Delivery, lease: Lease) -> None:
        self.worker = worker
        self.delivery = delivery
        self.lease = lease
        self.limits = Limits(None, None)
        self.task: asyncio.Task[None] | None = None
        self.msg: Message | None = None
        self.ctx: TaskContext | None = None
        self.begun = False  # it got its slot and started (a read-ahead entry waits first)
        self.revoke_requested = False  # revoked with terminate=True, maybe before it began
        self.tid: str | None = None  # the task id, as the worker's revoke lookup knows it
        self.lease_was_given = lease.held
        self.started = time.perf_counter()
        self._timers: list[asyncio.TimerHandle] = []

    async def run(self) -> None:
        """Decode and run; the outcome goes to the worker's commit buffer."""
        d = self.delivery
        try:
            task_id = d.fields[b"id"].decode()
        except (KeyError, UnicodeDecodeError):
            task_id = ""
        try:
            msg = decode_entry(task_id, d.fields[b"m"], d.fields[b"ct"].decode())
        except (SerializationError, KeyError, UnicodeDecodeError, TypeError, ValueError) as exc:
            self.worker.dead_letter(self, task_id, "DecodeError", f"cannot decode message: {exc}")
            return
        self.msg = msg
        task = self.worker.app.tasks.get(msg.name)
        if task is None:
            self.worker.dead_letter(
                self,
                task_id,
                "UnknownTask",
                f"no task named {msg.name!r} is registered on worker {self.worker.name}",
            )
            return
        outcome = await self._run_task(task, msg)
        if outcome is not None and not self.limits.abandoned:
            self.worker.finish(self, task, msg, outcome)
            hooks = self.worker.app.hooks
            if hooks and self.ctx is not None:
                await self._after(hooks, outcome)

    async def _after(self, hooks: Hooks, outcome: Outcome) -> None:
        if outcome.state == "SUCCESS" and hooks.success:
            await hooks.call(hooks.success, self.ctx, outcome.value)
        elif outcome.state == "FAILURE" and hooks.failure:
            await hooks.call(hooks.failure, self.ctx, outcome.exc)
        elif outcome.state == "RETRY" and hooks.retry:
            await hooks.call(hooks.retry, self.ctx, outcome.exc)
        elif outcome.state == "REVOKED" and hooks.revoked:
            await hooks.call(hooks.revoked, self.ctx)

    async def _run_task(self, task: Task[Any, Any], msg: Message) -> Outcome | None:
        opts = task.opts
        max_retries = int(msg.opts.get("max_retries", opts.max_retries))
        ctx = TaskContext(
            id=msg.id,
            name=msg.name,
            attempt=msg.retries + self.delivery.deliveries,
            max_retries=max_retries,
            queue=msg.queue,
            app=self.worker.app,
            retries=msg.retries,
            _slot=self.lease,
        )
        self.limits = Limits(
            msg.opts.get("soft_timeout", opts.soft_timeout),
            msg.opts.get("hard_timeout", opts.hard_timeout),
        )
        if self.revoke_requested:
            return Outcome("REVOKED")  # terminated before its body began: never run it
        self._arm()
        token = _current.set(ctx)
        self.ctx = ctx
        hooks = self.worker.app.hooks
        try:
            if task.rate_interval_ms and RATE_RESERVED not in msg.opts:
                wait_ms = await self.worker.app.broker.rate_wait(task.name, task.rate_interval_ms)
                if wait_ms > 0:
                    return Outcome("DEFER", retry_at=now() + wait_ms / 1000)
            if hooks.start:
                await hooks.call(hooks.start, ctx)
            ctx.started = time.perf_counter()
            args = await self._args(msg)
            value = await self._invoke(task, args, msg.kwargs)
            return Outcome("SUCCESS", value)
        except asyncio.CancelledError as cancel:
            return self._cancelled(task, msg, max_retries, cancel)
        except Retry as r:
            return self._retry(task, msg, max_retries, r.exc or r, r)
        except Exception as exc:
            if opts.autoretry_for and isinstance(exc, opts.autoretry_for):
                return self._retry(task, msg, max_retries, exc, None)
            return failure(exc)
        finally:
            _current.reset(token)
            for timer in self._timers:
                timer.cancel()

    def _cancelled(
        self, task: Task[Any, Any], msg: Message, max_retries: int, cancel: asyncio.CancelledError
    ) -> Outcome:
        limits = self.limits
        if not (limits.hard_fired or limits.revoked or limits.soft_fired):
            raise cancel  # the worker is stopping: leave the entry to be redelivered
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        if limits.revoked:
            return Outcome("REVOKED")
        from .errors import TimeLimitExceeded

        if limits.hard_fired:
            err: Exception = TimeLimitExceeded(f"hard time limit ({limits.hard} s) exceeded")
        else:  # a thread task at its soft limit: the thread cannot be interrupted
            err = SoftTimeLimitExceeded(f"soft time limit ({limits.soft} s) exceeded")
        if task.opts.autoretry_for and isinstance(err, task.opts.autoretry_for):
            return self._retry(task, msg, max_retries, err, None)
        return failure(err)

    def _retry(
        self,
        task: Task[Any, Any],
        msg: Message,
        max_retries: int,
        exc: BaseException,
        r: Retry | None,
    ) -> Outcome:
        if r is not None and r.max_retries is not None:
            max_retries = r.max_retries
        if msg.retries >= max_retries:
            cause = (
                exc
                if not isinstance(exc, Retry)
                else RuntimeError(f"retry limit ({max_retries}) exceeded")
            )
            return failure(cause)
        opts = task.opts
        if r is not None and r.eta is not None:
            at = r.eta.timestamp()
        elif r is not None and r.countdown is not None:
            at = now() + r.countdown
        elif opts.retry_backoff:
            base = 1.0 if opts.retry_backoff is True else float(opts.retry_backoff)
            at = now() + exponential(msg.retries, base, opts.retry_backoff_max, opts.retry_jitter)
        else:
            at = now()
        out = failure(exc) if not isinstance(exc, Retry) else Outcome("RETRY", exc=exc)
        out.state, out.retry_at = "RETRY", at
        return out

    async def _args(self, msg: Message) -> list[Any]:
        args = list(msg.args)
        if msg.chord_body:
            args.insert(0, await self.worker.app.broker.chord_results(msg.chord_body))
        elif msg.chord_errback:
            args.insert(0, await self.worker.app.broker.chord_failure(msg.chord_errback))
        return args

    async def _invoke(self, task: Task[Any, Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        if task.is_async:
            return await Interruptible(task.fn(*args, **kwargs), self.limits)  # type: ignore[arg-type]
        from anyio.to_thread import run_sync  # loaded with the first `def` task only

        return await run_sync(
            partial(task.fn, *args, **kwargs),
            abandon_on_cancel=True,
            limiter=self.worker.thread_limiter(),
        )

    # -- timers ------------------------------------------------------------------------

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        if self.limits.soft is not None:
            self._timers.append(loop.call_later(self.limits.soft, self._soft))
        if self.limits.hard is not None:
            self._timers.append(loop.call_later(self.limits.hard, self._hard))

    def _soft(self) -> None:
        if self.task is not None and not self.task.done():
            self.limits.soft_pending = self.limits.soft_fired = True
            self.task.cancel()

    def _hard(self) -> None:
        if self.task is None or self.task.done():
            return
        self.limits.hard_fired = True
        self.limits.soft_pending = False
        self.task.cancel()
        # Do not wait forever on a coroutine that swallows cancellation.
        asyncio.get_running_loop().call_later(HARD_TIMEOUT_GRACE, self._abandon)

    def cancel_revoked(self) -> None:
        """Cancel the running task because it was revoked with terminate=True.

        Before its body began, the run is only marked: `_run_task` then ends it REVOKED.
        """
        self.revoke_requested = True
        if self.begun and self.task is not None and not self.task.done():
            self.limits.revoked = True
            self.limits.soft_pending = False
            self.task.cancel()
            asyncio.get_running_loop().call_later(HARD_TIMEOUT_GRACE, self._abandon)

    def _abandon(self) -> None:
        if self.task is None or self.task.done() or self.msg is None:
            return
        task = self.worker.app.tasks[self.msg.name]
        self.limits.abandoned = True
        log.error(
            "task %s[%s] ignored cancellation; abandoning it and freeing its slot",
            self.msg.name,
            self.msg.id,
        )
        if self.limits.revoked:
            outcome = Outcome("REVOKED")
        else:
            from .errors import TimeLimitExceeded

            outcome = failure(
                TimeLimitExceeded(
                    f"hard time limit ({self.limits.hard} s) exceeded; the task ignored "
                    "cancellation and was abandoned"
                )
            )
        self.worker.finish(self, task, self.msg, outcome)
        self.worker.abandon(self)


def encode_result(value: Any, msg: Message) -> tuple[bytes, str]:
    """Encode a task's return value with the message's serializer."""
    return codec.encode(value, msg.serializer, msg.compression)
