"""Worker: fetch in batches, run under a concurrency limit, commit outcomes in batches.

The hot path costs a constant number of round trips per batch, not per task: one
fetch.lua call reads and starts up to `concurrency` entries, and one finish.lua call
stores every result of the batch, acks and deletes the entries, wakes the waiters and
settles chords. An entry is acked only by the call that stores its result, so a worker
that dies leaves its entries pending, and another worker reclaims them after
`visibility_timeout`; entries that are running are kept fresh by a heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import ResponseError

from .backoff import Backoff
from .broker import hide_password
from .cancel import cancel_and_wait
from .errors import CONNECTION_ERRORS
from .execution import Execution, Outcome
from .keys import GROUP, PRIORITIES
from .message import Message, now
from .outcomes import Outcomes
from .slots import Lease, Slots
from .task import Task

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)
task_log = logging.getLogger("aiotasks.worker")

Arg = str | bytes | int | float

# A start or release call that fails is not fatal: the entry is run, or left pending.
_SCRIPT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ResponseError)

#: Tasks faster than this on average (s) make the worker read one batch ahead.
FAST_TASK = 0.005


@dataclass(slots=True)
class Delivery:
    """A stream entry this worker holds: which stream (index), entry id, fields."""

    index: int
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int = 1


class Worker:
    """Runs an App's tasks from Redis.

    Args:
        app: the App whose tasks run here.
        queues: queue names, in the order they are served when several have work.
        concurrency: most tasks running at once.
        name: consumer name (default: host-pid-random).
        burst: stop once the queues are empty and nothing is running.
        shutdown_timeout: seconds running tasks get to finish on stop.
        max_deliveries: deliveries after which an entry is dead-lettered.
        block: longest idle wait (s) on a blocking read; bounds delayed-task latency.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] | None = None,
        concurrency: int = 100,
        *,
        name: str | None = None,
        burst: bool = False,
        shutdown_timeout: float = 30.0,
        max_deliveries: int = 5,
        block: float = 0.1,
    ) -> None:
        self.app = app
        self.queues = list(queues or [app.settings.default_queue])
        self.concurrency = concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.burst = burst
        self.shutdown_timeout = shutdown_timeout
        self.max_deliveries = max_deliveries
        self.block_ms = max(1, int(block * 1000))
        keys = app.broker.keys
        self.keys = keys
        self.streams = [keys.stream(q, p) for q in self.queues for p in PRIORITIES]
        self.slots = Slots(concurrency)
        self._thread_limiter: Any = None
        self.vt = app.settings.visibility_timeout
        self._running: dict[tuple[int, bytes], Execution] = {}
        self._not_begun: list[Delivery] = []  # read ahead, never run: release on stop
        self._by_task: dict[str, Execution] = {}
        self._abandoned: set[Execution] = set()
        self.outcomes = Outcomes(app, keys, self.name, self.queues, self.streams, self._running)
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = asyncio.Event()
        self._started_ms = 0
        self._avg_run = 1.0  # moving average of run time (s); starts "slow": no prefetch

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no more fetching, running tasks may finish."""
        self._stop.set()

    def thread_limiter(self) -> Any:
        """The anyio limiter of `def` tasks' threads (made on first use: anyio is loaded
        only by workers that run such tasks)."""
        if self._thread_limiter is None:
            import anyio

            self._thread_limiter = anyio.CapacityLimiter(self.concurrency)
        return self._thread_limiter

    @property
    def abandoned(self) -> int:
        """Tasks that ignored cancellation and still run (they keep the process alive)."""
        return sum(1 for ex in self._abandoned if ex.task is not None and not ex.task.done())

    @property
    def is_stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    async def wait_started(self) -> None:
        """Wait until the worker is connected and consuming."""
        await self._started.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Worker]:
        """Run the worker in the background for the duration of the block."""
        task = asyncio.get_running_loop().create_task(self.run(), name=f"worker {self.name}")
        try:
            started = asyncio.ensure_future(self._started.wait())
            done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                started.cancel()
                task.result()
            yield self
        finally:
            self.stop()
            await task

    async def run(self) -> None:
        """Run until stop() (or, with burst, until the queues are empty)."""
        await self._ensure_groups()
        self._started_ms = int(now() * 1000)
        await self._register(ttl=max(self.vt, 10.0))
        self._started.set()
        log.debug("worker %s consuming %s", self.name, ", ".join(self.queues))
        try:
            async with asyncio.TaskGroup() as tg:
                background = [
                    tg.create_task(self._heartbeat_loop()),
                    tg.create_task(self.outcomes.flush_loop()),
                    tg.create_task(self._control_loop()),
                ]
                if self.app.periodic_tasks:
                    from .schedule import Scheduler

                    background.append(tg.create_task(Scheduler(self.app, self.name).run()))
                await self._fetch_loop()
                await self._drain()
                await cancel_and_wait(background)
                await self.outcomes.commit_all()
            await self._unregister()
        finally:
            for ex in [*self._running.values(), *self._abandoned]:
                if ex.task is not None:
                    ex.task.cancel()
            self._stopped.set()

    async def _ensure_groups(self) -> None:
        async with self.app.broker.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for res in results:
            if isinstance(res, ResponseError) and "BUSYGROUP" not in str(res):
                raise res

    async def _drain(self) -> None:
        """Let running tasks finish within shutdown_timeout; give back what never began.

        An entry that holds a slot runs, even if its coroutine has not taken its first
        step yet. An entry read ahead without a slot goes back to its stream at once
        (release.lua), so another worker takes it without waiting for the visibility
        timeout. What does not finish in time is redelivered after that timeout.
        """
        for ex in self._running.values():
            if ex.task is not None and not ex.begun and not ex.lease_was_given:
                ex.task.cancel()
                self._not_begun.append(ex.delivery)
        if self._not_begun:
            await self._release(self._not_begun)
        pending = [
            ex.task
            for ex in self._running.values()
            if ex.task is not None and not ex.task.done() and (ex.begun or ex.lease_was_given)
        ]
        if pending:
            log.warning(
                "worker %s: waiting up to %s s for %d running task(s)",
                self.name,
                self.shutdown_timeout,
                len(pending),
            )
            _, late = await asyncio.wait(pending, timeout=self.shutdown_timeout)
            for t in late:
                t.cancel()
            if late:
                log.warning(
                    "worker %s: %d task(s) did not finish in time; they will be redelivered",
                    self.name,
                    len(late),
                )
                await asyncio.wait(late, timeout=1.0)
        await self.outcomes.commit_all()

    async def _release(self, got: list[Delivery]) -> None:
        args: list[Arg] = []
        for d in got:
            args += [d.index + 2, d.entry_id]
        try:
            n = await self.app.broker.scripts.release(
                prefix=self.keys.prefix, streams=self.streams, consumer=self.name, entries=args
            )
        except _SCRIPT_ERRORS as exc:
            log.warning(
                "worker %s could not give back %d entries read ahead (%s); "
                "they will be redelivered after the visibility timeout",
                self.name,
                len(got),
                exc,
            )
            return
        log.info("worker %s gave %d entries read ahead back to their queues", self.name, n)

    # -- fetching -----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = Backoff(start=0.1, cap=5.0)
        reclaim_every = min(max(self.vt / 2, 0.1), 10.0)
        next_reclaim = 0.0
        while not self._stop.is_set():
            if not await self._slot_or_stop():
                break
            n = 1 + self.slots.take(self.concurrency - 1)
            reclaim = time.monotonic() >= next_reclaim
            if reclaim:
                next_reclaim = time.monotonic() + reclaim_every
            try:
                got = await self._next_batch(n + self._prefetch(n), reclaim)
            except CONNECTION_ERRORS as exc:
                self.slots.release(n)
                delay = backoff.next()
                log.error(
                    "worker %s lost Redis at %s (%s); retrying in %.1f s",
                    self.name,
                    hide_password(self.app.settings.redis_url),
                    exc,
                    delay,
                )
                await self._sleep(delay)
                continue
            backoff.reset()
            if len(got) < n:
                self.slots.release(n - len(got))
            for i, d in enumerate(got):
                self._spawn(d, held=i < n)
            if self.burst and not got and not self._running and not self.outcomes.has_ops:
                if not await self._has_work():
                    self.stop()

    def _prefetch(self, n: int) -> int:
        """Entries to read beyond the free slots: a second batch when tasks are short.

        Tasks that finish in well under a round trip would leave the worker waiting on
        Redis between batches; reading one batch ahead halves the round trips per task.
        Long tasks get no prefetch, so they are never held back from idle workers.
        """
        if n == self.concurrency and self._avg_run < FAST_TASK:
            return n
        return 0

    async def _slot_or_stop(self) -> bool:
        """Take a slot; False when the worker stops first (a stop fetches nothing more)."""
        if self.slots.take(1):
            return True
        acquire = asyncio.ensure_future(self.slots.acquire())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not acquire.done():
            acquire.cancel()
            with suppress(asyncio.CancelledError):
                await acquire
        if acquire.done() and not acquire.cancelled() and self._stop.is_set():
            self.slots.release()
            return False
        return acquire.done() and not acquire.cancelled()

    async def _next_batch(self, n: int, reclaim: bool) -> list[Delivery]:
        try:
            got = await self._reclaim(n) if reclaim else []
            return got or await self._fetch(n)
        except ResponseError as exc:
            text = str(exc)
            if "NOGROUP" in text or "UNBLOCKED" in text:
                # The stream or its group is gone (purged, or the server lost its data).
                await self._ensure_groups()
                return []
            log.error("worker %s: Redis refused a fetch (%s); retrying in 1 s", self.name, exc)
            await self._sleep(1.0)
            return []

    async def _sleep(self, seconds: float) -> None:
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def _fetch(self, n: int) -> list[Delivery]:
        s = self.app.settings
        res = await self.app.broker.scripts.fetch(
            prefix=self.keys.prefix,
            streams=self.streams,
            consumer=self.name,
            count=n,
            now_ms=int(now() * 1000),
            worker=self.name,
            promote_limit=max(n, 100),
            default_ttl=s.result_ttl,
        )
        got = [
            Delivery(int(res[i]) - 2, res[i + 1], _pairs(res[i + 2])) for i in range(1, len(res), 3)
        ]
        if got:
            return got
        next_due = int(res[0])
        block_ms = self.block_ms
        if next_due >= 0:
            block_ms = max(1, min(block_ms, next_due - int(now() * 1000)))
        return await self._block(block_ms)

    async def _block(self, block_ms: int) -> list[Delivery]:
        """Wait for new entries on any stream, then mark them STARTED (start.lua).

        The body runs only after start.lua, so `state()` reads STARTED while it runs and
        an entry revoked or expired between the read and the start is never run.
        """
        broker = self.app.broker
        reply: list[Any] = await cast(Any, broker.redis).xreadgroup(
            GROUP, self.name, dict.fromkeys(self.streams, ">"), count=1, block=block_ms
        )
        if not reply:
            return []
        index = {s.encode(): i for i, s in enumerate(self.streams)}
        got = [
            Delivery(index[stream], entry_id, fields)
            for stream, entries in reply
            for entry_id, fields in entries
        ]
        now_ms = int(now() * 1000)
        keep = await self._start(got, now_ms)
        if keep is None:
            # Could not mark them: run what has not expired; finish.lua records the rest.
            return [d for d in got if int(d.fields.get(b"exp") or now_ms + 1) > now_ms]
        return [d for d, k in zip(got, keep, strict=True) if k]

    async def _start(self, got: list[Delivery], now_ms: int) -> list[int] | None:
        args: list[Arg] = []
        for d in got:
            f = d.fields
            args += [
                d.index + 2,
                d.entry_id,
                f.get(b"id", b""),
                f.get(b"exp", b""),
                f.get(b"r", b""),
                f.get(b"cid", b""),
                f.get(b"cix", b""),
                f.get(b"tail", b""),
            ]
        try:
            keep: list[int] = await self.app.broker.scripts.start(
                prefix=self.keys.prefix,
                streams=self.streams,
                now_ms=now_ms,
                worker=self.name,
                default_ttl=self.app.settings.result_ttl,
                entries=args,
            )
        except _SCRIPT_ERRORS as exc:
            log.warning(
                "worker %s could not mark %d task(s) started (%s)", self.name, len(got), exc
            )
            return None
        return keep

    async def _reclaim(self, n: int) -> list[Delivery]:
        res = await self.app.broker.scripts.reclaim(
            prefix=self.keys.prefix,
            streams=self.streams,
            consumer=self.name,
            min_idle_ms=int(self.vt * 1000),
            count=n,
            now_ms=int(now() * 1000),
            worker=self.name,
            max_deliveries=self.max_deliveries,
            default_ttl=self.app.settings.result_ttl,
        )
        got = [
            Delivery(int(res[i]) - 2, res[i + 1], _pairs(res[i + 2]), int(res[i + 3]))
            for i in range(0, len(res), 4)
        ]
        for d in got:
            log.warning(
                "worker %s reclaimed entry %s (delivery %d) from a dead worker",
                self.name,
                d.entry_id.decode(),
                d.deliveries,
            )
        return got

    async def _has_work(self) -> bool:
        """Whether any stream has entries or a delayed task is due soon (for burst)."""
        redis = self.app.broker.redis
        async with redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
            pipe.zcount(self.keys.delayed, "-inf", int((now() + 1) * 1000))
            counts = await pipe.execute()
        return any(counts)

    # -- running ------------------------------------------------------------------------

    def _spawn(self, d: Delivery, held: bool) -> None:
        ex = Execution(self, d, Lease(self.slots, held))
        key = (d.index, d.entry_id)
        self._running[key] = ex
        # Known by task id from now on: a revoke may come before the body begins.
        task_id = d.fields.get(b"id")
        if task_id:
            ex.tid = task_id.decode(errors="replace")
            self._by_task[ex.tid] = ex
        ex.task = asyncio.get_running_loop().create_task(self._execute(ex))

    async def _execute(self, ex: Execution) -> None:
        try:
            await ex.lease.acquire()
            if self._stop.is_set() and not ex.lease_was_given:
                # Read ahead, and the worker stopped before it had a slot: give it back.
                self._not_begun.append(ex.delivery)
                return
            ex.begun = True
            ex.started = time.perf_counter()  # a prefetched entry starts once it has a slot
            await ex.run()
        except asyncio.CancelledError:
            pass  # stopping: the entry stays pending and is redelivered
        except Exception:
            log.exception(
                "worker %s: internal error running entry %r", self.name, ex.delivery.entry_id
            )
        finally:
            ex.lease.release()
            if ex.tid is not None and self._by_task.get(ex.tid) is ex:
                del self._by_task[ex.tid]
            self._abandoned.discard(ex)
            key = (ex.delivery.index, ex.delivery.entry_id)
            if not self.outcomes.holds(key):
                # Nothing to commit (settled elsewhere or cancelled on stop).
                self._running.pop(key, None)

    def abandon(self, ex: Execution) -> None:
        """A task that ignored cancellation: its slot is freed and its outcome recorded."""
        ex.lease.release()
        self._abandoned.add(ex)

    # -- outcomes -> finish.lua ops ------------------------------------------------------

    def finish(self, ex: Execution, task: Task[Any, Any], msg: Message, out: Outcome) -> None:
        """Queue the outcome of a run for the next batched commit."""
        self._avg_run += 0.1 * (time.perf_counter() - ex.started - self._avg_run)
        self.outcomes.finish(ex, task, msg, out)

    def dead_letter(self, ex: Execution, task_id: str, exc_type: str, message: str) -> None:
        """Queue an entry that cannot run for its queue's dead-letter stream."""
        self.outcomes.dead_letter(ex, task_id, exc_type, message)

    @property
    def done(self) -> int:
        """Tasks this worker finished (any final state but FAILURE)."""
        return self.outcomes.done

    @property
    def failed(self) -> int:
        """Tasks this worker recorded as FAILURE (dead letters included)."""
        return self.outcomes.failed

    # -- heartbeat and control ----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(self.vt / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            entries: list[Arg] = []
            for index, entry_id in self._running:
                entries += [index + 2, entry_id]
            try:
                if entries:
                    await self.app.broker.scripts.heartbeat(
                        prefix=self.keys.prefix,
                        streams=self.streams,
                        consumer=self.name,
                        entries=entries,
                    )
                await self._register(ttl=max(interval * 3, 10.0))
            except CONNECTION_ERRORS as exc:
                log.warning("worker %s heartbeat failed (%s)", self.name, exc)
            except ResponseError as exc:
                log.error("worker %s: Redis refused a heartbeat (%s)", self.name, exc)

    async def _register(self, ttl: float) -> None:
        """Publish this worker's description (for `aiotasks status`), expiring unless renewed."""
        key = self.keys.worker(self.name)
        now_ms = int(now() * 1000)
        description: dict[str, str | int] = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": ",".join(self.queues),
            "concurrency": self.concurrency,
            "started_at": self._started_ms,
            "last_beat": now_ms,
            "running": len(self._running),
            "done": self.outcomes.done,
            "failed": self.outcomes.failed,
        }
        async with self.app.broker.redis.pipeline(transaction=False) as pipe:
            cast(Any, pipe).hset(key, mapping=description)
            pipe.pexpire(key, int(ttl * 1000))
            pipe.zadd(self.keys.workers, {self.name: now_ms})
            # Workers silent for a day leave the index (their hash expired long ago).
            pipe.zremrangebyscore(self.keys.workers, "-inf", now_ms - 86_400_000)
            await pipe.execute()

    async def _unregister(self) -> None:
        with suppress(*CONNECTION_ERRORS):
            async with self.app.broker.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.worker(self.name))
                pipe.zrem(self.keys.workers, self.name)
                await pipe.execute()

    async def _control_loop(self) -> None:
        """Listen for broadcasts: `revoke <id>` cancels that task if it runs here."""
        backoff = Backoff(start=0.1, cap=5.0)
        notifier = self.app.broker.notifier
        while True:
            try:
                async with notifier.listen(self.keys.control_channel) as watch:
                    backoff.reset()
                    while True:
                        note, _, _ = await watch.get()
                        self._control(note.encode())
            except CONNECTION_ERRORS:
                await asyncio.sleep(backoff.next())

    def _control(self, data: bytes) -> None:
        cmd, _, arg = data.decode(errors="replace").partition(" ")
        if cmd == "revoke":
            ex = self._by_task.get(arg)
            if ex is not None:
                task_log.warning("revoking running task %s", arg)
                ex.cancel_revoked()


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))
