"""Revoking: a queued or scheduled task never runs; a running one is cancelled on request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from aiotasks import App, TaskRevoked, TaskState, group
from tests.helpers import ReadAhead


async def _pttl(app: App, task_id: str) -> int:
    return int(await app.client.redis.pttl(app.client.keys.task(task_id)))


async def test_revoke_queued_task_never_runs(app: App, worker: Any) -> None:
    runs: list[str] = []

    @app.task
    async def job(tag: str) -> str:
        runs.append(tag)
        return tag

    h = await job.send("revoked")
    await h.revoke()
    assert await h.state() == TaskState.REVOKED
    assert 0 < await _pttl(app, h.id) <= app.settings.result_ttl * 1000

    await worker(concurrency=1)
    # Sent after on the same stream: once it ran, the worker has met the revoked entry.
    marker = await job.send("marker")
    assert await marker.result(timeout=10) == "marker"
    assert runs == ["marker"]
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)
    info = await h.info()
    assert info.state == TaskState.REVOKED and info.started_at is None
    assert await app.client.redis.xlen(app.client.keys.stream("default")) == 0  # settled, deleted
    assert 0 < await _pttl(app, h.id) <= app.settings.result_ttl * 1000


async def test_revoke_scheduled_task(app: App, worker: Any) -> None:
    runs: list[str] = []

    @app.task
    async def job(tag: str) -> str:
        runs.append(tag)
        return tag

    await worker()
    h = await job.options(countdown=0.5).send("revoked")
    assert await h.state() == TaskState.SCHEDULED
    await h.revoke()
    assert await h.state() == TaskState.REVOKED  # at once, not when it falls due
    assert await app.client.redis.zscore(app.client.keys.delayed, h.id) is None
    with pytest.raises(TaskRevoked):
        await h.result(timeout=1)
    assert 0 < await _pttl(app, h.id) <= app.settings.result_ttl * 1000

    # Due after the revoked one would have been: once it ran, the revoked one had its chance.
    marker = await job.options(countdown=0.7).send("marker")
    assert await marker.result(timeout=10) == "marker"
    assert runs == ["marker"]
    assert await h.state() == TaskState.REVOKED


async def test_revoke_terminate_cancels_running_task(app: App, worker: Any) -> None:
    started = asyncio.Event()
    cancelled_at: list[float] = []

    @app.task
    async def slow() -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled_at.append(time.perf_counter())
            raise
        return "finished"

    @app.task
    async def quick(x: int) -> int:
        return x

    await worker(concurrency=1)
    h = await slow.send()
    async with asyncio.timeout(10):
        await started.wait()
    assert await h.state() == TaskState.STARTED

    t0 = time.perf_counter()
    await h.revoke(terminate=True)
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)
    assert cancelled_at, "the task was not cancelled"
    latency = cancelled_at[0] - t0
    assert latency < 1.0, f"cancelled {latency:.3f} s after revoke"
    assert await h.state() == TaskState.REVOKED

    # The worker goes on, and its only slot is free again.
    assert await (await quick.send(7)).result(timeout=5) == 7
    info = await h.info()
    assert info.state == TaskState.REVOKED and info.result is None
    assert 0 < await _pttl(app, h.id) <= app.settings.result_ttl * 1000
    # Its entry was acknowledged: nothing is left to be redelivered.
    pending = await app.client.redis.xpending(app.client.keys.stream("default"), "workers")
    assert pending["pending"] == 0


async def test_revoke_finished_task_keeps_its_result(app: App, worker: Any) -> None:
    @app.task
    async def job() -> int:
        return 1

    await worker()
    h = await job.send()
    assert await h.result(timeout=10) == 1
    await h.revoke(terminate=True)
    assert await h.state() == TaskState.SUCCESS
    assert await h.result(timeout=1) == 1


async def test_revoke_terminate_before_the_body_begins_never_runs_it(app: App, worker: Any) -> None:
    """A task the worker has read (and marked STARTED) but not begun, revoked with
    terminate=True: the worker knows it by id already, and never runs its body."""
    gate = ReadAhead(app)
    await worker(concurrency=1)
    _, held, ahead = await gate.send()
    assert await ahead.state() == TaskState.STARTED  # read ahead, waiting for the slot
    await ahead.revoke(terminate=True)
    await asyncio.sleep(0.2)  # the broadcast reaches the worker
    gate.unblock.set()
    assert await held.result(timeout=10) == "hold"
    with pytest.raises(TaskRevoked):
        await ahead.result(timeout=10)
    await (await gate.job.send("after")).result(timeout=10)  # the slot went on to others
    assert "ahead" not in gate.runs
    assert await ahead.state() == TaskState.REVOKED


async def test_a_plain_revoke_of_a_running_task_lets_it_finish_then_terminate_still_cancels(
    app: App, worker: Any
) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    @app.task(max_retries=3, autoretry_for=(ValueError,))
    async def long_job(seconds: float) -> str:
        started.set()
        await asyncio.sleep(seconds)
        finished.append("done")
        raise ValueError("would be retried, were it not revoked")

    await worker()
    h = await long_job.send(0.5)
    async with asyncio.timeout(10):
        await started.wait()
    await h.revoke()
    # The run goes on: still STARTED, not yet finished.
    info = await h.info()
    assert info.state == TaskState.STARTED and info.finished_at is None
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)
    assert finished == ["done"]  # it ran to the end, and was not retried
    await asyncio.sleep(0.3)
    assert finished == ["done"]

    # A second task, revoked plainly, then with terminate: it is cancelled.
    started.clear()
    h2 = await long_job.send(30)
    async with asyncio.timeout(10):
        await started.wait()
    await h2.revoke()
    await h2.revoke(terminate=True)
    with pytest.raises(TaskRevoked):
        await h2.result(timeout=5)
    assert finished == ["done"]


async def test_revoking_a_group_revokes_every_member(app: App, worker: Any) -> None:
    """GroupHandle.revoke() (Celery's GroupResult.revoke): queued members never run, and
    with terminate=True a running one is cancelled; the group's results say so."""
    runs: list[int] = []
    started = asyncio.Event()

    @app.task
    async def slow(i: int) -> int:
        runs.append(i)
        started.set()
        await asyncio.sleep(10)
        return i

    await worker(concurrency=1)
    g = await group(slow.s(i) for i in range(4)).send()
    async with asyncio.timeout(10):
        await started.wait()  # one member runs; the others wait behind it
    await g.revoke(terminate=True)
    results = await g.results(timeout=5, return_exceptions=True)
    assert all(isinstance(r, TaskRevoked) for r in results), results
    assert [await h.state() for h in g.handles] == [TaskState.REVOKED] * 4
    await asyncio.sleep(0.3)  # a member that was going to run would have started by now
    assert len(runs) == 1, runs
