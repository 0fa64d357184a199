"""The worker's basics: concurrency limit, clean streams, burst mode, queues, ignore_result."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, ResultTimeout, TaskFailed, TaskState, Worker, current_task
from aiotasks.keys import GROUP, PRIORITIES
from tests.helpers import wait_until

StartWorker = Callable[..., Awaitable[Worker]]


async def stream_lengths(app: App, queue: str = "default") -> list[int]:
    """XLEN of every priority stream of a queue."""
    redis = app.client.redis
    return [int(await redis.xlen(app.client.keys.stream(queue, p))) for p in PRIORITIES]


async def pending_counts(app: App, queue: str = "default") -> list[int]:
    """Entries delivered but not acknowledged, per priority stream of a queue."""
    redis = app.client.redis
    counts = []
    for p in PRIORITIES:
        key = app.client.keys.stream(queue, p)
        if await redis.exists(key):
            counts.append(int((await redis.xpending(key, GROUP))["pending"]))
    return counts


class Gauge:
    """Counts tasks running at once, and the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


# -- concurrency ------------------------------------------------------------------------


async def test_concurrency_limit_is_respected(app: App, worker: StartWorker) -> None:
    gauge = Gauge()

    @app.task
    async def nap(i: int) -> int:
        with gauge:
            await asyncio.sleep(0.1)
        return i

    handles = await nap.send_many([((i,), None) for i in range(12)])
    await worker(concurrency=4)
    async with asyncio.timeout(10):
        results = [await h.result() for h in handles]
    assert results == list(range(12))
    assert gauge.peak == 4


async def test_concurrency_limit_applies_to_thread_tasks(app: App, worker: StartWorker) -> None:
    gauge = Gauge()

    @app.task
    def nap(i: int) -> int:
        with gauge:
            time.sleep(0.1)
        return i

    handles = await nap.send_many([((i,), None) for i in range(9)])
    await worker(concurrency=3)
    async with asyncio.timeout(10):
        results = [await h.result() for h in handles]
    assert results == list(range(9))
    assert gauge.peak == 3


async def test_concurrency_limit_across_async_and_thread_tasks(
    app: App, worker: StartWorker
) -> None:
    gauge = Gauge()

    @app.task
    async def nap_async() -> None:
        with gauge:
            await asyncio.sleep(0.1)

    @app.task
    def nap_thread() -> None:
        with gauge:
            time.sleep(0.1)

    handles = [*await nap_async.send_many([((), None)] * 6)]
    handles += await nap_thread.send_many([((), None)] * 6)
    await worker(concurrency=5)
    async with asyncio.timeout(10):
        for h in handles:
            await h.result()
    assert gauge.peak == 5


async def test_thread_task_does_not_block_the_loop(app: App, worker: StartWorker) -> None:
    @app.task
    def blocking() -> str:
        time.sleep(0.6)
        return "slow"

    @app.task
    async def quick() -> str:
        return "quick"

    await worker(concurrency=4)
    slow = await blocking.send()
    started = time.monotonic()
    fast = await quick.send()
    assert await fast.result(timeout=5) == "quick"
    assert time.monotonic() - started < 0.5
    assert await slow.state() != TaskState.SUCCESS
    assert await slow.result(timeout=5) == "slow"


# -- streams are cleaned ----------------------------------------------------------------


async def test_stream_is_emptied_and_nothing_pending_after_processing(
    app: App, worker: StartWorker
) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def fail() -> None:
        raise ValueError("no")

    await worker()
    ok = await add.send_many([((i, i), None) for i in range(20)])
    urgent = await add.options(priority=9).send(1, 1)
    bad = await fail.send()
    for h in [*ok, urgent]:
        await h.result(timeout=5)
    with pytest.raises(TaskFailed):
        await bad.result(timeout=5)
    # The result lands in the same atomic step that acks and deletes the entry.
    assert sum(await stream_lengths(app)) == 0
    assert sum(await pending_counts(app)) == 0


# -- burst ------------------------------------------------------------------------------


async def test_burst_worker_drains_then_exits(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0.01)
        return x + y

    handles = await add.send_many([((i, 1), None) for i in range(10)])
    w = app.worker(burst=True, concurrency=3)
    async with asyncio.timeout(10):
        await w.run()
    assert [await h.state() for h in handles] == [TaskState.SUCCESS] * 10
    assert [await h.result(timeout=1) for h in handles] == [i + 1 for i in range(10)]
    assert sum(await stream_lengths(app)) == 0


async def test_burst_worker_on_empty_queues_exits_at_once(app: App) -> None:
    w = app.worker(burst=True)
    started = time.monotonic()
    async with asyncio.timeout(5):
        await w.run()
    assert time.monotonic() - started < 2


async def test_burst_worker_leaves_a_paused_queue_for_later(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await app.queues.pause("held")
    held = await add.options(queue="held").send(1, 1)
    done = await add.send(2, 2)
    w = app.worker(burst=True, queues=["default", "held"])
    async with asyncio.timeout(5):
        await w.run()
    assert await done.result(timeout=1) == 4
    assert await held.state() == TaskState.PENDING


async def test_burst_worker_waits_for_a_task_due_soon(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.options(countdown=0.3).send(1, 2)
    w = app.worker(burst=True)
    async with asyncio.timeout(10):
        await w.run()
    assert await h.result(timeout=1) == 3


# -- queues -----------------------------------------------------------------------------


async def test_worker_runs_only_its_queues(app: App, worker: StartWorker) -> None:
    ran: list[str] = []

    @app.task
    async def mark(queue: str) -> str:
        ran.append(queue)
        return queue

    on_b = await mark.options(queue="b").send("b")
    on_a = await mark.options(queue="a").send("a")
    await worker(queues=["a"])
    assert await on_a.result(timeout=5) == "a"
    # b was sent first and is still untouched: this worker never reads queue b.
    with pytest.raises(ResultTimeout):
        await on_b.result(timeout=0.3)
    assert await on_b.state() == TaskState.PENDING
    assert sum(await stream_lengths(app, "b")) == 1
    assert ran == ["a"]
    # A worker on b picks it up.
    await worker(queues=["b"])
    assert await on_b.result(timeout=5) == "b"


async def test_worker_on_several_queues(app: App, worker: StartWorker) -> None:
    @app.task
    async def where(queue: str) -> str:
        return queue

    handles = [await where.options(queue=q).send(q) for q in ("x", "y", "default")]
    await worker(queues="x,y")
    assert await handles[0].result(timeout=5) == "x"
    assert await handles[1].result(timeout=5) == "y"
    assert await handles[2].state() == TaskState.PENDING


async def test_task_queue_option_routes_to_that_queue(app: App, worker: StartWorker) -> None:
    @app.task(queue="special")
    async def special() -> str:
        return "ok"

    h = await special.send()
    assert sum(await stream_lengths(app, "special")) == 1
    await worker(queues=["special"])
    assert await h.result(timeout=5) == "ok"
    info = await h.info()
    assert info.queue == "special"


# -- ignore_result ----------------------------------------------------------------------


async def _drained(app: App) -> bool:
    return sum(await stream_lengths(app)) == 0 and sum(await pending_counts(app)) == 0


@pytest.mark.parametrize("where", ["decorator", "send"])
async def test_ignore_result_stores_no_result(app: App, worker: StartWorker, where: str) -> None:
    ran = asyncio.Event()

    @app.task(ignore_result=where == "decorator")
    async def fire_and_forget() -> dict[str, Any]:
        ran.set()
        return {"big": "value"}

    if where == "send":
        h = await fire_and_forget.options(ignore_result=True).send()
    else:
        h = await fire_and_forget.send()
    await worker()
    async with asyncio.timeout(5):
        await ran.wait()

    async def drained() -> bool:
        return await _drained(app)

    await wait_until(drained)
    # API.md: the final state stays, the value does not; waiting returns None at once.
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.result is None
    assert await h.result(timeout=2) is None
    stored = await app.client.redis.hkeys(app.client.keys.task(h.id))
    assert b"result" not in stored and b"state" in stored


async def test_ignore_result_keeps_the_error_of_a_failure(app: App, worker: StartWorker) -> None:
    @app.task(ignore_result=True)
    async def broken() -> None:
        raise ValueError("kept")

    await worker()
    h = await broken.send()
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=5)
    assert failed.value.exc_type == "ValueError" and failed.value.exc_message == "kept"
    assert (await h.state()) == TaskState.FAILURE


async def test_without_ignore_result_the_result_is_stored(app: App, worker: StartWorker) -> None:
    @app.task
    async def keep() -> dict[str, str]:
        return {"big": "value"}

    await worker()
    h = await keep.send()
    assert await h.result(timeout=5) == {"big": "value"}
    assert await app.client.redis.exists(app.client.keys.task(h.id))


# -- registry ---------------------------------------------------------------------------


async def test_worker_registers_while_running_and_leaves_on_stop(app: App) -> None:
    w = app.worker(queues=["a", "b"], concurrency=7)
    keys = app.client.keys
    redis = app.client.redis
    async with asyncio.timeout(10):
        async with w.running():
            h: Any = await redis.hgetall(keys.worker(w.name))
            assert h[b"name"].decode() == w.name
            assert h[b"queues"].decode() == "a,b"
            assert int(h[b"concurrency"]) == 7
            assert await redis.pttl(keys.worker(w.name)) > 0
            assert await redis.zscore(keys.workers, w.name) is not None
    assert not await redis.exists(keys.worker(w.name))
    assert await redis.zscore(keys.workers, w.name) is None


async def test_a_running_task_reads_started_on_an_idle_worker(
    app: App, worker: StartWorker
) -> None:
    """The blocking-read path marks a task STARTED before its body runs."""
    seen: list[TaskState] = []

    @app.task
    async def look() -> None:
        seen.append(await app.handle(current_task().id).state())

    await worker()
    await asyncio.sleep(0.1)  # the worker is now parked in XREADGROUP BLOCK
    for _ in range(20):
        await (await look.send()).result(timeout=10)
    assert seen == [TaskState.STARTED] * 20


async def test_a_run_leaves_no_reference_cycle(app: App, worker: StartWorker) -> None:
    """Each run is freed by reference counting alone: a cycle per task (a context holding
    a callback into its Execution, say) costs the cyclic collector µs per task."""

    @app.task
    async def noop(i: int) -> int:
        return i

    await worker(concurrency=8)
    warm = await noop.send_many([((i,), None) for i in range(50)])
    for h in warm:
        await h.result(timeout=10)
    gc.collect()
    gc.disable()
    try:
        handles = await noop.send_many([((i,), None) for i in range(300)])
        for h in handles:
            await h.result(timeout=10)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 100, f"{found} objects in cycles after 300 runs"  # 0 today; 5,396 with one


async def test_a_worker_says_which_of_its_app_s_tasks_go_to_queues_it_does_not_take(
    app: App, worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    app.configure(task_routes={"routed.*": "high"})

    @app.task(name="routed.report")
    async def report() -> None: ...

    @app.task(name="mail.send", queue="mail")
    async def send_mail() -> None: ...

    @app.task(name="plain.add")
    async def add() -> None: ...

    await worker(queues=["default", "mail"])
    [line] = [r.getMessage() for r in caplog.records if "takes tasks from" in r.getMessage()]
    assert "queue 'high' gets routed.report" in line
    assert "mail.send" not in line and "plain.add" not in line


async def test_current_task_is_made_when_a_body_asks_and_holds_no_cycle(
    app: App, worker: StartWorker
) -> None:
    # An App without hooks: the worker makes a run's context only when the body asks.
    assert not app.hooks
    seen: list[tuple[str, str, int, str, bool]] = []

    @app.task(name="asks", max_retries=1)
    async def asks(fail: bool) -> None:
        ctx = current_task()
        seen.append((ctx.id, ctx.name, ctx.attempt, ctx.queue, ctx is current_task()))
        if fail and ctx.attempt == 1:
            raise ctx.retry()

    @app.task(name="asks_in_thread")
    def asks_in_thread() -> str:
        ctx = current_task()
        return f"{ctx.name}:{ctx.attempt}:{ctx is current_task()}"

    await worker()
    first = await asks.send(False)
    retried = await asks.send(True)
    await first.result(timeout=10)
    await retried.result(timeout=10)
    assert await (await asks_in_thread.send()).result(timeout=10) == "asks_in_thread:1:True"
    assert sorted(seen) == sorted(
        [
            (first.id, "asks", 1, "default", True),
            (retried.id, "asks", 1, "default", True),
            (retried.id, "asks", 2, "default", True),
        ]
    )
    with pytest.raises(RuntimeError):
        current_task()  # the test itself runs no task
    gc.collect()
    gc.disable()
    try:
        for h in await asks.send_many([((False,), None) for _ in range(200)]):
            await h.result(timeout=10)
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 100, f"{found} objects in cycles after 200 runs"


@pytest.mark.parametrize("max_connections", [2, 64])
async def test_a_worker_runs_from_a_pool_of_any_size_and_gives_back_its_own_connections(
    make_app: Callable[..., App], max_connections: int
) -> None:
    """A worker fetches and commits on connections of its own where the pool has room for
    them (a quarter of it), and through the pool where it has not: a pool of 2 must not
    leave its blocking read waiting forever for a connection. Stopped, it gives them back."""
    a = make_app(max_connections=max_connections)

    @a.task
    async def add(x: int, y: int) -> int:
        return x + y

    w = a.worker(concurrency=4)
    run = asyncio.create_task(w.run())
    await asyncio.wait_for(w.wait_started(), 10)
    lane = w.lanes[0]
    assert lane.scripts is not None and lane.outcomes.scripts is not None
    assert lane.scripts.own == lane.outcomes.scripts.own == (max_connections == 64)
    handles = [await add.send(i, 1) for i in range(20)]
    assert [await h.result(timeout=10) for h in handles] == [i + 1 for i in range(20)]
    # Served one at a time, as an idle worker does (its blocking read, then a commit).
    for i in range(3):
        assert await (await add.send(i, i)).result(timeout=10) == 2 * i
    w.stop()
    await asyncio.wait_for(run, 15)
    assert lane.scripts is None and lane.outcomes.scripts is None
    pool = a.client._connect().pool
    assert pool is not None and not list(pool._get_in_use_connections())


async def test_workers_sharing_a_pool_hold_a_quarter_of_it_at_most(
    make_app: Callable[..., App],
) -> None:
    """Two workers of one App: one takes the 2 connections a pool of 8 can spare (the
    first to start), the other goes through the pool, and both run tasks."""
    a = make_app(max_connections=8)

    @a.task
    async def double(x: int) -> int:
        return 2 * x

    workers = [a.worker(concurrency=2) for _ in range(2)]
    runs = [asyncio.create_task(w.run()) for w in workers]
    for w in workers:
        await asyncio.wait_for(w.wait_started(), 10)
    owned = [(w.lanes[0].scripts, w.lanes[0].outcomes.scripts) for w in workers]
    assert sorted([s is not None and s.own for s in pair] for pair in owned) == [
        [False, False],
        [True, True],
    ]
    handles = [await double.send(i) for i in range(10)]
    assert [await h.result(timeout=10) for h in handles] == [2 * i for i in range(10)]
    for w in workers:
        w.stop()
    await asyncio.wait_for(asyncio.gather(*runs), 15)
    # Given back: a worker started now may take them.
    again = a.worker(concurrency=2)
    run = asyncio.create_task(again.run())
    await asyncio.wait_for(again.wait_started(), 10)
    scripts = again.lanes[0].scripts
    assert scripts is not None and scripts.own
    again.stop()
    await asyncio.wait_for(run, 15)
