"""Periodic tasks: every worker schedules them, and each tick fires once across all workers.

There is no beat process. Every worker of an App that has periodic tasks runs a Scheduler.

Ticks. `every=N` ticks at the multiples of N seconds since the Unix epoch (tick k is at
k * N), so all workers compute the same ticks without talking to each other. `cron=` ticks
are croniter's times, in UTC.

Once per tick. When a tick is due, each worker tries `SET {ns}:tick:<name>:<tick_ms> <worker>
NX PX <ttl>`; only the worker that sets the key sends the task. There is no leader and no
lock that a dead process could hold. The task is sent with task id
`periodic:<name>:<tick_ms>`, so even a second claim (say, a clock skewed past the claim's
ttl) enqueues nothing while the first send is queued or running.

Missed ticks. A worker does not catch up on ticks that fell due while no worker was running
(or while its loop was stalled): starting or restarting never fires a burst. It fires the
current tick only if that tick came due less than `GRACE` (1 s) ago, then every later tick
as it comes. A tick that no worker was alive to fire is skipped, as with cron.

Each worker also writes every periodic's next run (epoch ms) into the hash `{ns}:periodic`,
field = periodic name, for `aiotasks status`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from croniter import croniter  # type: ignore[import-untyped]
from redis.exceptions import ResponseError

from .backoff import Backoff
from .errors import BrokerRefusedError
from .outage import LOOP_ERRORS, Outage

if TYPE_CHECKING:
    from .app import App
    from .control import Schedules
    from .task import Task

log = logging.getLogger(__name__)

GRACE = 1.0  # seconds a tick may be late and still fire (see "Missed ticks")
MAX_SLEEP = 1.0  # the loop wakes at least this often to notice clock changes
CLAIM_TTL_MS = 60_000  # a tick claim outlives any clock skew between workers we tolerate
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Periodic:
    """A task sent on a schedule: `cron` (UTC) or `every` seconds, aligned to the epoch."""

    task: str
    cron: str | None
    every: float | None
    name: str
    queue: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    since_ms: int = 0  # a tick due before it never fires (a schedule added at run time)
    options: dict[str, Any] = field(default_factory=dict)  # send options of each send

    @classmethod
    def make(
        cls,
        task: Task[Any, Any] | str,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        name: str | None = None,
        queue: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Periodic:
        """Validate the schedule and build the Periodic (used by `App.periodic`).

        Args:
            task: the task to send (or its name).
            cron: a cron expression, read in UTC.
            every: the period, in seconds or as a timedelta.
            name: the schedule's name, unique per App (default: the task's name).
            queue: the queue to send to (default: the task's own routing).
            args: positional arguments of each send.
            kwargs: keyword arguments of each send.

        Raises:
            ValueError: not exactly one of cron/every, an invalid cron string, every out of
                range (0.001 s to 1e9 s), or an empty task or schedule name.
        """
        if (cron is None) == (every is None):
            raise ValueError("give exactly one of cron= or every=")
        if isinstance(every, timedelta):
            every = every.total_seconds()
        if every is not None and not 0.001 <= every < 10**9:  # ticks: millisecond resolution
            raise ValueError(f"every must be at least 0.001 and under 1e9 seconds, got {every!r}")
        if cron is not None and not croniter.is_valid(cron):
            raise ValueError(f"invalid cron expression {cron!r}")
        every = float(every) if every is not None else None
        task_name = task if isinstance(task, str) else task.name
        # A tick of a nameless task could only be dead-lettered, every time.
        if not task_name.strip():
            raise ValueError("the task name is empty")
        if name is not None and not name.strip():
            raise ValueError("the schedule name is empty")
        return cls(task_name, cron, every, name or task_name, queue, tuple(args), kwargs or {})

    def next_run(self, after: datetime) -> datetime:
        """The first tick strictly after `after` (naive means UTC), as an aware UTC datetime."""
        if after.tzinfo is None:
            after = after.replace(tzinfo=UTC)
        if self.cron is not None:
            nxt: datetime = croniter(self.cron, after.astimezone(UTC)).get_next(datetime)
            return nxt.astimezone(UTC)
        # Integer arithmetic keeps ticks exact and strictly increasing for float periods.
        period_us = round((self.every or 0.0) * 1000) * 1000
        after_us = (after - _EPOCH) // timedelta(microseconds=1)
        return _EPOCH + timedelta(microseconds=(after_us // period_us + 1) * period_us)


def _ms(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(milliseconds=1)


def _at(ms: int) -> datetime:
    # Exact integer conversion: a float round trip could land 1 us before a tick and
    # make next_run() return that same tick again.
    return _EPOCH + timedelta(milliseconds=ms)


class Scheduler:
    """Fires an App's periodic tasks from one worker (one of any number doing the same)."""

    def __init__(
        self, app: App, worker: str, schedules: Schedules, outage: Outage | None = None
    ) -> None:
        self.app = app
        self.worker = worker
        self.schedules = schedules
        self.outage = outage or Outage(f"periodic scheduler of worker {worker}", app.client.url)
        self.periodics: list[Periodic] = []
        self._next: dict[str, int] = {}  # periodic name -> next tick, epoch ms
        self._claimed: set[tuple[str, int]] = set()  # claimed ticks whose send failed

    async def run(self) -> None:
        """Fire due ticks until cancelled; connection errors are logged and retried.

        The schedules are re-read from Redis every loop (at most a second apart), so
        ones added, paused, resumed or removed at run time are taken up within a second.
        """
        schedules = self.schedules
        backoff = Backoff(start=0.5, cap=5.0)
        declared = False
        dirty = True
        while True:
            try:
                if not declared:
                    await schedules.declare(list(self.app.periodic_tasks))
                    declared = True
                dirty = self._load(await schedules.active()) or dirty
                for p in self.periodics:
                    dirty = await self._tick(p) or dirty
                if dirty:
                    await self._publish()
                    dirty = False
                backoff.reset()
                self.outage.ok("periodic scheduler")
            except LOOP_ERRORS as exc:
                # Never the worker's end: its tasks go on while schedules wait Redis out.
                delay = backoff.next()
                self.outage.report(self.app.client, "periodic scheduler", exc, delay)
                await asyncio.sleep(delay)
                continue
            nxt = min(self._next.values(), default=None)
            wait = nxt / 1000 - time.time() if nxt is not None else MAX_SLEEP
            await asyncio.sleep(min(MAX_SLEEP, max(wait, 0.0)))

    def _load(self, active: Sequence[Periodic]) -> bool:
        """Take up the current schedules; True when the set changed."""
        if list(active) == self.periodics:
            return False
        start_ms = int((time.time() - GRACE) * 1000)
        old = {p.name: p for p in self.periodics}
        # A schedule that did not change keeps its next tick; a new or changed one starts
        # from now, never before it was added or resumed (a resumed one does not catch
        # up on the ticks it missed).
        self._next = {
            p.name: self._next[p.name]
            if old.get(p.name) == p and p.name in self._next
            else _ms(p.next_run(_at(max(start_ms, p.since_ms))))
            for p in active
        }
        self.periodics = list(active)
        return True

    async def _tick(self, p: Periodic) -> bool:
        """Fire `p` if its tick is due; True when its next run moved."""
        tick_ms, now = self._next[p.name], time.time()
        if tick_ms > now * 1000:
            return False
        late = now - tick_ms / 1000
        if late > GRACE:
            log.warning("periodic %s: skipping tick %d ms, %.1f s late", p.name, tick_ms, late)
        else:
            try:
                await self._fire(p, tick_ms)
            except Exception as exc:
                if self.app.client.waits_out(exc):
                    raise  # the tick stays due: retried while within GRACE
                if isinstance(exc, ResponseError | BrokerRefusedError):
                    log.error(
                        "periodic %s: cannot send the tick at %d ms: %s", p.name, tick_ms, exc
                    )
                else:
                    log.exception("periodic %s: cannot send the tick at %d ms", p.name, tick_ms)
        self._claimed.discard((p.name, tick_ms))
        after = _at(max(tick_ms, int((now - GRACE) * 1000)))
        self._next[p.name] = _ms(p.next_run(after))
        return True

    async def _fire(self, p: Periodic, tick_ms: int) -> None:
        if (p.name, tick_ms) not in self._claimed:
            if not await self.app.client.claim_tick(p.name, tick_ms, self.worker, CLAIM_TTL_MS):
                return  # another worker fires this tick
            # Remember the claim: if the send fails, a retry must not lose to our own key.
            self._claimed.add((p.name, tick_ms))
        handle = await self.app.send_task(
            p.task,
            p.args,
            p.kwargs,
            queue=p.queue,
            task_id=f"periodic:{p.name}:{tick_ms}",
            **p.options,
        )
        late_ms = int(time.time() * 1000) - tick_ms
        log.info(
            "periodic %s fired %s[%s], %d ms after its tick", p.name, p.task, handle.id, late_ms
        )

    async def _publish(self) -> None:
        """Record each periodic's next run for `aiotasks status`."""
        horizon_ms = max(self._next.values(), default=0) - int(time.time() * 1000) + 86_400_000
        await self.app.client.publish_schedule(self._next, max(horizon_ms, 86_400_000))
