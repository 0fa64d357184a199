"""Celery's `task.map`, `task.starmap` and `task.chunks`: one task that calls another on
each item of a list in turn, in the worker that runs it, and returns their results.

Many small calls cost one message, one fetch and one result instead of one each; the
price is that they run one after another and share that task's timeouts and retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App


def mapper(app: App, star: bool) -> Callable[[str, list[Any]], Awaitable[list[Any]]]:
    """The body of the built-in map task (`star`: starmap) of `app`."""

    async def run(task: str, items: list[Any]) -> list[Any]:
        t = app.tasks.get(task)
        if t is None:
            raise LookupError(f"no task named {task!r} is registered on this worker")
        out = []
        for item in items:
            args, kwargs = t.load_args(tuple(item) if star else (item,), {})
            if t.is_async:
                out.append(await t(*args, **kwargs))  # inside this task's context
            else:  # a plain def runs in a thread, as a task of its own would
                out.append(await asyncio.to_thread(t.fn, *args, **kwargs))
        return out

    run.__name__ = run.__qualname__ = "starmap" if star else "map"
    return run
