"""Retries: autoretry_for with max_retries, Retry/ctx.retry countdowns, backoff, timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from aiotasks import (
    App,
    Retry,
    SoftTimeLimitExceeded,
    TaskState,
    TimeLimitExceeded,
    Worker,
    current_task,
)
from tests.helpers import failure_of

StartWorker = Callable[..., Awaitable[Worker]]


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


async def test_autoretry_succeeds_within_max_retries(app: App, worker: StartWorker) -> None:
    attempts: list[int] = []

    @app.task(max_retries=2, autoretry_for=(ConnectionError,))
    async def flaky() -> str:
        attempts.append(current_task().attempt)
        if len(attempts) < 3:
            raise ConnectionError(f"try {len(attempts)}")
        return "ok"

    await worker()
    h = await flaky.send()
    assert await h.result(timeout=10) == "ok"
    assert attempts == [1, 2, 3]
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.attempts == 3


async def test_autoretry_gives_up_after_max_retries_with_the_original_error(
    app: App, worker: StartWorker
) -> None:
    attempts: list[int] = []

    @app.task(max_retries=1, autoretry_for=(ConnectionError,))
    async def flaky() -> str:
        attempts.append(current_task().attempt)
        if len(attempts) < 3:
            raise ConnectionError(f"try {len(attempts)}")
        return "ok"

    await worker()
    h = await flaky.send()
    err = await failure_of(h)
    assert err.exc_type == "ConnectionError"
    assert err.exc_message == "try 2"
    assert attempts == [1, 2]
    info = await h.info()
    assert info.state == TaskState.FAILURE
    assert info.attempts == 2


async def test_exceptions_not_listed_in_autoretry_for_are_not_retried(
    app: App, worker: StartWorker
) -> None:
    attempts: list[int] = []

    @app.task(max_retries=3, autoretry_for=(ConnectionError,))
    async def wrong() -> None:
        attempts.append(current_task().attempt)
        raise ValueError("not retryable")

    await worker()
    err = await failure_of(await wrong.send())
    assert err.exc_type == "ValueError"
    assert attempts == [1]


async def test_per_send_max_retries_overrides_the_tasks(app: App, worker: StartWorker) -> None:
    attempts: list[int] = []

    @app.task(max_retries=0, autoretry_for=(ConnectionError,))
    async def flaky() -> int:
        ctx = current_task()
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("again")
        return ctx.max_retries

    await worker()
    assert await (await flaky.options(max_retries=2).send()).result(timeout=10) == 2
    assert attempts == [1, 2, 3]


@pytest.mark.parametrize("spelling", ["Retry", "ctx.retry"])
async def test_retry_with_countdown_reruns_after_the_countdown(
    app: App, worker: StartWorker, spelling: str
) -> None:
    stamps: list[float] = []

    @app.task(max_retries=3)
    async def again() -> int:
        stamps.append(time.monotonic())
        ctx = current_task()
        if ctx.attempt == 1:
            if spelling == "Retry":
                raise Retry(countdown=0.4)
            raise ctx.retry(countdown=0.2)
        return ctx.attempt

    await worker()
    h = await again.send()
    assert await h.result(timeout=10) == 2
    assert len(stamps) == 2
    (gap,) = gaps(stamps)
    assert 0.2 <= gap < 1.0, gap
    assert (await h.info()).attempts == 2


async def test_retry_limit_reached_records_the_cause(app: App, worker: StartWorker) -> None:
    attempts: list[int] = []

    @app.task(max_retries=2)
    async def hopeless() -> None:
        attempts.append(current_task().attempt)
        raise Retry(countdown=0.01, exc=LookupError("still missing"))

    await worker()
    err = await failure_of(await hopeless.send())
    assert attempts == [1, 2, 3]
    assert err.exc_type == "LookupError"
    assert err.exc_message == "still missing"


async def test_retry_backoff_doubles_the_delay(app: App, worker: StartWorker) -> None:
    stamps: list[float] = []

    # A float retry_backoff is the base delay (True means 1 s): 0.1 s, then 0.2 s, 0.4 s.
    @app.task(
        max_retries=3, autoretry_for=(ConnectionError,), retry_backoff=0.1, retry_jitter=False
    )
    async def flaky() -> int:
        stamps.append(time.monotonic())
        if len(stamps) < 4:
            raise ConnectionError("down")
        return len(stamps)

    await worker()
    assert await (await flaky.send()).result(timeout=10) == 4
    g = gaps(stamps)
    for got, want in zip(g, [0.1, 0.2, 0.4], strict=True):
        assert want <= got < want + 0.25, g
    assert g[0] < g[1] < g[2], g


async def test_state_is_scheduled_while_a_retry_waits(app: App, worker: StartWorker) -> None:
    attempts: list[int] = []

    @app.task(max_retries=1)
    async def later() -> str:
        attempts.append(current_task().attempt)
        if len(attempts) == 1:
            raise Retry(countdown=1.5)
        return "second"

    await worker()
    h = await later.send()
    keys = app.client.keys
    r = app.client.redis
    deadline = time.monotonic() + 1.2
    while await h.state() != TaskState.SCHEDULED:
        assert time.monotonic() < deadline, f"state {await h.state()} never SCHEDULED"
        await asyncio.sleep(0.02)
    assert attempts == [1]
    # Waiting in Redis (the delayed zset), not in worker memory or on a stream.
    assert await r.zscore(keys.delayed, h.id) is not None
    assert all([await r.xlen(s) == 0 for s in keys.streams("default")])
    assert await h.result(timeout=5) == "second"
    assert attempts == [1, 2]
    assert await r.zscore(keys.delayed, h.id) is None


async def test_updates_yield_each_retry_wait_and_each_run(app: App, worker: StartWorker) -> None:
    """A retry with a countdown leaves STARTED for SCHEDULED (one due now, for PENDING):
    updates() yields each wait, not only the runs."""

    @app.task(max_retries=3)
    async def flaky() -> str:
        ctx = current_task()
        # Each run outlasts a read: updates() re-reads on each notice, so a run shorter
        # than a read may merge into the state after it (CI met that with a 0 ms run).
        await asyncio.sleep(0.3)
        if ctx.attempt < 3:
            raise Retry(countdown=0.4)
        return "ok"

    await worker()
    h = await flaky.send()
    states: list[tuple[str, int | None]] = []

    async def follow() -> None:
        async for info in h.updates():
            states.append((info.state.value, info.attempts))

    await asyncio.wait_for(follow(), timeout=10)
    started = [s for s in states if s[0] == "STARTED"]
    assert [a for _, a in started] == [1, 2, 3], states
    # Each countdown's wait is seen between the runs.
    runs = [states.index(("STARTED", n)) for n in (1, 2, 3)]
    assert [s for s, _ in states[runs[0] : runs[1]]] == ["STARTED", "SCHEDULED"], states
    assert [s for s, _ in states[runs[1] : runs[2]]] == ["STARTED", "SCHEDULED"], states
    assert states[-1] == ("SUCCESS", 3), states


async def test_hard_timeout_is_retried_when_listed_in_autoretry_for(
    app: App, worker: StartWorker
) -> None:
    attempts: list[int] = []

    @app.task(hard_timeout=0.3, max_retries=1, autoretry_for=(TimeLimitExceeded,))
    async def slow_once() -> str:
        attempts.append(current_task().attempt)
        if len(attempts) == 1:
            await asyncio.sleep(10)
        return "second try"

    await worker()
    h = await slow_once.send()
    assert await h.result(timeout=10) == "second try"
    assert attempts == [1, 2]


async def test_hard_timeout_retries_run_out_as_time_limit_exceeded(
    app: App, worker: StartWorker
) -> None:
    attempts: list[int] = []

    @app.task(hard_timeout=0.2, max_retries=1, autoretry_for=(TimeoutError,))
    async def always_slow() -> None:
        attempts.append(current_task().attempt)
        await asyncio.sleep(10)

    await worker()
    err = await failure_of(await always_slow.send())
    # TimeLimitExceeded is a TimeoutError, so autoretry_for=(TimeoutError,) matches it too.
    assert attempts == [1, 2]
    assert err.exc_type == "TimeLimitExceeded"


async def test_soft_timeout_is_retried_when_listed_in_autoretry_for(
    app: App, worker: StartWorker
) -> None:
    attempts: list[int] = []

    @app.task(soft_timeout=0.2, max_retries=2, autoretry_for=(SoftTimeLimitExceeded,))
    async def slow_twice() -> str:
        attempts.append(current_task().attempt)
        if len(attempts) < 3:
            await asyncio.sleep(10)
        return "third try"

    await worker()
    assert await (await slow_twice.send()).result(timeout=10) == "third try"
    assert attempts == [1, 2, 3]


async def test_max_retries_defaults_to_three_as_in_celery(app: App, worker: StartWorker) -> None:
    attempts: list[int] = []

    @app.task
    async def stubborn() -> None:
        attempts.append(current_task().attempt)
        raise Retry(countdown=0.01)

    await worker()
    err = await failure_of(await stubborn.send())
    assert attempts == [1, 2, 3, 4]
    assert err.exc_type == "MaxRetriesExceededError"
