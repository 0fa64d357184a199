"""Flow-control tasks for tests/test_flow.py, run by real worker processes.

The App of tests/apps/basic.py (namespace from AIOTASKS_TEST_NAMESPACE, visibility
timeout 1 s). Every run records itself in Redis under `{ns}:test:...`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from aiotasks import current_task
from tests.apps.basic import app

__all__ = ["app", "hog", "limited", "once_stuck", "reindex", "tick"]


def _key(name: str) -> str:
    return f"{current_task().app.client.keys.prefix}test:{name}"


@app.task(concurrency_limit=2, concurrency_key="customer")
async def limited(customer: int, i: int, seconds: float = 0.3) -> int:
    """Records `customer start end` of its run: at most 2 run at once per customer."""
    r = current_task().app.client.redis
    start = time.time()
    await asyncio.sleep(seconds)
    await r.rpush(_key("spans"), f"{customer} {start} {time.time()} {os.getpid()}")
    return i


@app.task(concurrency_limit=1, concurrency_key="customer")
async def hog(customer: int, i: int) -> int:
    """The first run (of any `hog`) SIGKILLs its worker while holding its slot."""
    r = current_task().app.client.redis
    if await r.set(_key("hog-killed"), 1, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    await r.rpush(_key("hog-runs"), f"{customer} {i} {time.time()}")
    return i


@app.task(concurrency_limit=1, concurrency_key="customer")
async def once_stuck(customer: int, tag: str, seconds: float) -> int:
    """Records `tag:attempt` of each run; a first attempt of tag "stuck" never ends (its
    worker is killed), any other run sleeps `seconds`. Returns the attempt."""
    ctx = current_task()
    await ctx.app.client.redis.rpush(_key("stuck-runs"), f"{tag}:{ctx.attempt}")
    await asyncio.sleep(3600 if tag == "stuck" and ctx.attempt == 1 else seconds)
    return ctx.attempt


@app.task
async def tick(tag: str) -> None:
    """A scheduled task: counts its runs under `tag`."""
    await current_task().app.client.redis.rpush(_key(f"ticks:{tag}"), time.time())


@app.task(debounce=1.0, debounce_key="doc_id")
async def reindex(doc_id: int, version: int) -> int:
    """Debounced per document: records the version it ran with."""
    await current_task().app.client.redis.rpush(_key(f"reindex:{doc_id}"), version)
    return version
