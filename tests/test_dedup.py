"""Deduplication by task_id: a live id is not enqueued again; a finished one may be."""

from __future__ import annotations

import asyncio
from typing import Any

from aiotasks import App, TaskState


async def _counts(app: App) -> tuple[int, int]:
    """(entries on the default queue's streams, tasks in the delayed zset)."""
    redis, keys = app.client.redis, app.client.keys
    stream = sum([int(await redis.xlen(s)) for s in keys.streams("default")])
    return stream, int(await redis.zcard(keys.delayed))


async def test_queued_id_is_not_enqueued_again(app: App, worker: Any) -> None:
    runs: list[int] = []

    @app.task
    async def job(x: int) -> int:
        runs.append(x)
        return x

    h1 = await job.apply_async((1,), task_id="order-1")
    assert h1.id == "order-1"
    assert await _counts(app) == (1, 0)
    h2 = await job.apply_async((2,), task_id="order-1")
    h3 = await job.options(task_id="order-1", priority=9).send(3)
    assert h2 == h1 and h3 == h1
    assert await _counts(app) == (1, 0)

    await worker(concurrency=1)
    assert await h2.result(timeout=10) == 1  # the first send's arguments
    # Sent after: had a duplicate been enqueued, it would have run before this one.
    assert await (await job.send(99)).result(timeout=10) == 99
    assert runs == [1, 99]


async def test_scheduled_id_is_not_enqueued_again(app: App, worker: Any) -> None:
    runs: list[int] = []

    @app.task
    async def job(x: int) -> int:
        runs.append(x)
        return x

    h1 = await job.apply_async((1,), task_id="later-1", countdown=0.5)
    assert await h1.state() == TaskState.SCHEDULED
    assert await _counts(app) == (0, 1)
    h2 = await job.apply_async((2,), task_id="later-1")  # now, not later: still deduped
    h3 = await job.apply_async((3,), task_id="later-1", countdown=5)
    assert h2 == h1 and h3 == h1
    assert await _counts(app) == (0, 1)
    assert await h1.state() == TaskState.SCHEDULED

    await worker(concurrency=1)
    assert await h1.result(timeout=10) == 1
    assert await (await job.options(countdown=0.2).send(99)).result(timeout=10) == 99
    assert runs == [1, 99]


async def test_running_id_is_not_enqueued_again(app: App, worker: Any) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    @app.task
    async def job(x: int) -> int:
        runs.append(x)
        started.set()
        await release.wait()
        return x

    await worker(concurrency=4)
    h1 = await job.apply_async((1,), task_id="busy-1")
    async with asyncio.timeout(10):
        await started.wait()
    assert await h1.state() == TaskState.STARTED
    before = await _counts(app)
    h2 = await job.apply_async((2,), task_id="busy-1")
    assert h2 == h1
    assert await _counts(app) == before
    assert await h1.state() == TaskState.STARTED

    release.set()
    assert await h2.result(timeout=10) == 1
    assert await (await job.send(99)).result(timeout=10) == 99
    assert runs == [1, 99]


async def test_finished_id_can_be_sent_again(app: App, worker: Any) -> None:
    runs: list[int] = []

    @app.task
    async def job(x: int) -> int:
        runs.append(x)
        return x * 10

    await worker()
    h1 = await job.apply_async((1,), task_id="again-1")
    assert await h1.result(timeout=10) == 10
    h2 = await job.apply_async((2,), task_id="again-1")
    assert h2 == h1
    assert await h2.result(timeout=10) == 20
    assert runs == [1, 2]


async def test_failed_id_can_be_sent_again(app: App, worker: Any) -> None:
    runs: list[str] = []

    @app.task
    async def job(mode: str) -> str:
        runs.append(mode)
        if mode == "fail":
            raise ValueError("first try fails")
        return mode

    await worker()
    failed = await job.apply_async(("fail",), task_id="redo-1")
    assert await asyncio.wait_for(_final(failed), 10) == TaskState.FAILURE
    again = await job.apply_async(("ok",), task_id="redo-1")
    assert await again.result(timeout=10) == "ok"
    assert runs == ["fail", "ok"]


async def test_revoked_queued_id_sent_again_runs_once(app: App, worker: Any) -> None:
    runs: list[str] = []

    @app.task
    async def job(mode: str) -> str:
        runs.append(mode)
        return mode

    revoked = await job.apply_async(("revoked",), task_id="redo-2")
    await revoked.revoke()
    # Revoking a queued task deletes its entry; REVOKED is final, so the id may be sent
    # again, and only the new entry waits.
    assert await _counts(app) == (0, 0)
    again = await job.apply_async(("ok",), task_id="redo-2")
    assert await _counts(app) == (1, 0)
    await worker(concurrency=1)
    assert await again.result(timeout=10) == "ok"
    assert await (await job.send("marker")).result(timeout=10) == "marker"
    assert runs == ["ok", "marker"], "the revoked message ran, or the new one ran twice"


async def _final(handle: Any) -> TaskState:
    async for info in handle.updates():
        if info.state.is_final:
            return info.state  # type: ignore[no-any-return]
    raise AssertionError("updates() ended without a final state")
