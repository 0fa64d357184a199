"""Tasks for the least-privilege tests: every code path a worker takes (results, chords,
retries, progress, rate limits, a periodic schedule), run as a restricted ACL user."""

from __future__ import annotations

import asyncio
import os

from aiotasks import App, current_task

app = App(
    namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"),
    visibility_timeout=float(os.environ.get("AIOTASKS_TEST_VT", "2")),
)


@app.task(name="acl.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="acl.tsum")
async def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="acl.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task(name="acl.steps", max_retries=1, rate_limit="100/s")
async def steps(n: int) -> int:
    ctx = current_task()
    await ctx.progress(done=1, total=n)
    if ctx.attempt == 1:
        raise ctx.retry(countdown=0.2)
    return n


@app.periodic(every=0.5)
@app.task(name="acl.tick")
async def tick() -> None:
    return None
