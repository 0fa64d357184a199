"""Priorities and routing: which stream a send lands on, and the order a worker serves them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiotasks import App, TaskState


async def _xlen(app: App, queue: str, priority: int) -> int:
    return int(await app.client.redis.xlen(app.client.keys.stream(queue, priority)))


async def _lengths(app: App, queue: str) -> dict[int, int]:
    """Entries per priority of one queue, only the non-empty ones."""
    out = {p: await _xlen(app, queue, p) for p in range(10)}
    return {p: n for p, n in out.items() if n}


async def test_backlog_starts_most_urgent_first(app: App, worker: Any) -> None:
    started: list[int] = []

    @app.task
    async def record(priority: int) -> int:
        started.append(priority)
        return priority

    priorities = [p for p in range(10) for _ in range(2)]
    random.Random(7).shuffle(priorities)
    handles = [await record.options(priority=p).send(p) for p in priorities]
    assert sum((await _lengths(app, "default")).values()) == 20  # a backlog, nothing running

    await worker(concurrency=1)
    async with asyncio.timeout(15):
        results = [await h.result() for h in handles]
    assert results == priorities
    assert started == sorted(priorities, reverse=True)


async def test_default_and_task_priority(app: App) -> None:
    @app.task
    async def plain() -> None:
        pass

    @app.task(priority=8)
    async def urgent() -> None:
        pass

    await plain.send()
    assert await _lengths(app, "default") == {5: 1}
    await urgent.send()
    assert await _lengths(app, "default") == {5: 1, 8: 1}
    await urgent.options(priority=0).send()  # a send option wins over the task's
    await plain.apply_async(priority=9)
    assert await _lengths(app, "default") == {0: 1, 5: 1, 8: 1, 9: 1}


async def test_bad_priority_is_refused(app: App) -> None:
    @app.task
    async def plain() -> None:
        pass

    for bad in (10, -1, "5", 2.5):
        with pytest.raises(ValueError, match="priority"):
            await plain.apply_async(priority=bad)
    assert await _lengths(app, "default") == {}


async def test_task_queue_and_send_queue(app: App) -> None:
    @app.task(queue="reports")
    async def report() -> None:
        pass

    h = await report.send()
    assert await _lengths(app, "reports") == {5: 1}
    assert (await h.info()).queue == "reports"
    h2 = await report.options(queue="bulk").send()  # per-send queue wins over the task's
    assert await _lengths(app, "bulk") == {5: 1}
    assert await _lengths(app, "reports") == {5: 1}
    assert (await h2.info()).queue == "bulk"
    await app.send_task(report.name, queue="adhoc")
    assert await _lengths(app, "adhoc") == {5: 1}
    assert await _lengths(app, "default") == {}


@pytest.fixture
async def routed(redis_url: str, namespace: str) -> AsyncIterator[App]:
    a = App(redis_url=redis_url, namespace=namespace, task_routes={"mail.*": "high"})
    yield a
    await a.close()


async def test_task_routes_pick_the_queue(routed: App) -> None:
    @routed.task(name="mail.send")
    async def send_mail(to: str) -> str:
        return to

    @routed.task(name="report.build")
    async def build() -> None:
        pass

    h = await send_mail.send("a@example.com")
    assert await _lengths(routed, "high") == {5: 1}
    assert await _lengths(routed, "default") == {}
    assert (await h.info()).queue == "high"
    await build.send()
    assert await _lengths(routed, "default") == {5: 1}
    # An explicit queue beats the route; so does sending by name through a route.
    await send_mail.options(queue="low").send("b@example.com")
    assert await _lengths(routed, "low") == {5: 1}
    await routed.send_task("mail.digest")
    assert await _lengths(routed, "high") == {5: 2}


async def test_worker_serves_its_queues_in_order(routed: App, worker: Any) -> None:
    order: list[str] = []

    @routed.task(name="mail.send")
    async def send_mail(n: int) -> None:
        order.append(f"high{n}")

    @routed.task(name="other")
    async def other(n: int) -> None:
        order.append(f"default{n}")

    handles = []
    for n in range(4):
        handles += [await other.send(n), await send_mail.send(n)]
    await worker(routed, queues=["high", "default"], concurrency=1)
    async with asyncio.timeout(15):
        for h in handles:
            await h.result()
    assert order == [f"high{n}" for n in range(4)] + [f"default{n}" for n in range(4)]


async def test_worker_never_runs_other_queues(routed: App, worker: Any) -> None:
    ran: list[str] = []

    @routed.task(name="mail.send")
    async def send_mail() -> None:
        ran.append("high")

    @routed.task(name="other")
    async def other() -> None:
        ran.append("default")

    high = await send_mail.send()
    first = await other.send()
    await worker(routed, queues=["default"], concurrency=1)
    async with asyncio.timeout(10):
        await first.result()
    # A second default task, sent after, has run: the worker has had every chance.
    second = await other.send()
    async with asyncio.timeout(10):
        await second.result()
    assert ran == ["default", "default"]
    assert await high.state() == TaskState.PENDING
    assert await _lengths(routed, "high") == {5: 1}
