"""The hub: one follower of the namespace's event feed per dashboard, fanned out to pages.

Every open page holds a server-sent-events stream; all of them share one blocking read
of the feed (`TaskIndex.follow()`), never one per page and never a poll of task records.
The hub gathers the events of a short tick, keeps each task's latest change, counts the
tasks that finish per queue (the throughput), and sends every subscriber one `Tick`:
the changes, plus freshly rendered fragments (the overview's panels, the dead letters)
for the pages that show them, at most once a second while events flow and every few
seconds when idle (workers' heartbeats change without events).

The hub runs while pages are open, and a little longer, so that a page load followed by
its stream reuses it; it owns its tasks and cancels them when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..backoff import Backoff
from ..cancel import cancel_and_wait
from ..errors import CONNECTION_ERRORS
from ..index import Event, TaskIndex
from ..state import TaskState

log = logging.getLogger(__name__)

#: Task ids whose name and queue the hub remembers (to label finish events, which carry
#: only the id), and changes kept per tick: both bounded, whatever the traffic.
NAMES_KEPT = 50_000
CHANGES_PER_TICK = 500
#: Seconds over which throughput is measured.
WINDOW = 60.0
_FINAL = {s.value for s in TaskState if s.is_final}

Renderer = Callable[[], Awaitable[str]]


@dataclass(slots=True)
class Tick:
    """What one subscriber gets: task changes (JSON-able dicts) and rendered fragments."""

    changes: list[dict[str, Any]] = field(default_factory=list)
    fragments: dict[str, str] = field(default_factory=dict)
    end: bool = False  # the hub stopped: end the stream (the browser reconnects)


class Subscriber:
    """One open stream: the fragments it shows, and its queue of ticks."""

    def __init__(self, wants: frozenset[str]) -> None:
        self.wants = wants
        self.queue: asyncio.Queue[Tick] = asyncio.Queue(maxsize=32)

    def put(self, tick: Tick) -> None:
        """Queue a tick; a client too slow to keep up loses its oldest ticks, not the hub."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(tick)


class Hub:
    """Follows one namespace's event feed for every open dashboard page.

    Args:
        index: the namespace's task index and feed.
        renderers: fragment name -> coroutine rendering it (called only when wanted).
        tick: seconds a burst of events gathers before it is sent.
        refresh: least seconds between two renders of the fragments.
        idle: seconds after which the fragments are rendered again without events.
        linger: seconds the hub keeps running after its last subscriber left.
    """

    def __init__(
        self,
        index: TaskIndex,
        renderers: dict[str, Renderer],
        *,
        tick: float = 0.2,
        refresh: float = 1.0,
        idle: float = 5.0,
        linger: float = 30.0,
    ) -> None:
        self.index = index
        self.renderers = renderers
        self.tick, self.refresh, self.idle, self.linger = tick, refresh, idle, linger
        self._subs: set[Subscriber] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stop_timer: asyncio.TimerHandle | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # runners cancelled when idle
        self._names: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self._finished: deque[tuple[float, str | None]] = deque()
        self._pending: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._stale = True  # the fragments need a render
        self.ready = asyncio.Event()  # the throughput window has been read back
        self.redis_up = True  # False from a lost connection until Redis answers again

    # -- lifetime ---------------------------------------------------------------------

    def touch(self) -> None:
        """Make sure the hub runs (a page is being served); it lingers after that."""
        if self._runner is None or self._runner.done():
            self.ready.clear()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        if not self._subs:
            self._schedule_stop()

    def _schedule_stop(self) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self._stop_timer = asyncio.get_running_loop().call_later(self.linger, self._stop_idle)

    def _stop_idle(self) -> None:
        self._stop_timer = None
        if not self._subs and self._runner is not None:
            # Until it ends: Python 3.11 can swallow a cancel (cancel.py).
            stopping = asyncio.get_running_loop().create_task(cancel_and_wait([self._runner]))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
            self._runner = None

    async def close(self) -> None:
        """Stop following (the dashboard's server is shutting down)."""
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await cancel_and_wait([runner])
        if self._stopping:  # runners stopped when idle: each ends under its own cancels
            await asyncio.wait(set(self._stopping))

    @contextlib.asynccontextmanager
    async def subscribe(self, wants: frozenset[str] = frozenset()) -> AsyncIterator[Subscriber]:
        """A subscription for one stream; the hub runs at least as long as it is open."""
        sub = Subscriber(wants)
        self._subs.add(sub)
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self._stop_timer = None
        self.touch()
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            if not self._subs:
                self._schedule_stop()

    def poke(self) -> None:
        """Render and send the fragments now (after an action changed what they show)."""
        self._stale = True
        self._wake.set()

    # -- what pages read --------------------------------------------------------------

    def label(self, task_id: str) -> tuple[str | None, str | None]:
        """The name and queue last seen for a task id (None when unknown)."""
        return self._names.get(task_id, (None, None))

    def throughput(self) -> dict[str | None, int]:
        """Tasks finished in the last WINDOW seconds, per queue (None: queue unknown)."""
        self._expire(time.time())
        counts: dict[str | None, int] = {}
        for _, queue in self._finished:
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    def changes(self, events: list[Event]) -> list[dict[str, Any]]:
        """Events as the latest change per task, labelled with what the hub knows."""
        latest: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.task_id is not None:
                self._remember(e)
                latest.pop(e.task_id, None)
                latest[e.task_id] = self._change(e)
        return list(latest.values())[-CHANGES_PER_TICK:]

    # -- following --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read())
                tg.create_task(self._send_loop())
        except Exception:
            log.exception("dashboard: following the event feed failed")
        # Streams end: their browsers reconnect, which starts the hub again.
        for sub in list(self._subs):
            sub.put(Tick(end=True))

    async def _read(self) -> None:
        backoff = Backoff(start=0.2, cap=5.0)
        after: str | None = None
        while True:
            try:
                last = await self.index.last_id()  # and whether Redis answers again
                self._redis_is(True)
                if after is None:
                    after = last
                    await self._read_back()
                    self.ready.set()
                async for event in self.index.follow(after=after):
                    after = event.cursor or event.id
                    self._note(event)
                    backoff.reset()
            except CONNECTION_ERRORS as exc:
                self._redis_is(False)
                delay = backoff.next()
                log.warning(
                    "dashboard: lost Redis while following events (%s); again in %.1f s", exc, delay
                )
                await asyncio.sleep(delay)

    def _redis_is(self, up: bool) -> None:
        """Tell open pages when Redis is lost or back: what they show is not live meanwhile.
        (A stream reads redis_up when woken: a tick dropped for a slow client loses no
        change of it.)"""
        if up != self.redis_up:
            self.redis_up = up
            for sub in list(self._subs):
                sub.put(Tick())

    async def _read_back(self) -> None:
        """Read the last WINDOW seconds of the feed: throughput, and names of live tasks."""
        now = time.time()
        start_ms = int((now - WINDOW) * 1000)
        for e in await self.index.events_between(start_ms, int(now * 1000) + 1, count=2000):
            self._remember(e)
            if e.task_id is not None and e.state in _FINAL:
                self._finished.append((e.at_ms / 1000, self.label(e.task_id)[1]))

    def _note(self, e: Event) -> None:
        if e.task_id is None:  # a worker joined or left
            self._stale = True
            self._wake.set()
            return
        self._remember(e)
        if e.state in _FINAL:
            self._finished.append((time.time(), self.label(e.task_id)[1]))
        self._pending.pop(e.task_id, None)
        self._pending[e.task_id] = self._change(e)
        if len(self._pending) > CHANGES_PER_TICK:
            del self._pending[next(iter(self._pending))]
        self._stale = True
        self._wake.set()

    def _remember(self, e: Event) -> None:
        if e.task_id is None or e.name is None:
            return
        self._names[e.task_id] = (e.name, e.queue)
        self._names.move_to_end(e.task_id)
        if len(self._names) > NAMES_KEPT:
            self._names.popitem(last=False)

    def _change(self, e: Event) -> dict[str, Any]:
        assert e.task_id is not None
        name, queue = self.label(e.task_id)
        change: dict[str, Any] = {"id": e.task_id, "state": e.state, "at": e.at_ms}
        if e.name or name:
            change["name"] = e.name or name
        if e.queue or queue:
            change["queue"] = e.queue or queue
        return change

    def _expire(self, now: float) -> None:
        while self._finished and self._finished[0][0] < now - WINDOW:
            self._finished.popleft()
        while len(self._finished) > 2_000_000:  # bounded even at absurd rates
            self._finished.popleft()

    async def _send_loop(self) -> None:
        rendered_at = 0.0
        while True:
            wait = self.idle
            if self._stale:
                wait = max(0.0, min(wait, rendered_at + self.refresh - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.tick)  # let a burst gather into one tick
            tick = Tick(changes=list(self._pending.values()))
            self._pending = {}
            due = time.monotonic() >= rendered_at + (self.refresh if self._stale else self.idle)
            if due:
                tick.fragments = await self._render()
                rendered_at = time.monotonic()
                self._stale = False
            if tick.changes or tick.fragments:
                for sub in list(self._subs):
                    sub.put(self._for(sub, tick))

    async def _render(self) -> dict[str, str]:
        wanted = {name for sub in self._subs for name in sub.wants}
        out = {}
        for name in sorted(wanted & set(self.renderers)):
            try:
                out[name] = await self.renderers[name]()
            except CONNECTION_ERRORS as exc:
                log.warning("dashboard: cannot render %s (%s)", name, exc)
        return out

    @staticmethod
    def _for(sub: Subscriber, tick: Tick) -> Tick:
        fragments = {k: v for k, v in tick.fragments.items() if k in sub.wants}
        return Tick(tick.changes, fragments)


__all__ = ["Hub", "Subscriber", "Tick"]
