"""Progress: a task reports it with ctx.progress(); callers read info() and updates()."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from aiotasks import App, TaskInfo, TaskState, current_task


async def test_progress_shows_in_info(app: App, worker: Any) -> None:
    reported, release = asyncio.Event(), asyncio.Event()

    @app.task
    async def job() -> str:
        await current_task().progress(done=3, total=10)
        reported.set()
        await release.wait()
        return "ok"

    await worker()
    h = await job.send()
    async with asyncio.timeout(10):
        await reported.wait()
    info = await h.info()
    assert info.state == TaskState.STARTED
    assert info.progress == {"done": 3, "total": 10}
    release.set()
    assert await h.result(timeout=10) == "ok"
    # The last progress stays readable with the result.
    assert (await h.info()).progress == {"done": 3, "total": 10}


async def test_updates_yield_each_change_in_order(app: App, worker: Any) -> None:
    seen: list[TaskInfo] = []
    saw = {key: asyncio.Event() for key in ("STARTED", 1, 2, 3)}

    @app.task
    async def job(total: int) -> str:
        ctx = current_task()
        # Each step waits until the watcher has seen the previous one, so no change is
        # coalesced with the next and the sequence below is exact.
        await asyncio.wait_for(saw["STARTED"].wait(), 5)
        for done in range(1, total + 1):
            await ctx.progress(done=done, total=total)
            await asyncio.wait_for(saw[done].wait(), 5)
        return "finished"

    h = await job.send(3)

    async def watch() -> None:
        async with asyncio.timeout(15):
            async for info in h.updates():
                seen.append(info)
                if info.state == TaskState.STARTED and info.progress is None:
                    saw["STARTED"].set()
                elif info.progress is not None and info.state == TaskState.STARTED:
                    saw[info.progress["done"]].set()

    watcher = asyncio.create_task(watch())
    async with asyncio.timeout(5):
        while not seen:  # subscribed and read the first state before any worker exists
            await asyncio.sleep(0.01)
    await worker()
    await watcher  # ends by itself after the final state
    steps = [(i.state, (i.progress or {}).get("done")) for i in seen]
    assert steps == [
        (TaskState.PENDING, None),
        (TaskState.STARTED, None),
        (TaskState.STARTED, 1),
        (TaskState.STARTED, 2),
        (TaskState.STARTED, 3),
        (TaskState.SUCCESS, 3),
    ]
    assert seen[-1].result == "finished"
    assert seen[2].progress == {"done": 1, "total": 3}


async def test_updates_of_finished_task_yield_once(app: App, worker: Any) -> None:
    @app.task
    async def job() -> int:
        await current_task().progress(step="only")
        return 5

    await worker()
    h = await job.send()
    assert await h.result(timeout=10) == 5
    async with asyncio.timeout(5):
        infos = [info async for info in h.updates()]
    assert [(i.state, i.result, i.progress) for i in infos] == [
        (TaskState.SUCCESS, 5, {"step": "only"})
    ]


async def test_updates_end_on_failure(app: App, worker: Any) -> None:
    @app.task
    async def job() -> None:
        await current_task().progress(done=1)
        raise ValueError("broken")

    await worker()
    h = await job.send()
    async with asyncio.timeout(10):
        states = [info.state async for info in h.updates()]
    assert states[-1] == TaskState.FAILURE
    assert states.count(TaskState.FAILURE) == 1


async def test_progress_while_redis_is_unreachable_warns_and_the_task_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Progress is informational: a lost connection is retried as a send's is, then the
    update is dropped with a warning (a dashboard trial saw a task end FAILURE with
    ConnectionError for a progress() during an outage)."""
    from aiotasks.context import TaskContext

    offline = App(redis_url="redis://127.0.0.1:1/0", namespace="t-progress")
    ctx = TaskContext("p-1", "job", 1, 0, "default", offline, offline.client)
    try:
        async with asyncio.timeout(20):
            await ctx.progress(done=1)  # returns: no exception reaches the task
    finally:
        await offline.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("task job[p-1]: progress not stored" in m for m in lines), lines
