"""Running one delivery: decode it once, run the task with its timeouts, return the outcome.

`Execution.decode()` then `Execution.run()` give an `Outcome` (a stopping worker's
cancellation leaves the entry pending); the worker turns it into finish.lua ops. Nothing
here writes to Redis: it only reads a chord's header results for a body and reserves
rate-limit slots.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from .backoff import exponential
from .context import TaskContext, _current
from .decode import DecodeError, decode_entry
from .errors import (
    MaxRetriesExceededError,
    Replace,
    Retry,
    SignatureError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from .message import RATE_RESERVED, Message, now
from .task import Task

if TYPE_CHECKING:
    from .app import App
    from .client import Client
    from .slots import Lease
    from .tracing import Tracing

log = logging.getLogger("aiotasks.worker")

#: Seconds a hard-timed-out coroutine gets to unwind before its slot is taken back.
HARD_TIMEOUT_GRACE = 0.5


@dataclass(slots=True)
class Delivery:
    """A stream entry this worker holds: its stream (and the queue and priority it
    serves), entry id, fields, and how many times it was delivered."""

    stream: str
    queue: str
    priority: int
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1
    alone: bool = False  # reclaimed after its workers died with it twice: runs alone

    @property
    def key(self) -> tuple[str, bytes]:
        """Identity in the worker's table of running entries."""
        return (self.stream, self.entry_id)


class Kind(enum.Enum):
    """How a delivery ended."""

    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"
    RETRY = "RETRY"  # run again later, as a retry
    DEFER = "DEFER"  # run later without counting a retry (a rate limit, a Redis blip)
    DEAD = "DEAD"  # must never run: dead-lettered (malformed, unknown task)
    REPLACED = "REPLACED"  # became a canvas (value), which finishes in its place
    WAIT = "WAIT"  # over its concurrency limit: parked in Redis until a slot frees


@dataclass(slots=True)
class Outcome:
    """How a run ended: its kind plus value, or the error's type, message and traceback."""

    kind: Kind
    value: Any = None
    exc_type: str = ""
    exc_message: str = ""
    traceback: str = ""
    retry_at: float | None = None  # RETRY/DEFER: when to run again
    rate_reserved: bool = False  # DEFER: the later run holds a reserved rate-limit slot
    exc: BaseException | None = None
    max_retries: int | None = None  # RETRY: the limit it counts against (for the log)

    @property
    def state(self) -> str:
        """The task state this outcome records (RETRY/DEFER/DEAD name themselves)."""
        return self.kind._value_  # not .value, a descriptor call per task


def failure(exc: BaseException, exc_type: str | None = None) -> Outcome:
    """A FAILURE outcome for an exception, with its formatted traceback."""
    tb = exc.__traceback__
    # Start the traceback at the task's own code, not at the worker's frames.
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return Outcome(
        Kind.FAILURE,
        exc_type=exc_type or type(exc).__name__,
        exc_message=str(exc),
        traceback=text,
        exc=exc,
    )


def internal_error(exc: BaseException) -> Outcome:
    """aiotasks' own code failed while handling a task: recorded once as InternalError."""
    out = failure(exc, "InternalError")
    out.exc_message = f"{type(exc).__name__}: {exc}"
    return out


@dataclass(frozen=True, slots=True)
class RunOptions:
    """A task's run options, resolved once: send options over the task's, over the App's."""

    soft_timeout: float | None
    hard_timeout: float | None
    max_retries: int
    ignore_result: bool
    result_ttl: int

    @classmethod
    def resolve(cls, task: Task[Any, Any], msg: Message, default_ttl: int) -> RunOptions:
        """The options of one run of `task` for `msg`."""
        o, t = msg.opts, task.opts
        if not o:  # no per-send options: the task's own, worked out once
            cached = task.run_defaults
            if cached is None or cached.result_ttl != (t.result_ttl or default_ttl):
                cached = task.run_defaults = cls(
                    t.soft_timeout,
                    t.hard_timeout,
                    int(t.max_retries),
                    bool(t.ignore_result),
                    int(t.result_ttl or default_ttl),
                )
            return cached
        return cls(
            soft_timeout=o.get("soft_timeout", t.soft_timeout),
            hard_timeout=o.get("hard_timeout", t.hard_timeout),
            max_retries=int(o.get("max_retries", t.max_retries)),
            ignore_result=bool(o.get("ignore_result", t.ignore_result)),
            result_ttl=int(o.get("result_ttl") or t.result_ttl or default_ttl),
        )


class ThreadBodies:
    """How many `def` task bodies run in threads right now, those given up on a timeout
    or a stop included: the interpreter joins each such thread before it exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn (in the thread), counted."""
        with self._lock:
            self.running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1


@dataclass(slots=True)
class Runtime:
    """What every execution of one worker shares (no reference back to the worker)."""

    app: App
    client: Client
    worker: str
    thread_limiter: Callable[[], Any]
    on_abandon: Callable[[Execution, Outcome], None]
    paused: frozenset[str] = frozenset()  # queues paused (tasks.queues), as last read
    threads: ThreadBodies = field(default_factory=ThreadBodies)


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


class Phase(enum.Enum):
    """Where an entry is in the worker's table of running entries."""

    WAITING = "waiting"  # read ahead: waits for a concurrency slot
    RUNNING = "running"  # has its slot; decoding or running
    COMMITTING = "committing"  # its outcome is queued or being committed


class Execution:
    """One delivery being run by a worker."""

    __slots__ = (
        "rt",
        "delivery",
        "key",
        "lease",
        "phase",
        "limits",
        "task",
        "msg",
        "fn",
        "opts",
        "ctx",
        "revoke_requested",
        "trace",
        "tid",
        "lease_was_given",
        "started",
        "ended",
        "_args",
        "slot",
        "_timers",
    )

    def __init__(
        self, rt: Runtime, delivery: Delivery, lease: Lease, key: tuple[str, bytes]
    ) -> None:
        self.rt = rt
        self.delivery = delivery
        #: Identity in the worker's table of running entries (`delivery.key`, read once).
        self.key = key
        self.lease = lease
        self.phase = Phase.WAITING
        self.limits = Limits(None, None)
        self.task: asyncio.Task[None] | None = None
        self.msg: Message | None = None
        self.fn: Task[Any, Any] | None = None
        self.opts: RunOptions | None = None
        self.ctx: TaskContext | None = None
        self.revoke_requested = False  # revoked with terminate=True, maybe before it began
        #: The run span's W3C context when tracing: what its chain's next step carries.
        self.trace: dict[str, str] | None = None
        raw_id = delivery.fields.get(b"id")
        self.tid = raw_id.decode(errors="replace") if raw_id else None
        self.lease_was_given = lease.held
        self.started = time.perf_counter()  # again once it has its slot (worker._execute)
        self.ended = 0.0  # perf_counter() when its outcome was settled (worker._settle)
        self._args: Sequence[Any] = ()
        #: The concurrency slot this run holds ({key, limit, lease}), given back with it.
        self.slot: dict[str, Any] | None = None
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def attempt(self) -> int:
        """This run's number, 1-based: retries made before it plus deliveries of this entry."""
        return (self.msg.retries if self.msg is not None else 0) + self.delivery.deliveries

    def log_fields(self) -> dict[str, Any]:
        """The structured fields of this run's log records (`extra=`)."""
        return {
            "task_id": self.tid,
            "task_name": self.msg.name if self.msg is not None else None,
            "attempt": self.attempt,
            "queue": self.delivery.queue,
            "worker": self.rt.worker,
        }

    @property
    def begun(self) -> bool:
        """Whether it got its slot and started (a read-ahead entry waits first)."""
        return self.phase is not Phase.WAITING

    def decode(self) -> Outcome | None:
        """Decode the delivery and find its task: None when it can run (`run()`), else
        the DEAD outcome of an entry that must never run."""
        d = self.delivery
        s = self.rt.app.settings
        try:
            msg = decode_entry(d.fields, d.queue, d.priority, s.max_message_size, s.signing_keys)
        except (DecodeError, SignatureError) as exc:
            return Outcome(Kind.DEAD, exc_type=type(exc).__name__, exc_message=str(exc))
        self.msg = msg
        task = self.rt.app.tasks.get(msg.name)
        if task is None:
            return Outcome(
                Kind.DEAD,
                exc_type="UnknownTask",
                exc_message=f"no task named {msg.name!r} is registered on worker {self.rt.worker}",
            )
        self.fn = task
        self.opts = RunOptions.resolve(task, msg, s.result_ttl)
        return None

    def run(self) -> Coroutine[Any, Any, Outcome]:
        """The run of a decoded delivery, to await: its outcome. Raises CancelledError
        when the worker stops meanwhile (the entry stays pending).

        A plain function: the untraced run is awaited by the worker with no coroutine
        of ours between them."""
        task, msg, opts = self.fn, self.msg, self.opts
        assert task is not None and msg is not None and opts is not None, "decode() first"
        tracer = self.rt.app.tracer
        if tracer is None:
            return self._run_task(task, msg, opts)
        return self._traced(tracer, task, msg, opts)

    async def _traced(
        self, tracer: Tracing, task: Task[Any, Any], msg: Message, opts: RunOptions
    ) -> Outcome:
        attempt = msg.retries + self.delivery.deliveries
        with tracer.run(msg, attempt, self.rt.worker) as span:
            self.trace = tracer.inject(span)
            out = await self._run_task(task, msg, opts)
            tracer.ended(span, out.state, out.exc, _error_text(out), out.retry_at)
            return out

    async def after(self, outcome: Outcome) -> None:
        """Call the App's hooks for this outcome (after it was queued for commit)."""
        hooks = self.rt.app.hooks
        if not hooks or self.ctx is None:
            return
        kind = outcome.kind
        if kind is Kind.SUCCESS and hooks.success:
            await hooks.call(hooks.success, self.ctx, outcome.value)
        elif kind is Kind.FAILURE and hooks.failure:
            await hooks.call(hooks.failure, self.ctx, outcome.exc)
        elif kind is Kind.RETRY and hooks.retry:
            await hooks.call(hooks.retry, self.ctx, outcome.exc)
        elif kind is Kind.REVOKED and hooks.revoked:
            await hooks.call(hooks.revoked, self.ctx)

    def context(self) -> TaskContext:
        """The run's TaskContext, made on first use: `current_task()` in the body, or the
        hooks. Most no-op bodies never ask, and pay nothing for it."""
        ctx = self.ctx
        if ctx is None:
            msg, opts = self.msg, self.opts
            assert msg is not None and opts is not None, "only a decoded delivery runs"
            ctx = self.ctx = TaskContext(
                id=msg.id,
                name=msg.name,
                attempt=msg.retries + self.delivery.deliveries,
                max_retries=opts.max_retries,
                queue=msg.queue,
                app=self.rt.app,
                client=self.rt.client,
                retries=msg.retries,
                started=self.started,
                _slot=self.lease,
                _limits=self.limits,
            )
        return ctx

    async def _run_task(self, task: Task[Any, Any], msg: Message, opts: RunOptions) -> Outcome:
        limits = self.limits  # made with the Execution: a revoke may have marked it
        limits.soft, limits.hard = opts.soft_timeout, opts.hard_timeout
        if self.revoke_requested:
            return Outcome(Kind.REVOKED)  # terminated before its body began: never run it
        if msg.queue in self.rt.paused:
            # Fetched as its queue was paused (a read in flight): back on its stream, unrun.
            return Outcome(Kind.DEFER, retry_at=now())
        limited = task.opts.concurrency_limit or task.rate_interval_ms
        if limited or msg.chord_body or msg.err is not None:
            deferred = await self._first(task, msg, opts)
            if deferred is not None:
                return deferred
        else:  # most tasks: no slot or rate to reserve, nothing to read first
            self._args = msg.args
        if opts.soft_timeout is not None or opts.hard_timeout is not None:
            self._arm()
        hooks = self.rt.app.hooks
        # The contextvar holds this run; current_task() makes its TaskContext when asked.
        token = _current.set(self)
        try:
            if hooks:
                await self._start_hooks()
            # Dataclasses/models from the annotations, if any.
            args, kwargs = task.load_args(self._args, msg.kwargs)
            if task.is_async and self.limits.soft is None:
                # Nothing to turn into SoftTimeLimitExceeded: the body's coroutine is
                # awaited here, one coroutine less per run.
                value = await task.fn(*args, **kwargs)
            else:
                value = await self._invoke(task, args, kwargs)
            return Outcome(Kind.SUCCESS, value)
        except (asyncio.CancelledError, Exception) as exc:
            return self._ended(task, msg, opts, exc)
        finally:
            _current.reset(token)
            for timer in self._timers:
                timer.cancel()

    async def _start_hooks(self) -> None:
        """Make the context the hooks get and call the start hooks; then the body begins.
        `started` stays 0 until they are done (metrics: a run that failed in one never
        began)."""
        hooks, ctx = self.rt.app.hooks, self.context()
        ctx.started = 0.0
        if hooks.start:
            await hooks.call(hooks.start, ctx)
        ctx.started = time.perf_counter()

    async def _first(self, task: Task[Any, Any], msg: Message, opts: RunOptions) -> Outcome | None:
        """_before_body(), or the outcome of a run that cannot begin yet."""
        try:
            return await self._before_body(task, msg)
        except Exception as exc:
            if not self.rt.client.waits_out(exc):
                raise
            # Redis went away (or is failing over) before the body began: run it later,
            # it never ran.
            log.warning(
                "task %s[%s]: lost Redis before it began (%s)",
                msg.name,
                msg.id,
                exc,
                extra={**self.log_fields(), "state": "DEFER"},
            )
            return Outcome(Kind.DEFER, retry_at=now() + 1.0)
        except asyncio.CancelledError as cancel:
            return self._cancelled(task, msg, opts, cancel)  # revoked, or stopping

    def _ended(
        self, task: Task[Any, Any], msg: Message, opts: RunOptions, exc: BaseException
    ) -> Outcome:
        """The outcome of a body that raised (or was cancelled)."""
        if isinstance(exc, asyncio.CancelledError):
            return self._cancelled(task, msg, opts, exc)
        if isinstance(exc, Retry):
            return self._retry(task, msg, opts, exc.exc or exc, exc)
        if isinstance(exc, Replace):
            return Outcome(Kind.REPLACED, exc.canvas)
        if task.opts.autoretry_for and isinstance(exc, task.opts.autoretry_for):
            return self._retry(task, msg, opts, exc, None)
        return failure(exc)

    async def _before_body(self, task: Task[Any, Any], msg: Message) -> Outcome | None:
        """Reserve a rate-limit slot and read what a chord body or callback gets first."""
        limit = task.opts.concurrency_limit
        if limit:
            key = task.key_of(task.opts.concurrency_key, msg.args, msg.kwargs)
            lease_ms = int(self.rt.app.settings.visibility_timeout * 1000)
            if not await self.rt.client.acquire_slot(key, limit, msg.id, lease_ms):
                return Outcome(Kind.WAIT, value={"key": key, "limit": limit, "lease": lease_ms})
            self.slot = {"key": key, "limit": limit, "lease": lease_ms}
        if task.rate_interval_ms and RATE_RESERVED not in msg.opts:
            key = task.key_of(task.opts.rate_key, msg.args, msg.kwargs)
            wait_ms = await self.rt.client.rate_wait(key, task.rate_interval_ms)
            if wait_ms > 0:
                return Outcome(Kind.DEFER, retry_at=now() + wait_ms / 1000, rate_reserved=True)
        args = list(msg.args)
        if msg.chord_body:
            args.insert(0, await self.rt.client.chord_results(msg.chord_body))
        elif msg.err is not None:
            args.insert(0, msg.err)  # an errback: the failure it was sent for
        self._args = args
        return None

    def _cancelled(
        self, task: Task[Any, Any], msg: Message, opts: RunOptions, cancel: asyncio.CancelledError
    ) -> Outcome:
        limits = self.limits
        current = asyncio.current_task()
        if not (limits.hard_fired or limits.revoked or limits.soft_fired):
            if current is not None and current.cancelling():
                raise cancel  # the worker is stopping: leave the entry to be redelivered
            return failure(cancel)  # the body's own CancelledError: a failure like another
        if current is not None:
            current.uncancel()
        if limits.revoked:
            return Outcome(Kind.REVOKED)
        if limits.hard_fired:
            err: Exception = TimeLimitExceeded(f"hard time limit ({limits.hard} s) exceeded")
        else:  # a thread task at its soft limit: the thread cannot be interrupted
            err = SoftTimeLimitExceeded(f"soft time limit ({limits.soft} s) exceeded")
        if task.opts.autoretry_for and isinstance(err, task.opts.autoretry_for):
            return self._retry(task, msg, opts, err, None)
        return failure(err)

    def _retry(
        self,
        task: Task[Any, Any],
        msg: Message,
        opts: RunOptions,
        exc: BaseException,
        r: Retry | None,
    ) -> Outcome:
        max_retries = r.max_retries if r is not None and r.max_retries is not None else None
        if max_retries is None:
            max_retries = opts.max_retries
        if msg.retries >= max_retries:
            cause = (
                exc
                if not isinstance(exc, Retry)
                else MaxRetriesExceededError(
                    f"{task.name} asked for a retry with its {max_retries} retries used up"
                )
            )
            return failure(cause)
        out = failure(exc) if not isinstance(exc, Retry) else Outcome(Kind.RETRY, exc=exc)
        out.kind, out.retry_at = Kind.RETRY, _retry_at(task, msg, r)
        out.max_retries = max_retries
        return out

    async def _invoke(
        self, task: Task[Any, Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        """A body with a soft timeout, or a `def` body (in a thread)."""
        if task.is_async:
            coro = task.fn(*args, **kwargs)
            return await Interruptible(coro, self.limits)  # type: ignore[arg-type]
        return await self.in_thread(partial(task.fn, *args, **kwargs))

    async def in_thread(self, call: Callable[[], Any]) -> Any:
        """Run a `def` body in one of the worker's threads: counted (a stop waits for it,
        or leaves without it), within the worker's thread limit."""
        from anyio.to_thread import run_sync  # loaded with the first `def` task only

        return await run_sync(
            self.rt.threads.call, call, abandon_on_cancel=True, limiter=self.rt.thread_limiter()
        )

    # -- timers ------------------------------------------------------------------------

    def _arm(self) -> None:
        soft, hard = self.limits.soft, self.limits.hard
        loop = asyncio.get_running_loop()
        if soft is not None:
            self._timers.append(loop.call_later(soft, self._soft))
        if hard is not None:
            self._timers.append(loop.call_later(hard, self._hard))

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
        if self.phase is Phase.COMMITTING:
            return  # its outcome is recorded: only its hooks are still running
        self.limits.abandoned = True
        log.error(
            "task %s[%s] ignored cancellation; abandoning it and freeing its slot",
            self.msg.name,
            self.msg.id,
            extra=self.log_fields(),
        )
        if self.limits.revoked:
            outcome = Outcome(Kind.REVOKED)
        else:
            outcome = failure(
                TimeLimitExceeded(
                    f"hard time limit ({self.limits.hard} s) exceeded; the task ignored "
                    "cancellation and was abandoned"
                )
            )
        self.rt.on_abandon(self, outcome)


def _error_text(out: Outcome) -> str:
    if out.exc_type:
        return f"{out.exc_type}: {out.exc_message}"
    return "" if out.exc is None else f"{type(out.exc).__name__}: {out.exc}"


def _retry_at(task: Task[Any, Any], msg: Message, r: Retry | None) -> float:
    """When a retry runs: the Retry's eta or countdown, else the task's backoff, else now."""
    opts = task.opts
    if r is not None and r.eta is not None:
        return r.eta.timestamp()
    if r is not None and r.countdown is not None:
        return now() + r.countdown
    if opts.retry_backoff:
        base = 1.0 if opts.retry_backoff is True else float(opts.retry_backoff)
        return now() + exponential(msg.retries, base, opts.retry_backoff_max, opts.retry_jitter)
    return now()
