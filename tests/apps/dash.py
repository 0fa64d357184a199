"""Tasks for the dashboard's tests, run by a worker subprocess (`spawn_worker`)."""

from __future__ import annotations

import asyncio
import os

from aiotasks import App, current_task

app = App(namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"))


@app.task(name="dash.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="dash.boom")
async def boom(reason: str) -> None:
    raise ValueError(f"boom: {reason}")


@app.task(name="dash.slow")
async def slow(seconds: float) -> float:
    ctx = current_task()
    for i in range(int(seconds * 10)):
        if i % 10 == 0:
            await ctx.progress(done=i // 10, total=int(seconds))
        await asyncio.sleep(0.1)
    return seconds


@app.task(name="dash.picky")
async def picky(key: str) -> str:
    """Fails until the key exists (the test sets it before retrying)."""
    if not await current_task().app.client.redis.exists(key):
        raise PermissionError(f"not allowed yet: {key}")
    return "allowed"
