"""Celery's `task.map`, `task.starmap` and `task.chunks`: one task that calls another on
each item of a list in turn, in the worker that runs it, and returns their results.

Many small calls cost one message, one fetch and one result instead of one each. The
price: they run one after another, under the map task's own timeouts and retries, not
the mapped task's, and its rate and concurrency limits do not apply to them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from .context import TaskContext, _current

if TYPE_CHECKING:
    from .app import App

#: Seconds of items run back to back before the map lets the worker's loop turn: items
#: that never await would otherwise hold off every other task and the lease renewals,
#: and a long map would be taken for a dead worker's and run again.
TURN = 0.005


def mapper(app: App, star: bool) -> Callable[[str, list[Any]], Awaitable[list[Any]]]:
    """The body of the built-in map task (`star`: starmap) of `app`."""

    async def run(task: str, items: list[Any]) -> list[Any]:
        t = app.tasks.get(task)
        if t is None:
            raise LookupError(f"no task named {task!r} is registered on this worker")
        worker_run = _current.get()
        out = []
        turned = time.monotonic()
        for item in items:
            if time.monotonic() - turned >= TURN:
                await asyncio.sleep(0)
                turned = time.monotonic()
            args, kwargs = t.load_args(tuple(item) if star else (item,), {})
            if t.is_async:
                out.append(await t(*args, **kwargs))  # inside this task's context
            elif worker_run is not None and not isinstance(worker_run, TaskContext):
                # In the worker's threads, as a `def` task of its own runs: a stop
                # counts it, and waits for it or leaves without it.
                out.append(await worker_run.in_thread(partial(t.fn, *args, **kwargs)))
            else:  # the map task called directly (`await task(...)`), not by a worker
                out.append(await asyncio.to_thread(t.fn, *args, **kwargs))
        return out

    run.__name__ = run.__qualname__ = "starmap" if star else "map"
    return run
