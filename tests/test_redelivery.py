"""Never lose a task, never run one twice: redelivery after SIGKILL, none on live workers.

Worker subprocesses run with visibility_timeout=1 s (AIOTASKS_TEST_VT), so a task held by a
dead worker comes back after about a second, while a live worker's heartbeat keeps its
running tasks away from everyone else however long they run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, TaskState, Worker
from tests.helpers import pid_of, runs_key, wait_consuming, wait_state

StartWorker = Callable[..., Awaitable[Worker]]
Spawn = Callable[..., Any]

SLEEP = "tests.apps.basic.sleep"
COUNT_RUNS = "tests.apps.basic.count_runs"
BLOCKING_COUNT_RUNS = "tests.apps.reliability.blocking_count_runs"
VT = 1.0  # the subprocess workers' visibility timeout


async def test_task_of_a_sigkilled_worker_is_redelivered_to_another(
    app: App, spawn_worker: Spawn
) -> None:
    w1, w2 = spawn_worker(), spawn_worker()
    await wait_consuming(app, w1, w2)
    h = await app.send_task(SLEEP, args=(3,))
    await wait_state(h, TaskState.STARTED)
    holder = pid_of((await h.info()).worker)
    assert holder in (w1.pid, w2.pid)
    victim, survivor = (w1, w2) if holder == w1.pid else (w2, w1)

    await asyncio.sleep(0.3)  # well inside the task
    victim.kill()
    killed_at = time.time()
    assert victim.proc.returncode == -9

    assert await h.result(timeout=20) == 3
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.attempts == 2
    assert pid_of(info.worker) == survivor.pid
    assert info.started_at is not None
    # Redelivered by liveness: not before the dead worker's lease ran out, nor long after.
    redelivered_after = info.started_at.timestamp() - killed_at
    assert VT * 2 / 3 - 0.1 <= redelivered_after < VT + 3.0, redelivered_after
    assert "reclaimed entry" in survivor.output()


@pytest.mark.parametrize(
    ("task", "module"),
    [(COUNT_RUNS, "basic"), (BLOCKING_COUNT_RUNS, "reliability")],
    ids=["async", "thread"],
)
async def test_long_task_on_a_live_worker_runs_exactly_once(
    app: App, spawn_worker: Spawn, task: str, module: str
) -> None:
    """5 s of work with visibility_timeout=1 and an idle second worker: one run, no reclaim."""
    w1, w2 = spawn_worker(module=module), spawn_worker(module=module)
    await wait_consuming(app, w1, w2)
    key = runs_key(app)
    h = await app.send_task(task, args=(key, 5.0))
    assert await h.result(timeout=20) == 1
    assert int(await app.client.redis.get(key)) == 1
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.attempts == 1
    for w in (w1, w2):
        assert w.proc.poll() is None
        assert "reclaimed" not in w.output()


async def test_entries_lost_in_a_live_consumers_reply_are_reclaimed(
    redis_url: str, namespace: str, worker: StartWorker
) -> None:
    """An entry Redis delivered to a live consumer whose XREADGROUP reply never arrived is
    not hidden by that consumer's heartbeat: it goes idle and is redelivered, while the
    task the consumer really runs keeps its lease."""
    fast = App(redis_url=redis_url, namespace=namespace, visibility_timeout=VT)
    runs: list[str] = []

    @fast.task(name="lost.record")
    async def record(tag: str, seconds: float) -> str:
        runs.append(tag)
        await asyncio.sleep(seconds)
        return tag

    try:
        r = fast.client.redis
        stream = fast.client.keys.stream("default", 5)
        await r.xgroup_create(stream, "workers", id="0", mkstream=True)
        lost = await record.send("lost", 0.0)
        consumer = "live-consumer"
        # Redis delivers the entry to `consumer`; pretend the reply was lost on the way.
        reply = await r.xreadgroup("workers", consumer, {stream: ">"}, count=1)
        assert reply[0][1][0][1][b"id"].decode() == lost.id
        pending = await r.xpending(stream, "workers")
        assert pending["pending"] == 1

        await worker(fast, name=consumer, concurrency=4)
        long = await record.send("long", 4.0)
        await wait_state(long, TaskState.STARTED)

        t0 = time.monotonic()
        assert await lost.result(timeout=5) == "lost"
        assert time.monotonic() - t0 < 3.5
        # The consumer's real task was not redelivered meanwhile.
        assert await long.state() == TaskState.STARTED
        assert await long.result(timeout=10) == "long"

        assert runs.count("lost") == 1
        assert runs.count("long") == 1
        assert (await lost.info()).attempts == 2
        assert (await long.info()).attempts == 1
        assert (await r.xpending(stream, "workers"))["pending"] == 0
    finally:
        await fast.close()
