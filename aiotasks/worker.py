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
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import ResponseError

from .backoff import Backoff
from .cancel import cancel_and_wait
from .contract import entry_ref
from .control import Queues, Schedules
from .durability import GROUPS_GONE, REGISTRATION_GONE, DataLoss, warn_if_unsafe
from .errors import CONNECTION_ERRORS, BrokerConnectionError, BrokerRefusedError
from .execution import Delivery, Execution, Outcome, Phase, Runtime, internal_error
from .index import TaskIndex
from .keys import PRIORITIES
from .logs import visible_errors
from .message import QUEUE_NAME_RULE, earlier_deliveries, is_queue_name, now
from .outage import LOOP_ERRORS, REMIND, Outage
from .outcomes import Key, Outcomes
from .peers import describe, warn_if_tasks_differ
from .refusals import broker_error
from .schedule import Scheduler
from .slots import Lease, Slots

if TYPE_CHECKING:
    from .app import App
    from .client import Client
    from .scripts import Scripts

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Python 3.12+ can start a task eagerly (asyncio.Task(eager_start=True)).
_EAGER = sys.version_info >= (3, 12)
task_log = logging.getLogger("aiotasks.worker")

# A start or release call that fails is not fatal: the entry is run, or left pending.
_SCRIPT_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, ResponseError)

#: Tasks faster than this on average (s) make the worker read one batch ahead.
FAST_TASK = 0.005

#: Seconds between two reads of the paused queues.
PAUSE_REFRESH = 1.0
#: What the control channel brings, for a log line should Redis refuse it.
CONTROL = "revoke and pause broadcasts to this worker"

#: The delivery from which a reclaimed entry runs alone, on an idle worker: its workers
#: died twice while it ran. A task that kills its process then takes no other along
#: (they would reach max_deliveries with it, and be dead-lettered unrun).
ALONE_FROM = 3

# Seconds a stopping worker gives Redis, past shutdown_timeout, to take the last outcomes,
# and to take its leaving the registry.
STORE_GRACE = 5.0
UNREGISTER_TIMEOUT = 2.0


class Lane:
    """The streams of one shard that a worker reads, with that shard's fetch state and
    commit buffer (a namespace of one shard: one lane)."""

    __slots__ = (
        "client",
        "streams",
        "active",
        "idle",
        "outcomes",
        "next_reclaim",
        "alone_waiting",
        "outage",
        "scripts",
    )

    def __init__(
        self, client: Client, streams: list[str], outcomes: Outcomes, outage: Outage
    ) -> None:
        self.client = client
        #: This shard's connection as the worker's loops see it (one log line an outage).
        self.outage = outage
        #: Entries the last reclaim left because they run alone (for an idle worker).
        self.alone_waiting = 0
        self.streams = streams
        self.active = list(streams)  # the streams of queues not paused
        #: After a fetch that read every stream to its end: when the next delayed task
        #: is due (ms, -1: none) and each stream's tip (fetch.lua), for the next wait.
        self.idle: tuple[int, dict[str, bytes]] | None = None
        self.outcomes = outcomes
        self.next_reclaim = 0.0
        #: The scripts fetches go through: the client's, or the lane's own while it runs.
        self.scripts: Scripts | None = None


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
            Each read waits at most half the client's socket timeout (redis-py's
            default: 5 s), so a longer `block` never reads as a lost connection.

    Raises:
        ValueError: a queue name with a comma or surrounding spaces (as `--queues` could
            never give), or a concurrency outside 1..1,000,000.
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
        for queue in self.queues:
            if not is_queue_name(queue):
                raise ValueError(f"queues: {queue!r:.60} is not {QUEUE_NAME_RULE}")
        self.concurrency = concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.burst = burst
        self.shutdown_timeout = shutdown_timeout
        self.max_deliveries = max_deliveries
        self.block_ms = max(1, int(block * 1000))
        self.client = app.client
        # Each stream's (queue, priority), most important queue first, most urgent first;
        # with several shards, one lane of streams per shard, all under one concurrency.
        self._served: dict[str, tuple[str, int]] = {}
        self.lanes: list[Lane] = []
        self._lane_of: dict[str, Lane] = {}
        for shard in self.client.shards:
            keys = shard.keys
            served = {keys.stream(q, p): (q, p) for q in self.queues for p in PRIORITIES}
            self._served.update(served)
            outage = Outage(f"worker {self.name}", shard.url)
            lane = Lane(
                shard,
                list(served),
                Outcomes(app, shard, self.name, list(served), self._committed, outage),
                outage,
            )
            self.lanes.append(lane)
            self._lane_of.update(dict.fromkeys(served, lane))
        self.streams = list(self._served)
        #: The root shard's: its heartbeat, scheduler and result listener report there.
        self.outage = self.lanes[0].outage
        # Fetch replies name streams as bytes: looked up as they come, no decoding.
        self._by_raw = {s.encode(): (s, q, p) for s, (q, p) in self._served.items()}
        self.slots = Slots(concurrency)
        self._thread_limiter: Any = None
        self.vt = app.settings.visibility_timeout
        self._reclaim_every = min(max(self.vt / 2, 0.1), 10.0)  # s between reclaims
        self._beats_end = asyncio.Event()
        self._turn = asyncio.Lock()  # lanes fetch one at a time (see _fetch_loop)
        self._fetching: asyncio.Task[None] | None = None  # the fetch loops, while run() runs
        # One table of the entries this worker holds, each with its phase.
        self._running: dict[Key, Execution] = {}
        self._not_begun: list[Delivery] = []  # read ahead, never run: release on stop
        self._alone: asyncio.Task[None] | None = None  # a reclaimed entry running alone
        self._stop_at = float("inf")  # when stop() was first called (monotonic)
        self._abandoned: set[Execution] = set()  # bodies that ignored cancellation
        self._runtime = Runtime(app, self.client, self.name, self.thread_limiter, self._abandon)
        self._pause_messages = 0  # pause/resume messages taken up (see _take_up_paused)
        self._paused_refused: tuple[str, float] | None = None  # (refusal, when said)
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = asyncio.Event()
        self._started_ms = 0
        self._avg_run = 1.0  # moving average of run time (s); starts "slow": no prefetch
        self._prepared = False
        self._registered_at = float("-inf")  # when a registration last landed (monotonic)
        queue_of = {stream: queue for stream, (queue, _) in self._served.items()}
        self.losses = DataLoss(self.name, self.client, queue_of, app.hooks, max(self.vt, 10.0))

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no more fetching, running tasks may finish."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
        self._stop.set()

    def _left(self, grace: float = 0.0) -> float:
        """Seconds left of shutdown_timeout (plus `grace`) since stop()."""
        if self._stop_at == float("inf"):  # not stopped: the whole of it
            return self.shutdown_timeout + grace
        return max(self._stop_at + self.shutdown_timeout + grace - time.monotonic(), 0.1)

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
    def threads_running(self) -> int:
        """`def` task bodies still running in threads (after a stop: those that ran past
        the shutdown timeout; they keep the process from exiting)."""
        return self._runtime.threads.running

    @property
    def is_stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    async def wait_started(self) -> None:
        """Wait until the worker is connected and consuming."""
        await self._started.wait()

    async def wait_stopping(self) -> None:
        """Wait until stop() is called."""
        await self._stop.wait()

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

    async def prepare(self) -> None:
        """Create the consumer groups and register the worker (once): run() does it first.

        Raises:
            ConfigurationError: the namespace is spread over another number of shards.
            BrokerConnectionError: Redis cannot be reached.
            BrokerRefusedError: Redis refused to create a group (NOPERM, OOM, READONLY,
                LOADING).
        """
        if self._prepared:
            return
        try:
            await self.client.check_shards()  # before creating any stream of a shard
            await self.client.ensure_groups(self.streams)
        except _SCRIPT_ERRORS as exc:
            raise broker_error(self.client.url, exc) from exc
        self._prepared = True
        self._started_ms = int(now() * 1000)
        try:
            s = self.app.settings
            await TaskIndex(self.client).configure(s.index_size, s.events_size)
            await self._register(ttl=max(self.vt, 10.0))
            await self.client.worker_event(self.name, "JOINED")
            await self._check_peers()
        except _SCRIPT_ERRORS as exc:
            # Only `aiotasks status` and the dashboard need it (an OOM server refuses it):
            # the heartbeat registers again.
            log.warning("worker %s could not register yet (%s)", self.name, exc)

    async def _start(self) -> bool:
        """prepare(), retried with backoff (one line per try) until it works; False when
        the worker is stopped first. A refusal at start is waited out like a lost Redis."""
        backoff = Backoff(start=0.5, cap=5.0)
        attempt = 1
        while not self._stop.is_set():
            try:
                await self.unless_stopped(self.prepare())
                # Stopped while preparing: a prepare cut off after it registered leaves
                # (run() unregisters), and nothing starts.
                return self._prepared and not self._stop.is_set()
            except (BrokerConnectionError, BrokerRefusedError) as exc:
                delay = backoff.next()
                log.error(
                    "worker %s cannot start (attempt %d): %s; retrying in %.1f s",
                    self.name,
                    attempt,
                    exc,
                    delay,
                    extra={"worker": self.name, "attempt": attempt, "retry_in": round(delay, 3)},
                )
                attempt += 1
                await self._sleep(delay)
        return False

    async def run(self) -> None:
        """Run until stop() (or, with burst, until the queues are empty).

        Redis unreachable or refusing at start (an ACL without a permission, out of
        memory, a read-only replica, loading) is logged once per try and retried with
        backoff, as when Redis goes away later. Once started, one WARNING says so when
        the server may lose tasks (no persistence, an evicting maxmemory-policy), unless
        the App's warn_on_unsafe_server is False.

        Its warnings and errors (a task that raised, a lost Redis) go to stderr while it
        runs when the process's logging configuration would show nothing of them.
        """
        with visible_errors():
            await self._run()

    async def _run(self) -> None:
        if not await self._start():
            if self._prepared:  # prepare() registered us, then a stop came before run()
                await self._leave()
            self._stopped.set()
            return
        self._warn_unserved()
        # A stop here must not wait for a Redis that does not answer (a hung server).
        if self.app.settings.warn_on_unsafe_server:
            await self.unless_stopped(warn_if_unsafe(self.client.redis, self.client.url))
        # Before the first fetch: a queue paused before we started gives us nothing.
        await self.unless_stopped(self._take_up_paused())
        self._share_outage(True)
        self._started.set()
        log.debug("worker %s consuming %s", self.name, ", ".join(self.queues))
        try:
            self._own_connections()
            async with asyncio.TaskGroup() as tg:
                beats = tg.create_task(self._heartbeat_loop())
                background = [tg.create_task(lane.outcomes.flush_loop()) for lane in self.lanes]
                background.append(tg.create_task(self._control_loop()))
                scheduler = Scheduler(self.app, self.name, Schedules(self.app), self.outage)
                background.append(tg.create_task(scheduler.run()))
                background.append(tg.create_task(self._paused_loop()))
                loop = asyncio.get_running_loop()
                self._fetching = loop.create_task(self._fetch_all())
                await self._until_fetching_ends(self._fetching)
                await self._shut_down(beats, background)
            await self._leave()
        finally:
            self._share_outage(False)
            for ex in [*self._running.values(), *self._abandoned]:
                if ex.task is not None:
                    ex.task.cancel()
            try:
                await self._give_back_connections()
            finally:
                self._stopped.set()

    def _own_connections(self) -> None:
        """The fetches and the commits of each lane, one call at a time each, on
        connections of their own where the pool has room (Client.own_scripts): the hot
        path's calls skip the pool."""
        for lane in self.lanes:
            lane.scripts = lane.client.own_scripts()
            lane.outcomes.scripts = lane.client.own_scripts()

    async def _give_back_connections(self) -> None:
        """Once the fetch loops have ended (a cancelled run() leaves them ending): a
        connection given back under a call would go back to the pool twice."""
        if self._fetching is not None:
            await cancel_and_wait([self._fetching])
            self._fetching = None
        for lane in self.lanes:
            for scripts in (lane.scripts, lane.outcomes.scripts):
                if scripts is not None:
                    await scripts.close()
            lane.scripts = lane.outcomes.scripts = None

    async def _shut_down(
        self, beats: asyncio.Task[None], background: list[asyncio.Task[Any]]
    ) -> None:
        """Drain, store the last outcomes, end the background loops: within
        shutdown_timeout plus STORE_GRACE, so a Redis that is gone cannot hold a stop
        forever. What was not stored by then is redelivered after the visibility timeout,
        as if the worker had died."""
        try:
            async with asyncio.timeout(self._left(STORE_GRACE)):
                await self._drain()
                # The heartbeat ends between beats, never inside one: a registration
                # cut off mid-flight could land after unregister_worker and outlive us.
                self._beats_end.set()
                await beats
                await cancel_and_wait(background)
                await self._commit_all()
        except TimeoutError:
            unstored = sum(lane.outcomes.unstored for lane in self.lanes)
            log.error(
                "worker %s: stopping without waiting longer for Redis; %d outcome(s) not "
                "stored, whose tasks will be redelivered after the visibility timeout",
                self.name,
                unstored,
                extra={"worker": self.name, "unstored": unstored},
            )
            await cancel_and_wait([beats, *background])

    def _warn_unserved(self) -> None:
        """One WARNING when tasks of this App are sent to queues this worker does not take
        (`queue=`, task_routes): a worker started without `--queues` for them leaves them
        waiting (another worker may take them)."""
        elsewhere: dict[str, list[str]] = {}
        for name, task in self.app.tasks.items():
            queue = task.opts.queue or self.app.route(name)
            if queue not in self.queues and not name.startswith("aiotasks."):
                elsewhere.setdefault(queue, []).append(name)
        if elsewhere:
            log.warning(
                "worker %s takes tasks from %s only; %s (give it --queues to take them)",
                self.name,
                ", ".join(self.queues),
                "; ".join(
                    f"queue {q!r} gets {', '.join(sorted(names))}"
                    for q, names in sorted(elsewhere.items())
                ),
                extra={"worker": self.name, "queues": sorted(elsewhere)},
            )

    async def _done_or_stopped(self, fut: asyncio.Future[Any]) -> None:
        """Wait until `fut` is done or the worker is stopped, whichever comes first."""
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({fut, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    async def unless_stopped(self, aw: Awaitable[T]) -> T | None:
        """Await `aw`, or give it up (None) if stop() comes first.

        Against a hung server (stopped, partitioned) one command lasts as long as
        redis-py's socket timeout and retries, and a SIGTERM must not wait for it. What
        is given up has ended when this returns (a cancelled command drops its
        connection at once), so it cannot overlap what the stop does next.
        """
        task = asyncio.ensure_future(aw)
        try:
            await self._done_or_stopped(task)
        finally:
            await cancel_and_wait([task])
        if task.cancelled():
            return None
        return task.result()

    async def _fetch_all(self) -> None:
        if len(self.lanes) == 1:
            await self._fetch_loop(self.lanes[0])
            return
        async with asyncio.TaskGroup() as fetching:
            for lane in self.lanes:
                fetching.create_task(self._fetch_loop(lane))

    async def _until_fetching_ends(self, fetching: asyncio.Task[None]) -> None:
        """Wait for the fetch loops; once stopped, shutdown_timeout at most: a fetch that
        Redis never answers (a hung server, a partition) must not hold the stop. What it
        started is redelivered after the visibility timeout."""
        try:
            await self._done_or_stopped(fetching)
            if not fetching.done():
                await asyncio.wait({fetching}, timeout=self._left())
            if not fetching.done():
                log.error(
                    "worker %s: stopping without the answer to a fetch Redis has not given "
                    "in %s s; what it started is redelivered after the visibility timeout",
                    self.name,
                    self.shutdown_timeout,
                )
                await cancel_and_wait([fetching])
                return
        finally:
            if not fetching.done():  # run() itself was cancelled
                fetching.cancel()
        fetching.result()  # its error, if it failed, as run()'s own

    def _share_outage(self, on: bool) -> None:
        """While we run, the App's result listener reports a lost Redis through our
        Outage: one line for it and all our loops (unless another worker's has it)."""
        notifier = self.client.notifier
        if on and notifier.outage is None:
            notifier.outage = self.outage
        elif not on and notifier.outage is self.outage:
            notifier.outage = None

    async def _leave(self) -> None:
        """Unregister within UNREGISTER_TIMEOUT: a hung server must not hold a stop."""
        try:
            async with asyncio.timeout(UNREGISTER_TIMEOUT):
                await self._unregister()
        except TimeoutError:
            log.warning("worker %s could not unregister (Redis did not answer)", self.name)

    async def _unregister(self) -> None:
        """Leave the registry. A courtesy (the entry expires anyway), so a lost or refusing
        server is logged, never raised; a connection torn by the stop is tried once more."""
        for attempt in (1, 2):
            try:
                await self.client.unregister_worker(self.name)
                return
            except _SCRIPT_ERRORS as exc:
                if attempt == 2 or not isinstance(exc, CONNECTION_ERRORS):
                    log.warning("worker %s could not unregister (%r)", self.name, exc)
                    return

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
            _, late = await asyncio.wait(pending, timeout=self._left())
            for t in late:
                t.cancel()
            if late:
                log.warning(
                    "worker %s: %d task(s) did not finish in time; they will be redelivered",
                    self.name,
                    len(late),
                )
                await asyncio.wait(late, timeout=1.0)
        await self._commit_all()

    async def _commit_all(self) -> None:
        # Concurrently: a shard whose master is down holds back only its own commits.
        await asyncio.gather(*(lane.outcomes.commit_all() for lane in self.lanes))

    def _by_lane(self, keys: Iterable[Key]) -> list[tuple[Lane, list[Key]]]:
        """Entry keys (stream, entry id) grouped by the lane of their stream."""
        groups: dict[int, tuple[Lane, list[Key]]] = {}
        for key in keys:
            lane = self._lane_of[key[0]]
            groups.setdefault(id(lane), (lane, []))[1].append(key)
        return list(groups.values())

    async def _release(self, got: list[Delivery]) -> None:
        n = 0
        try:
            for lane, keys in self._by_lane([d.key for d in got]):
                n += await lane.client.scripts.release(
                    streams=lane.streams,
                    consumer=self.name,
                    entries=[entry_ref(stream, entry_id) for stream, entry_id in keys],
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

    async def _fetch_loop(self, lane: Lane) -> None:
        """Read and start batches from one lane's streams while the worker runs.

        With several lanes, each runs this loop and they share the slots. They take
        turns to fetch, so that each batch takes every free slot (as one lane would)
        instead of a few each. A lane whose last fetch read nothing waits for new entries
        outside the turns and without slots, reading one entry at most, which waits for
        a slot if the others took them all meanwhile.
        """
        backoff = Backoff(start=0.1, cap=5.0)
        shared = len(self.lanes) > 1
        loop = asyncio.get_running_loop()  # once, not per task
        while not self._stop.is_set():
            waits = shared and lane.idle is not None and time.monotonic() < lane.next_reclaim
            async with self._turn if shared and not waits else nullcontext():
                batch = await self._take_batch(lane, waits, shared)
            if batch is None:
                break
            got, n, failed = batch
            if failed is not None:
                await self._fetch_failed(lane, failed, backoff.next())
                continue
            backoff.reset()
            if len(got) < n:
                self.slots.release(n - len(got))
            for i, d in enumerate(got):
                self._spawn(d, i < n, loop)
            if got:
                # Let the batch begin before taking slots again: tasks that finish at once
                # (on 3.11, where a task only starts on the next turn) free theirs first,
                # so the next fetch takes every slot, and reads ahead (_prefetch), rather
                # than the one or two freed so far. 19k -> 32k no-ops/s on 3.11.
                await asyncio.sleep(0)
                if lane.idle is not None:
                    # The streams are drained, so the next call only waits: let these
                    # tasks run and their results go to Redis first (a lone task's round
                    # trip).
                    await lane.outcomes.flushed()
            if self.burst and not got:
                await self._end_burst()

    async def _take_batch(
        self, lane: Lane, waits: bool, shared: bool
    ) -> tuple[list[Delivery], int, BaseException | None] | None:
        """Take the free slots and fetch (reclaiming when due): (entries, slots held, the
        error of a failed fetch); None once the worker stops. `waits`: an idle lane's
        wait, holding no slot, for one entry at most."""
        if self._alone is not None:
            await self._after_alone()
        if not await self._slot_or_stop():
            return None
        if shared and not waits:
            lane.idle = None  # never a blocking wait inside the turn
        n = 1 + self.slots.take(self.concurrency - 1)
        reclaim = time.monotonic() >= lane.next_reclaim
        if reclaim:
            lane.next_reclaim = time.monotonic() + self._reclaim_every
        want = n + self._prefetch(n)
        if waits:
            self.slots.release(n)
            n, want = 0, 1
        try:
            return await self._next_batch(lane, want, reclaim), n, None
        except LOOP_ERRORS as exc:
            self.slots.release(n)
            return [], 0, exc

    async def _end_burst(self) -> None:
        """With burst: stop once nothing runs, waits to commit, or is queued."""
        if self._running or self._has_ops:
            return
        for lane in self.lanes:
            if await lane.client.has_work(lane.active, within=1.0):  # paused ones wait
                return
        self.stop()

    @property
    def _has_ops(self) -> bool:
        return any(lane.outcomes.has_ops for lane in self.lanes)

    async def _paused_loop(self) -> None:
        """Take up paused and resumed queues (tasks.queues) within a second, should a
        pause message (taken up at once, see _control) have been missed."""
        while True:
            await asyncio.sleep(PAUSE_REFRESH)
            await self._take_up_paused()

    async def _take_up_paused(self) -> None:
        """Read the paused queues; fetch only from the others.

        A task fetched from a queue as it was being paused (a read already in flight)
        goes back to its stream unrun (Execution, `rt.paused`)."""
        told = self._pause_messages
        try:
            now_paused = frozenset(await Queues(self.app).paused())
        except LOOP_ERRORS as exc:
            # Never the end of the worker. A lost connection the fetch loop reports; a
            # refusal (an ACL without SMEMBERS) only this read meets: said here.
            if not self.client.waits_out(exc):
                self._say_paused_refused(exc)
            return
        if self._paused_refused is not None:
            self._paused_refused = None
            log.warning("worker %s reads the paused queues again: pauses hold", self.name)
        if told == self._pause_messages:  # else a message came meanwhile: it is newer
            self._set_paused(now_paused)

    def _say_paused_refused(self, exc: BaseException) -> None:
        """One ERROR line per refusal (again every REMIND s while it lasts), not one a
        second: pauses cannot be taken up meanwhile, so a paused queue may be served."""
        key, at = f"{type(exc).__name__}: {exc}", time.monotonic()
        said = self._paused_refused
        if said is not None and said[0] == key and at - said[1] < REMIND:
            return
        self._paused_refused = (key, at)
        what = "read of the paused queues (until it works, paused queues are served too)"
        self.outage.report(self.client, what, exc, PAUSE_REFRESH)

    def _set_paused(self, paused: frozenset[str]) -> None:
        if paused == self._runtime.paused:
            return
        self._runtime.paused = paused
        for lane in self.lanes:
            lane.active = [s for s in lane.streams if self._served[s][0] not in paused]
        mine = sorted(q for q in self.queues if q in paused)
        log.info("worker %s: paused queues %s", self.name, ", ".join(mine) or "none")

    async def _fetch_failed(self, lane: Lane, exc: BaseException, delay: float) -> None:
        """Log a fetch that Redis refused or could not answer, then wait `delay` s."""
        lane.outage.report(lane.client, "fetch", exc, delay)
        await self._sleep(delay)

    def _prefetch(self, n: int) -> int:
        """Entries to read beyond the free slots: a second batch when tasks are short.

        Tasks that finish in well under a round trip would leave the worker waiting on
        Redis between batches; reading one batch ahead halves the round trips per task.
        Long tasks get no prefetch, so they are never held back from idle workers.
        """
        if n == self.concurrency and self._avg_run < FAST_TASK:
            return n
        return 0

    async def _after_alone(self) -> None:
        """Fetch nothing while an entry runs alone; reclaim at once after it when more
        wait to run alone."""
        alone = self._alone
        if alone is not None and not alone.done():
            await self._done_or_stopped(alone)
        if alone is not None and alone.done() and self._alone is alone:
            self._alone = None
            for lane in self.lanes:
                if lane.alone_waiting:
                    lane.next_reclaim = 0.0

    async def _slot_or_stop(self) -> bool:
        """Take a slot; False when the worker stops first (a stop fetches nothing more)."""
        if self.slots.take(1):
            if self._stop.is_set():  # stopped while this lane waited for its turn
                self.slots.release()
                return False
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

    async def _next_batch(self, lane: Lane, n: int, reclaim: bool) -> list[Delivery]:
        try:
            got = await self._reclaim(lane, n) if reclaim else []
            if got:
                lane.idle = None  # reclaimed entries may lie past the tips: fetch anew
                return got
            return await self._fetch(lane, n)
        except ResponseError as exc:
            text = str(exc)
            if "NOGROUP" not in text and "UNBLOCKED" not in text:
                raise
            # The stream or its group is gone: the server lost its data.
            await self.losses.found([], GROUPS_GONE)
            return []

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        """Sleep `seconds`, or less if `until` (the stop, by default) is set meanwhile."""
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await (until or self._stop).wait()

    def _delivery(
        self, raw_stream: bytes, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int
    ) -> Delivery:
        stream, queue, priority = self._by_raw[raw_stream]
        before = fields.get(b"dl")
        if before is not None:  # a bad one is dead-lettered by decode_entry
            deliveries += earlier_deliveries(before) or 0
        return Delivery(stream, queue, priority, entry_id, fields, deliveries)

    def _fetched(self, entry: list[Any]) -> Delivery:
        """A fetched entry: [stream, entry id, fields flat as XREADGROUP gave them]."""
        raw_stream, entry_id, flat = entry
        it = iter(flat)
        return self._delivery(raw_stream, entry_id, dict(zip(it, it, strict=True)), 1)

    async def _fetch(self, lane: Lane, n: int) -> list[Delivery]:
        active = lane.active
        if not active:
            await self._sleep(self.block_ms / 1000)  # every queue of ours is paused
            return []
        idle, lane.idle = lane.idle, None
        common: dict[str, Any] = {
            "streams": active,
            "consumer": self.name,
            "count": n,
            "worker": self.name,
            "promote_limit": max(n, 100),
            "default_ttl": self.app.settings.result_ttl,
        }
        now_ms = int(now() * 1000)
        # The streams were read to their end last time: wait for the next entry and start
        # it in the same round trip. The body still runs only once fetch.lua started it.
        wait = None
        if idle is not None and list(idle[1]) == active:
            next_due, last_tips = idle
            block_ms = self.block_ms if next_due < 0 else min(self.block_ms, next_due - now_ms)
            # Not when a delayed task is due already (the wait overran: Redis times
            # blocking reads out on its clock tick): fetch at once, with the time as it is.
            wait = (block_ms, last_tips) if block_ms > 0 else None
        res = await (lane.scripts or lane.client.scripts).fetch(now_ms=now_ms, wait=wait, **common)
        lane.outage.ok("fetch")  # not proof that writes go through: an idle one may not write
        if res.get(b"lost"):
            await self.losses.found([s.decode() for s in res[b"lost"]], GROUPS_GONE)
        if res.get(b"group_gone"):
            # The wait met a stream without its group, which fetch.lua leaves alone while
            # the stream is empty: recreate it (found() does), or every wait fails at once.
            await self.losses.found([], GROUPS_GONE)
        got = [self._fetched(e) for e in res[b"entries"]]
        tips = res.get(b"tips")
        if tips is not None:
            # Every stream was read to its end (with or without entries): the next fetch
            # waits for new ones, instead of first finding the streams empty.
            due = int(res[b"next_due"])
            lane.idle = (due, {s: tips.get(s.encode(), b"0-0") for s in active})
        return got

    async def _reclaim(self, lane: Lane, n: int) -> list[Delivery]:
        res = await lane.client.scripts.reclaim(
            streams=lane.active,
            consumer=self.name,
            min_idle_ms=int(self.vt * 1000),
            count=n,
            now_ms=int(now() * 1000),
            worker=self.name,
            max_deliveries=self.max_deliveries,
            default_ttl=self.app.settings.result_ttl,
            queue_of={stream: self._served[stream][0] for stream in lane.streams},
            alone_from=min(ALONE_FROM, self.max_deliveries),
            # Finished runs waiting for their commit run no code: they do not count.
            may_take_alone=all(ex.phase is Phase.COMMITTING for ex in self._running.values()),
        )
        lane.outage.ok("fetch")
        got = [
            self._delivery(e[b"stream"], e[b"entry"], e[b"fields"], int(e[b"deliveries"]))
            for e in res[b"entries"]
        ]
        lane.alone_waiting = int(res.get(b"waiting") or 0)
        for d, e in zip(got, res[b"entries"], strict=True):
            d.alone = bool(e.get(b"alone"))
            log.warning(
                "worker %s reclaimed entry %s (delivery %d): the worker that held it renewed "
                "no lease for %g s here (it died, lost Redis that long, or renewed it on a "
                "primary that was failed over)%s",
                self.name,
                d.entry_id.decode(),
                d.deliveries,
                self.vt,
                ": it runs alone (its workers died with it before)" if d.alone else "",
            )
        return got

    # -- running ------------------------------------------------------------------------

    def _spawn(self, d: Delivery, held: bool, loop: asyncio.AbstractEventLoop) -> None:
        key = d.key
        if key in self._running:
            # Our own running entry, reclaimed after heartbeats failed for longer than the
            # visibility timeout: it runs here already; never twice at once.
            if held:
                self.slots.release()
            return
        ex = Execution(self._runtime, d, Lease(self.slots, held), key)
        self._running[key] = ex
        if _EAGER:
            # Runs at once, up to its first suspension: a body that never suspends
            # finishes here without ever being scheduled (ex.task is set before any
            # timer or revoke can need it, since those run only once it suspends).
            ex.task = asyncio.Task(  # type: ignore[call-arg,unused-ignore]
                self._execute(ex), loop=loop, eager_start=True
            )
        else:
            ex.task = loop.create_task(self._execute(ex))
        if d.alone:
            self._alone = ex.task

    async def _execute(self, ex: Execution) -> None:
        outcome: Outcome | None = None
        try:
            if self._alone is not None or not ex.lease.held:
                await self._wait_turn(ex)
            if self._stop.is_set() and not ex.lease_was_given:
                # Read ahead, and the worker stopped before it had a slot: give it back.
                self._not_begun.append(ex.delivery)
                return
            ex.phase = Phase.RUNNING
            ex.started = time.perf_counter()  # a prefetched entry starts once it has a slot
            outcome = ex.decode()
            if outcome is None:
                outcome = await ex.run()
        except asyncio.CancelledError:
            pass  # stopping: the entry stays pending and is redelivered
        except Exception as exc:
            # aiotasks' own code failed: record it once, never leave it to redelivery.
            log.exception("worker %s: internal error running task %s", self.name, ex.tid)
            outcome = internal_error(exc)
        finally:
            ex.lease.release()
            self._abandoned.discard(ex)
            if outcome is None or ex.limits.abandoned:
                if ex.phase is not Phase.COMMITTING:
                    # Nothing to commit (cancelled on stop, or settled by the abandon).
                    self._running.pop(ex.key, None)
        if outcome is not None and not ex.limits.abandoned:
            self._settle(ex, outcome)
            if ex.ctx is not None:  # made for the hooks (or current_task()): they may run
                await ex.after(outcome)

    async def _wait_turn(self, ex: Execution) -> None:
        """Wait for the entry running alone, if any, then for a slot (read ahead)."""
        alone = self._alone
        if alone is not None and alone is not ex.task and not alone.done():
            # Read by another lane's wait while an entry runs alone: after it.
            await asyncio.wait({alone})
        await ex.lease.acquire()

    def _settle(self, ex: Execution, outcome: Outcome) -> None:
        """Queue an outcome for the next batched commit."""
        ex.ended = time.perf_counter()
        self._avg_run += 0.1 * (ex.ended - ex.started - self._avg_run)
        self._lane_of[ex.delivery.stream].outcomes.add(ex, outcome)

    def _committed(self, keys: list[Key]) -> None:
        for key in keys:
            self._running.pop(key, None)

    def _abandon(self, ex: Execution, outcome: Outcome) -> None:
        """A task that ignored cancellation: its slot is freed and its outcome recorded."""
        self._settle(ex, outcome)
        ex.lease.release()
        self._abandoned.add(ex)

    @property
    def done(self) -> int:
        """Tasks this worker finished (any final state but FAILURE)."""
        return sum(lane.outcomes.done for lane in self.lanes)

    @property
    def failed(self) -> int:
        """Tasks this worker recorded as FAILURE (dead letters included)."""
        return sum(lane.outcomes.failed for lane in self.lanes)

    # -- heartbeat and control ----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = max(self.vt / 3, 0.05)
        while True:
            await self._sleep(interval, until=self._beats_end)
            if self._beats_end.is_set():
                return
            running = dict(self._running)  # a commit may pop entries between two lanes' calls
            # One call per lane, each on its own: a shard whose master is down must not
            # keep the others' running entries from being refreshed.
            calls = [self._beat(lane, keys, running) for lane, keys in self._by_lane(running)]
            calls.append(self._beat_registration(interval))
            await asyncio.gather(*calls)

    async def _beat(self, lane: Lane, keys: list[Key], running: dict[Key, Execution]) -> None:
        refs = [entry_ref(*k, running[k].tid or "", running[k].slot) for k in keys]
        await self._beat_call(
            lane.client.scripts.heartbeat(
                streams=lane.streams, consumer=self.name, entries=refs, now_ms=int(now() * 1000)
            ),
            lane.outage,
        )

    async def _beat_registration(self, interval: float) -> None:
        if await self._beat_call(self._register(ttl=max(interval * 3, 10.0)), wrote=True):
            await self._beat_call(self.losses.found([], REGISTRATION_GONE))

    async def _beat_call(
        self, call: Awaitable[T], outage: Outage | None = None, wrote: bool = False
    ) -> T | None:
        """Await one heartbeat call (to the root shard, or `outage`'s); a failure is logged
        (the next beat tries again)."""
        outage = outage or self.outage
        try:
            result = await call
        except LOOP_ERRORS as exc:
            outage.report(self.client, "heartbeat", exc)
        else:
            outage.ok("heartbeat", wrote=wrote)
            return result
        return None

    async def _register(self, ttl: float) -> bool:
        """Publish this worker's description (for `aiotasks status`) for `ttl` seconds.

        Returns True when the previous registration vanished before its ttl was up: the
        server lost data (a worker that found nothing wrong with its groups learns it so).
        """
        description: dict[str, str | int] = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": ",".join(self.queues),
            "concurrency": self.concurrency,
            "started_at": self._started_ms,
            "last_beat": int(now() * 1000),
            "running": len(self._running),
            "done": self.done,
            "failed": self.failed,
            **describe(self.app.tasks),
        }
        new = await self.client.register_worker(self.name, description, ttl)
        previous, self._registered_at = self._registered_at, time.monotonic()
        return new and time.monotonic() - previous < ttl * 0.8

    async def _check_peers(self) -> None:
        """Warn once when a live worker sharing a queue registers other tasks."""
        with suppress(*_SCRIPT_ERRORS, ValueError):  # a check, never a reason not to start
            await warn_if_tasks_differ(self.client, self.name, self.queues, list(self.app.tasks))

    async def _control_loop(self) -> None:
        """Listen for broadcasts: `revoke <id>` cancels that task if it runs here."""
        backoff = Backoff(start=0.1, cap=5.0)
        notifier = self.client.notifier
        while True:
            try:
                async with notifier.listen(self.client.keys.control_channel, CONTROL) as watch:
                    backoff.reset()
                    while True:
                        note, _, _ = await watch.get()
                        self._control(note.encode())
            except CONNECTION_ERRORS:
                await asyncio.sleep(backoff.next())

    def _control(self, data: bytes) -> None:
        cmd, _, arg = data.decode(errors="replace").partition(" ")
        if cmd in ("pause", "resume"):  # take it up now, before a fetch in flight lands
            self._pause_messages += 1
            paused = self._runtime.paused
            self._set_paused(paused | {arg} if cmd == "pause" else paused - {arg})
        elif cmd == "revoke":
            # A scan of the running table: revokes are rare, the table is small.
            for ex in list(self._running.values()):
                if ex.tid == arg and ex.phase is not Phase.COMMITTING:
                    task_log.warning("revoking running task %s", arg)
                    ex.cancel_revoked()
