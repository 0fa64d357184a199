"""Cancel background tasks and make sure they end.

On Python 3.11, `asyncio.wait_for` (which redis-py uses to send every command, under its
default 5 s socket timeout) swallows a cancellation that arrives just as the awaited call
completes (CPython gh-86296, fixed in 3.12). A loop cancelled at that moment carries on as
if nothing happened and whoever awaits it waits forever. So: our own tasks are cancelled,
waited for a little, and cancelled again until they end; a caller's cancellation of a
waiter (a timeout around `result()`, a cancelled `updates()`) is raised again once the
command it swallowed returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], retry_every: float = 0.1) -> None:
    """Cancel `tasks` and return once every one of them has ended."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)


async def keep_cancel(call: Awaitable[T]) -> T:
    """Await `call`; if the task was cancelled meanwhile and no CancelledError came out
    (Python 3.11's wait_for swallowed it), raise it, whether the call returned (the
    command completed, so its connection is clean) or raised."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        result = await call
    except Exception as exc:
        # Swallowed on the way out, then the read failed: a retry loop would go on.
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError from exc
        raise
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result
