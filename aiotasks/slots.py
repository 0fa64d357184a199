"""Slots: the worker's concurrency limit, with leases a waiting task can hand back."""

from __future__ import annotations

import asyncio
from collections import deque

#: The most tasks a worker runs at once: well past what one process can serve (a
#: thread per plain-def task, a batch read as large), low enough to catch a typo.
MAX_CONCURRENCY = 1_000_000


class Slots:
    """A counting limit with FIFO hand-off, and a non-blocking bulk take for batch fetches."""

    def __init__(self, total: int) -> None:
        if not 1 <= total <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY:,}, got {total}")
        self.total = total
        self.free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take one slot, waiting in line for it."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed to us as we were cancelled: pass it on
            elif fut in self._waiters:  # release() may have dropped it already
                self._waiters.remove(fut)
            raise

    def take(self, most: int) -> int:
        """Take up to `most` free slots without waiting; returns how many."""
        if self._waiters or self.free <= 0:
            return 0
        n = min(most, self.free)
        self.free -= n
        return n

    def take_now(self) -> None:
        """Take one slot at once, over the limit if none is free (a waiting parent told
        to wrap up): the next releases pay it back before anyone else gets one."""
        self.free -= 1

    def release(self, n: int = 1) -> None:
        """Give back `n` slots, handing them to waiters first (once none is owed)."""
        if self.free >= 0 and not self._waiters:  # most releases: a task's one slot
            self.free += n
            return
        # In steps of waiters, not of slots: a fetch gives back what it took and did not
        # use, as many as the concurrency.
        owed = min(n, max(-self.free, 0))
        self.free += owed
        n -= owed
        while n and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1
        self.free += n

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self.total - self.free


class Lease:
    """One task's hold on a slot; release and acquire are safe to repeat."""

    __slots__ = ("_slots", "held")

    def __init__(self, slots: Slots, held: bool) -> None:
        self._slots = slots
        self.held = held

    def release(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()

    async def acquire(self) -> None:
        if not self.held:
            await self._slots.acquire()
            self.held = True

    def take_now(self) -> None:
        if not self.held:
            self._slots.take_now()
            self.held = True
