"""Soft and hard timeouts: raised where the task awaits, recorded as ours, slots freed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from aiotasks import (
    App,
    SoftTimeLimitExceeded,
    TaskInfo,
    TaskState,
    Worker,
)
from tests.helpers import failure_of

StartWorker = Callable[..., Awaitable[Worker]]


def run_time(info: TaskInfo) -> float:
    """Seconds between started_at and finished_at, as the worker recorded them."""
    assert info.started_at is not None and info.finished_at is not None
    return (info.finished_at - info.started_at).total_seconds()


# -- soft timeout ------------------------------------------------------------------------


async def test_soft_timeout_is_raised_at_the_await_and_may_be_caught(
    app: App, worker: StartWorker
) -> None:
    seen: list[str] = []

    @app.task(soft_timeout=0.2)
    async def careful() -> str:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            seen.append("soft")
            await asyncio.sleep(0.05)  # cleanup may still await
            return "cleaned up"
        return "slept"

    await worker()
    h = await careful.send()
    assert await h.result(timeout=5) == "cleaned up"
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert seen == ["soft"]
    assert 0.2 <= run_time(info) < 1.5


async def test_uncaught_soft_timeout_fails_the_task(app: App, worker: StartWorker) -> None:
    @app.task(soft_timeout=0.2)
    async def careless() -> str:
        await asyncio.sleep(5)
        return "slept"

    await worker()
    h = await careless.send()
    err = await failure_of(h)
    assert err.exc_type == "SoftTimeLimitExceeded"
    info = await h.info()
    assert info.state == TaskState.FAILURE
    assert info.exc_type == "SoftTimeLimitExceeded"
    assert 0.2 <= run_time(info) < 1.5


async def test_soft_timeout_before_hard_timeout_leaves_time_to_clean_up(
    app: App, worker: StartWorker
) -> None:
    @app.task(soft_timeout=0.2, hard_timeout=2)
    async def cleanup() -> str:
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.3)  # past the soft limit, well inside the hard one
            return "done"
        return "slept"

    await worker()
    h = await cleanup.send()
    assert await h.result(timeout=5) == "done"


# -- hard timeout ------------------------------------------------------------------------


async def test_hard_timeout_fails_with_time_limit_exceeded_on_time(
    app: App, worker: StartWorker
) -> None:
    @app.task(hard_timeout=0.5)
    async def slow() -> str:
        await asyncio.sleep(10)
        return "slept"

    await worker()
    t0 = time.monotonic()
    h = await slow.send()
    err = await failure_of(h)
    waited = time.monotonic() - t0
    assert err.exc_type == "TimeLimitExceeded"
    assert err.exc_type != "CancelledError"
    info = await h.info()
    assert info.state == TaskState.FAILURE
    assert info.attempts == 1
    assert 0.45 <= run_time(info) < 1.0
    assert waited < 2.0


async def test_hard_timeout_frees_the_slot_of_a_task_that_swallows_cancellation(
    app: App, worker: StartWorker
) -> None:
    release = asyncio.Event()  # lets the stubborn coroutine end when the test is over
    swallowed: list[float] = []

    @app.task(hard_timeout=0.5)
    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                swallowed.append(time.monotonic())

    @app.task
    async def quick(x: int) -> int:
        return x * 2

    try:
        await worker(concurrency=1)
        h = await stubborn.send()
        err = await failure_of(h, timeout=5)
        assert err.exc_type == "TimeLimitExceeded"
        assert swallowed, "the hard timeout never cancelled the coroutine"
        # The only slot is free again although the coroutine is still looping.
        t0 = time.monotonic()
        assert await (await quick.send(21)).result(timeout=5) == 42
        assert time.monotonic() - t0 < 3.0
        assert not release.is_set()
    finally:
        release.set()
        await asyncio.sleep(1.1)  # the abandoned coroutine notices and returns


async def test_hard_timeout_of_a_thread_task_frees_the_slot(app: App, worker: StartWorker) -> None:
    """A plain `def` task cannot be interrupted: it fails at its hard_timeout and its slot
    is given back, while the thread itself runs on to its end (documented behaviour)."""
    thread_done = threading.Event()

    @app.task(hard_timeout=0.3)
    def blocking(seconds: float) -> float:
        time.sleep(seconds)
        thread_done.set()
        return seconds

    @app.task
    def quick_sync(x: int) -> int:
        return x + 1

    @app.task
    async def quick_async(x: int) -> int:
        return x + 2

    await worker(concurrency=1)
    t0 = time.monotonic()
    h = await blocking.send(2.0)
    err = await failure_of(h, timeout=5)
    assert err.exc_type == "TimeLimitExceeded"
    assert time.monotonic() - t0 < 1.5
    assert not thread_done.is_set()  # the thread still runs: it was abandoned, not killed
    assert await (await quick_async.send(1)).result(timeout=3) == 3
    assert await (await quick_sync.send(1)).result(timeout=3) == 2
    assert not thread_done.is_set(), "the second tasks waited for the abandoned thread"
    assert (await h.info()).state == TaskState.FAILURE
    # Let the abandoned thread end before the loop closes.
    assert await asyncio.to_thread(thread_done.wait, 5)


# -- per-send overrides ------------------------------------------------------------------


async def test_per_send_soft_timeout_overrides_the_tasks(app: App, worker: StartWorker) -> None:
    @app.task(soft_timeout=30)
    async def nap(seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "soft"
        return "slept"

    await worker()
    short = await nap.options(soft_timeout=0.2).send(5)
    assert await short.result(timeout=5) == "soft"
    default = await nap.send(0.3)
    assert await default.result(timeout=5) == "slept"


async def test_per_send_hard_timeout_overrides_the_tasks(app: App, worker: StartWorker) -> None:
    @app.task(hard_timeout=0.2)
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    await worker()
    longer = await nap.options(hard_timeout=5).send(0.6)
    assert await longer.result(timeout=5) == "slept"
    default = await nap.send(0.6)
    assert (await failure_of(default)).exc_type == "TimeLimitExceeded"
    tighter = await nap.apply_async((5,), hard_timeout=0.3)
    err = await failure_of(tighter)
    assert err.exc_type == "TimeLimitExceeded"
    assert run_time(await tighter.info()) < 1.0


async def test_per_send_timeouts_apply_to_a_task_without_any(app: App, worker: StartWorker) -> None:
    @app.task
    async def nap(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slept"

    await worker()
    soft = await nap.options(soft_timeout=0.2).send(5)
    hard = await nap.options(hard_timeout=0.2).send(5)
    assert (await failure_of(soft)).exc_type == "SoftTimeLimitExceeded"
    assert (await failure_of(hard)).exc_type == "TimeLimitExceeded"


# -- the user's own timeouts ---------------------------------------------------------------


async def test_users_own_timeout_error_is_not_mistaken_for_ours(
    app: App, worker: StartWorker
) -> None:
    @app.task(hard_timeout=5)
    async def raises() -> None:
        raise TimeoutError("upstream API timed out")

    @app.task(soft_timeout=5, hard_timeout=10)
    async def asyncio_timeout() -> None:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(2)

    await worker()
    err = await failure_of(await raises.send())
    assert err.exc_type == "TimeoutError"
    assert err.exc_message == "upstream API timed out"
    # asyncio.timeout() works by cancelling: the task's own timeout must still read as
    # TimeoutError, not as our hard or soft limit.
    err = await failure_of(await asyncio_timeout.send())
    assert err.exc_type == "TimeoutError"


async def test_task_may_cancel_its_own_subtasks(app: App, worker: StartWorker) -> None:
    """A CancelledError the task handles itself (cancelling a child) is none of ours."""

    @app.task(hard_timeout=5)
    async def parent() -> str:
        child = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0.05)
        child.cancel()
        try:
            await child
        except asyncio.CancelledError:
            return "child cancelled"
        return "child finished"

    await worker()
    assert await (await parent.send()).result(timeout=5) == "child cancelled"
