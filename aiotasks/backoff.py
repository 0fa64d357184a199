"""Exponential backoff with optional jitter: task retries, publish retries, reconnects."""

from __future__ import annotations

import random


def exponential(attempt: int, base: float, cap: float, jitter: bool) -> float:
    """Delay before retry number `attempt` (0-based): base * 2**attempt, capped.

    With jitter, a uniform random delay in [0, that] ("full jitter"), which spreads
    a thundering herd of retries.
    """
    delay = min(cap, base * (2 ** min(attempt, 32)))
    return random.uniform(0, delay) if jitter else delay


class Backoff:
    """Stateful capped exponential backoff for reconnect loops."""

    def __init__(self, start: float = 0.1, cap: float = 5.0, factor: float = 2.0) -> None:
        self.start = start
        self.cap = cap
        self.factor = factor
        self._next = start

    def next(self) -> float:
        """The delay to sleep now; each call grows the following one."""
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        """Back to the start after a success."""
        self._next = self.start
