"""Task hooks: on_task_start / success / failure / retry / revoked, sync and async."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from aiotasks import App, Retry, TaskContext, TaskFailed, TimeLimitExceeded, current_task


async def test_sync_and_async_hooks_get_the_right_arguments(app: App, worker: Any) -> None:
    calls: list[tuple[Any, ...]] = []

    @app.on_task_start
    def start_sync(ctx: TaskContext) -> None:
        calls.append(("start-sync", ctx.id, ctx.name, ctx.queue, ctx.attempt))

    @app.on_task_start
    async def start_async(ctx: TaskContext) -> None:
        await asyncio.sleep(0)
        assert current_task() is ctx  # start hooks run inside the task's context
        calls.append(("start-async", ctx.id))

    @app.on_task_success
    async def success_async(ctx: TaskContext, result: Any) -> None:
        calls.append(("success-async", ctx.id, result, time.perf_counter() - ctx.started))

    @app.on_task_success
    def success_sync(ctx: TaskContext, result: Any) -> None:
        calls.append(("success-sync", ctx.id, result))

    @app.on_task_failure
    def failure_sync(ctx: TaskContext, exc: BaseException) -> None:
        calls.append(("failure-sync", ctx.id, type(exc), str(exc)))

    @app.on_task_failure
    async def failure_async(ctx: TaskContext, exc: BaseException) -> None:
        calls.append(("failure-async", ctx.id, exc))

    @app.task(name="hooked.add", queue="hq")
    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0.05)
        return x + y

    @app.task(name="hooked.boom")
    def boom() -> None:  # a thread task: hooks still run on the loop
        raise ValueError("kaput")

    await worker(queues=["hq", "default"])
    h = await add.send(2, 3)
    assert await h.result(timeout=10) == 5
    f = await boom.send()
    with pytest.raises(TaskFailed):
        await f.result(timeout=10)

    async with asyncio.timeout(5):
        while len(calls) < 8:  # hooks run right after the outcome is queued
            await asyncio.sleep(0.01)
    ok = [c for c in calls if c[1] == h.id]
    assert ok[0] == ("start-sync", h.id, "hooked.add", "hq", 1)
    assert ok[1] == ("start-async", h.id)
    assert ok[2][:3] == ("success-async", h.id, 5)
    assert 0.05 <= ok[2][3] < 5  # ctx.started is when the run began
    assert ok[3] == ("success-sync", h.id, 5)
    bad = [c for c in calls if c[1] == f.id]
    assert [c[0] for c in bad] == ["start-sync", "start-async", "failure-sync", "failure-async"]
    assert bad[2][2:] == (ValueError, "kaput")
    assert isinstance(bad[3][2], ValueError)
    assert len(calls) == 8


async def test_failure_hooks_run_once_after_the_last_retry(app: App, worker: Any) -> None:
    starts: list[int] = []
    failures: list[BaseException] = []
    app.on_task_start(lambda ctx: starts.append(ctx.attempt))
    app.on_task_failure(lambda ctx, exc: failures.append(exc))

    @app.task(name="flaky", max_retries=2)
    async def flaky() -> None:
        raise Retry(countdown=0.01)

    @app.task(name="slow", hard_timeout=0.2)
    async def slow() -> None:
        await asyncio.sleep(10)

    await worker()
    with pytest.raises(TaskFailed):
        await (await flaky.send()).result(timeout=10)
    async with asyncio.timeout(5):
        while not failures:
            await asyncio.sleep(0.01)
    assert starts == [1, 2, 3]
    assert len(failures) == 1

    with pytest.raises(TaskFailed) as err:
        await (await slow.send()).result(timeout=10)
    assert err.value.exc_type == "TimeLimitExceeded"
    async with asyncio.timeout(5):
        while len(failures) < 2:
            await asyncio.sleep(0.01)
    assert isinstance(failures[1], TimeLimitExceeded)


async def test_retry_hooks_run_for_each_retried_run(app: App, worker: Any) -> None:
    retries: list[tuple[int, str]] = []
    failures: list[int] = []
    app.on_task_retry(lambda ctx, exc: retries.append((ctx.attempt, type(exc).__name__)))
    app.on_task_failure(lambda ctx, exc: failures.append(ctx.attempt))

    @app.task(name="auto", max_retries=2, autoretry_for=(ValueError,))
    async def auto() -> None:
        if current_task().attempt == 1:
            raise ValueError("first run fails")
        raise Retry(countdown=0.01)

    await worker()
    with pytest.raises(TaskFailed):
        await (await auto.send()).result(timeout=10)
    async with asyncio.timeout(5):
        while not failures:
            await asyncio.sleep(0.01)
    assert retries == [(1, "ValueError"), (2, "Retry")]
    assert failures == [3]


async def test_revoked_hook_runs_when_a_running_task_is_terminated(app: App, worker: Any) -> None:
    revoked: list[str] = []
    started = asyncio.Event()

    @app.on_task_revoked
    async def on_revoked(ctx: TaskContext) -> None:
        revoked.append(ctx.id)

    @app.task(name="sleeper")
    async def sleeper() -> None:
        started.set()
        await asyncio.sleep(30)

    await worker()
    h = await sleeper.send()
    async with asyncio.timeout(10):
        await started.wait()
    await h.revoke(terminate=True)
    async with asyncio.timeout(10):
        while not revoked:
            await asyncio.sleep(0.01)
    assert revoked == [h.id]


async def test_unknown_tasks_call_no_hooks(app: App, worker: Any) -> None:
    seen: list[str] = []
    app.on_task_start(lambda ctx: seen.append("start"))
    app.on_task_failure(lambda ctx, exc: seen.append("failure"))
    await worker()
    with pytest.raises(TaskFailed):
        await (await app.send_task("nobody.registered.this")).result(timeout=10)
    await asyncio.sleep(0.1)
    assert seen == []


async def test_a_raising_hook_does_not_fail_the_task(
    app: App, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    after: list[str] = []

    def bad_start(ctx: TaskContext) -> None:
        raise RuntimeError("start hook broke")

    async def bad_success(ctx: TaskContext, result: Any) -> None:
        raise RuntimeError("success hook broke")

    def bad_failure(ctx: TaskContext, exc: BaseException) -> None:
        raise RuntimeError("failure hook broke")

    app.on_task_start(bad_start)
    app.on_task_success(bad_success)
    app.on_task_success(lambda ctx, result: after.append(f"success {result}"))
    app.on_task_failure(bad_failure)
    app.on_task_failure(lambda ctx, exc: after.append(f"failure {exc}"))

    @app.task(name="fine")
    async def fine() -> str:
        return "ok"

    @app.task(name="broken")
    async def broken() -> None:
        raise KeyError("gone")

    await worker()
    with caplog.at_level(logging.ERROR, logger="aiotasks"):
        h = await fine.send()
        assert await h.result(timeout=10) == "ok"
        assert (await h.info()).state == "SUCCESS"
        with pytest.raises(TaskFailed) as err:
            await (await broken.send()).result(timeout=10)
        assert err.value.exc_type == "KeyError"  # the task's error, not the hook's
        async with asyncio.timeout(5):
            while len(after) < 2:
                await asyncio.sleep(0.01)
    assert after == ["success ok", "failure 'gone'"]  # later hooks still ran
    logged = caplog.text
    for message in ("start hook broke", "success hook broke", "failure hook broke"):
        assert message in logged
