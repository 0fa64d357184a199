"""Celery's `task.map`, `task.starmap` and `task.chunks`, on a real worker: one task
calls another on each item in turn; chunks are a group of such tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, TaskFailed, TaskState, Worker, chain, chord, group

StartWorker = Callable[..., Awaitable[Worker]]


def register(app: App) -> dict[str, Any]:
    @app.task(name="maps.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="maps.double", queue="other")
    def double(x: int) -> int:  # a plain def: run in a thread
        time.sleep(0.001)
        return x * 2

    @app.task(name="maps.check")
    async def check(x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x

    @app.task(name="maps.where", priority=7, serializer="json")
    def where(x: int) -> str:
        return threading.current_thread().name

    @app.task(name="maps.tsum")
    async def tsum(values: list[Any]) -> int:
        return sum(sum(v) if isinstance(v, list) else v for v in values)

    return {"add": add, "double": double, "check": check, "where": where, "tsum": tsum}


async def test_map_and_starmap_run_each_item_in_one_task(app: App, worker: StartWorker) -> None:
    t = register(app)
    await worker(queues=["default", "other"])
    sig = t["double"].map(range(5))
    assert sig.name == "aiotasks.map" and sig.options["queue"] == "other"  # the task's queue
    h = await sig.delay()
    assert await h.result(timeout=10) == [0, 2, 4, 6, 8]
    h = await t["add"].starmap([(1, 2), (3, 4), [5, 6]]).send()
    assert await h.result(timeout=10) == [3, 7, 11]
    assert await (await t["add"].map([]).send()).result(timeout=10) == []
    # In a canvas like any signature: a chord body gets the list.
    h = await (group(t["double"].map([1, 2]), t["add"].s(1, 1)) | t["tsum"].s()).send()
    assert await h.result(timeout=10) == 8
    h = await chain(t["add"].starmap([(1, 1)]), t["tsum"].s()).send()
    assert await h.result(timeout=10) == 2


async def test_a_map_keeps_its_items_where_a_canvas_passes_a_result(
    app: App, worker: StartWorker
) -> None:
    """Immutable, as Celery's xmap: after a chain step, as a chord body and with partial
    arguments it runs its own items (it was refused: too many positional arguments)."""
    t = register(app)
    await worker(queues=["default", "other"])
    h = await chain(t["add"].s(1, 1), t["double"].map([1, 2])).send()
    assert await h.result(timeout=10) == [2, 4]
    h = await chord([t["add"].s(1, 1)], t["double"].map([3])).send()
    assert await h.result(timeout=10) == [6]
    h = await t["double"].map([4]).delay(99)
    assert await h.result(timeout=10) == [8]
    g = await t["add"].chunks([(1, 1), (2, 2)], 1).apply_async((5,))
    assert await g.results(timeout=10) == [[2], [4]]


async def test_a_map_of_a_def_task_runs_in_the_workers_threads_with_its_options(
    app: App, worker: StartWorker
) -> None:
    t = register(app)
    await worker()
    sig = t["where"].map([1, 2])
    assert sig.options == {"queue": "default", "priority": 7, "serializer": "json"}
    names = await (await sig.send()).result(timeout=10)
    # The worker's own threads (counted by a stop), not the loop's default executor.
    assert len(names) == 2 and not any(n.startswith("asyncio") for n in names), names
    with pytest.raises(TypeError):  # refused when built, not on the worker mid-way
        t["add"].starmap([(1, 2), (1,)])


async def test_an_item_that_fails_fails_the_map(app: App, worker: StartWorker) -> None:
    t = register(app)
    await worker()
    h = await t["check"].map([1, -2, 3]).send()
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "ValueError" and "negative: -2" in str(failed.value)


async def test_a_map_of_a_task_the_worker_does_not_know_fails_saying_so(
    app: App, worker: StartWorker
) -> None:
    register(app)
    await worker()
    h = await app.send_task("aiotasks.map", ("maps.nobody", [1]))
    with pytest.raises(TaskFailed, match="no task named 'maps.nobody'"):
        await h.result(timeout=10)


async def test_chunks_are_a_group_of_starmaps(app: App, worker: StartWorker) -> None:
    t = register(app)
    await worker()
    pairs = list(zip(range(10), range(10), strict=True))
    c = t["add"].chunks(pairs, 4)
    assert [len(s.args[1]) for s in c.tasks] == [4, 4, 2]
    g = await c.send()
    assert await g.results(timeout=10) == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    g = await t["add"].chunks(pairs[:3], 2)()  # Celery calls it
    assert await g.results(timeout=10) == [[0, 2], [4]]
    h = await (t["add"].chunks(pairs[:4], 3).group() | t["tsum"].s()).send()
    assert await h.result(timeout=10) == 12
    with pytest.raises(ValueError, match="at least 1"):
        t["add"].chunks(pairs, 0)
    with pytest.raises(TypeError, match="whole number"):
        t["add"].chunks(pairs, 2.5)  # type: ignore[arg-type]


async def test_a_long_map_of_items_that_never_await_lets_other_tasks_run(
    app: App, worker: StartWorker
) -> None:
    """Without a turn of the loop between items, a 1.5 s map held off every other task
    (and the lease renewals: a long one was taken for a dead worker's and run twice)."""

    @app.task(name="maps.spin")
    async def spin(ms: float) -> int:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
        return 1

    t = register(app)
    await worker(concurrency=4)
    long_map = await spin.map([1.0] * 1500).send()
    await asyncio.sleep(0.2)
    quick = await t["add"].send(1, 1)
    assert await quick.result(timeout=10) == 2
    assert await long_map.state() == TaskState.STARTED  # served while the map ran
    assert await long_map.result(timeout=30) == [1] * 1500


@dataclasses.dataclass
class Pair:
    low: int
    high: int


async def test_a_maps_results_are_rebuilt_into_the_mapped_tasks_return_type(
    app: App, worker: StartWorker
) -> None:
    """As `result()` rebuilds a task's return annotation, a map's does for each of its
    results (they came back as dicts); a handle by id still reads plain data."""

    @app.task(name="maps.pair")
    async def pair(x: int) -> Pair:
        return Pair(x, x + 1)

    await worker()
    h = await pair.map([1, 2]).send()
    assert await h.result(timeout=10) == [Pair(1, 2), Pair(2, 3)]
    h = await pair.starmap([(5,)]).send()
    assert await h.result(timeout=10) == [Pair(5, 6)]
    assert await app.handle(h.id).result(timeout=5) == [{"low": 5, "high": 6}]
