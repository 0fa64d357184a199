"""Cancel background tasks and make sure they end.

On Python 3.11, `asyncio.wait_for` (which redis-py uses on every read) swallows a
cancellation that arrives just as the awaited call completes (CPython gh-86296, fixed in
3.12). A loop cancelled at that moment carries on as if nothing happened and whoever
awaits it waits forever. So: cancel, wait a little, and cancel again until it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], retry_every: float = 0.1) -> None:
    """Cancel `tasks` and return once every one of them has ended."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)
