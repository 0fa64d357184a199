"""More tasks for the reliability drills, on the same App as tests/apps/basic.py.

Started as `aiotasks run tests.apps.reliability:app`: every task of basic.py is there
too (same App), plus the ones below.
"""

from __future__ import annotations

import asyncio
import os
import time

import redis

from aiotasks import current_task
from tests.apps.basic import app

__all__ = ["app", "blocking_count_runs", "pause", "soak", "staged_sleep"]


@app.task
async def staged_sleep(key: str, first: float, then: float = 0.0) -> int:
    """Counts its runs in Redis (INCR key); the first run sleeps `first` s, later ones `then`."""
    r = current_task().app.client.redis
    n = int(await r.incr(key))
    await asyncio.sleep(first if n == 1 else then)
    return n


@app.task
def blocking_count_runs(key: str, seconds: float) -> int:
    """A plain `def` task (worker thread): INCR key, then block the thread for `seconds`."""
    client = redis.Redis.from_url(os.environ["AIOTASKS_REDIS_URL"])
    try:
        n = int(client.incr(key))
    finally:
        client.close()
    time.sleep(seconds)
    return n


@app.task
async def soak(i: int, seconds: float) -> int:
    """Soak drill unit: HINCRBY runs[i] when it starts, SADD done i when it finishes."""
    ctx = current_task()
    r = ctx.app.client.redis
    prefix = ctx.app.client.keys.prefix
    await r.hincrby(prefix + "soak:runs", str(i), 1)
    await asyncio.sleep(seconds)
    await r.sadd(prefix + "soak:done", i)
    return i


@app.task
async def pause(i: int, seconds: float) -> int:
    """Sleeps, then returns i: a drill unit that does not use Redis itself, for drills
    that take Redis away (a task's own Redis calls would fail while it is gone)."""
    await asyncio.sleep(seconds)
    return i
