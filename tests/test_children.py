"""Dynamic children: a task that sends tasks and awaits them never deadlocks its worker.

A task waiting on a child's result hands its concurrency slot back until it is woken,
so a worker whose every slot holds a waiting parent still runs the children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import (
    App,
    ChordError,
    ResultTimeout,
    SoftTimeLimitExceeded,
    TaskFailed,
    Worker,
    chord,
    current_task,
    group,
)

StartWorker = Callable[..., Awaitable[Worker]]


async def test_child_send_and_result_inside_a_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def child(x: int) -> int:
        return x * 2

    @app.task
    async def parent(x: int) -> list[int | str]:
        h = await child.send(x)
        v = await h.result(timeout=10)
        return [v, current_task().name]

    await worker(concurrency=4)
    assert await (await parent.send(21)).result(timeout=15) == [42, parent.name]


async def test_group_send_and_results_inside_a_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def child(x: int) -> int:
        await asyncio.sleep(0.01 * (5 - x))  # finish out of order
        return x * x

    @app.task
    async def parent(n: int) -> list[int]:
        g = await group([child.s(i) for i in range(n)]).send()
        return await g.results(timeout=10)

    await worker(concurrency=4)
    assert await (await parent.send(5)).result(timeout=15) == [0, 1, 4, 9, 16]


async def test_child_failure_reaches_the_parent(app: App, worker: StartWorker) -> None:
    @app.task
    async def child() -> None:
        raise KeyError("missing")

    @app.task
    async def parent() -> str:
        try:
            await (await child.send()).result(timeout=10)
        except TaskFailed as exc:
            return exc.exc_type
        return "no error"

    await worker(concurrency=1)
    assert await (await parent.send()).result(timeout=15) == "KeyError"


async def test_chord_awaited_inside_a_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task
    async def boom() -> None:
        raise ValueError("boom")

    @app.task
    async def parent(fail: bool) -> int | str:
        header = [add.s(i, i) for i in range(4)] + ([boom.s()] if fail else [])
        h = await chord(header, tsum.s()).send()
        try:
            return await h.result(timeout=10)
        except ChordError as exc:
            return f"chord failed: {exc.exc_type}"

    await worker(concurrency=1)
    assert await (await parent.send(False)).result(timeout=15) == 12
    assert await (await parent.send(True)).result(timeout=15) == "chord failed: ChordError"


async def test_many_waiting_parents_on_two_slots_finish(app: App, worker: StartWorker) -> None:
    """Four parents, five children each, two slots: all of it finishes, well within 10 s."""

    @app.task
    async def child(p: int, i: int) -> int:
        await asyncio.sleep(0.02)
        return p * 10 + i

    @app.task
    async def parent(p: int) -> list[int]:
        handles = [await child.send(p, i) for i in range(5)]
        return [await h.result(timeout=20) for h in handles]

    await worker(concurrency=2)
    t0 = time.monotonic()
    parents = [await parent.send(p) for p in range(4)]
    results = [await h.result(timeout=10) for h in parents]
    elapsed = time.monotonic() - t0
    assert results == [[p * 10 + i for i in range(5)] for p in range(4)]
    assert elapsed < 10
    # Every slot was handed back: both run new work at once.
    more = [await child.send(9, i) for i in range(2)]
    assert [await h.result(timeout=2) for h in more] == [90, 91]


async def test_single_slot_held_by_a_waiting_parent_still_runs_the_child(
    app: App, worker: StartWorker
) -> None:
    @app.task
    async def child() -> str:
        return "child ran"

    @app.task
    async def parent() -> str:
        return await (await child.send()).result(timeout=10)

    await worker(concurrency=1)
    assert await (await parent.send()).result(timeout=10) == "child ran"


async def test_waiting_chain_of_generations_on_one_slot(app: App, worker: StartWorker) -> None:
    """Parent awaits child awaits grandchild ... on a worker with one slot."""

    @app.task
    async def generation(depth: int) -> int:
        if depth == 0:
            return 0
        return 1 + await (await generation.send(depth - 1)).result(timeout=15)

    await worker(concurrency=1)
    assert await (await generation.send(5)).result(timeout=20) == 5


async def test_waiting_parent_does_not_exceed_concurrency(app: App, worker: StartWorker) -> None:
    """Handing a slot back never lets more than `concurrency` tasks run code at once."""
    running = 0
    peak = 0

    @app.task
    async def child() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    @app.task
    async def parent() -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1  # not running code while waiting
        await (await group([child.s() for _ in range(4)]).send()).results(timeout=20)
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return 1

    await worker(concurrency=2)
    hs = [await parent.send() for _ in range(3)]
    assert [await h.result(timeout=20) for h in hs] == [1, 1, 1]
    assert 1 <= peak <= 2


def slow_child(app: App) -> Any:
    """A child that holds a slot for 3 s."""

    @app.task(name="slow_child")
    async def child() -> str:
        await asyncio.sleep(3)
        return "late"

    return child


async def test_a_waiting_parents_hard_timeout_ends_it_on_time(
    app: App, worker: StartWorker
) -> None:
    """Cancelled while its child holds the only slot, it does not wait in line for the
    slot just to end: it ends at its hard timeout, as a timeout, not as an abandoned task."""

    child = slow_child(app)

    @app.task(hard_timeout=0.5)
    async def parent() -> str:
        return await (await child.send()).result(timeout=10)

    await worker(concurrency=1)
    started = time.monotonic()
    with pytest.raises(TaskFailed) as ei:
        await (await parent.send()).result(timeout=10)
    assert time.monotonic() - started < 2.5
    assert ei.value.exc_type == "TimeLimitExceeded"
    assert "abandoned" not in ei.value.exc_message


async def test_a_waiting_parents_soft_timeout_reaches_it_on_time(
    app: App, worker: StartWorker
) -> None:
    child = slow_child(app)

    @app.task(soft_timeout=0.5)
    async def parent() -> str:
        try:
            return await (await child.send()).result(timeout=10)
        except SoftTimeLimitExceeded:
            return "wrapped up"

    await worker(concurrency=1)
    started = time.monotonic()
    assert await (await parent.send()).result(timeout=10) == "wrapped up"
    assert time.monotonic() - started < 2.5


async def test_a_parent_whose_wait_times_out_takes_its_slot_back_before_going_on(
    app: App, worker: StartWorker
) -> None:
    running = peak = 0

    async def work(seconds: float) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(seconds)
        finally:
            running -= 1

    @app.task
    async def child() -> int:
        await work(1.0)
        return 1

    @app.task
    async def parent() -> str:
        try:
            await (await child.send()).result(timeout=0.2)
        except ResultTimeout:
            pass
        await work(0.5)  # goes on working: with its slot, after the child's
        return "done"

    await worker(concurrency=1)
    assert await (await parent.send()).result(timeout=10) == "done"
    assert peak == 1  # never two at once on a worker of one slot


async def test_a_task_called_inline_inside_a_task_waits_with_the_callers_slot(
    app: App, worker: StartWorker
) -> None:
    @app.task
    async def child() -> int:
        return 1

    @app.task
    async def helper() -> int:
        await current_task().progress(step="helper")  # the running task's progress
        return await (await child.send()).result(timeout=5)

    @app.task
    async def parent() -> int:
        return await helper()

    await worker(concurrency=1)
    h = await parent.send()
    assert await h.result(timeout=10) == 1
    assert (await h.info()).progress == {"step": "helper"}
