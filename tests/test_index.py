"""The task index and the event feed: written per batch, bounded, searchable, followable."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from aiotasks import App, TaskFailed, TaskState, Worker
from aiotasks.index import TaskIndex

StartWorker = Callable[..., Awaitable[Worker]]


def register(app: App) -> tuple[object, object]:
    @app.task(name="idx.ok")
    async def ok(x: int) -> int:
        return x

    @app.task(name="idx.bad")
    async def bad() -> None:
        raise ValueError("bad")

    return ok, bad


async def test_the_index_finds_tasks_by_id_name_state_and_queue(
    app: App, worker: StartWorker
) -> None:
    ok, bad = register(app)
    await worker()
    hs = [await ok.send(i) for i in range(5)]  # type: ignore[attr-defined]
    failed = await bad.send()  # type: ignore[attr-defined]
    for h in hs:
        await h.result(timeout=10)
    with pytest.raises(TaskFailed):
        await failed.result(timeout=10)
    queued = await app.send_task("idx.nobody", queue="elsewhere")
    index = TaskIndex(app.client)
    found = await index.recent(limit=100)
    assert {i.id for i in found} == {h.id for h in hs} | {failed.id, queued.id}
    assert found[0].id == queued.id  # unfinished first
    assert [i.id for i in await index.recent(state="FAILURE")] == [failed.id]
    assert [i.id for i in await index.recent(state=TaskState.PENDING)] == [queued.id]
    assert {i.id for i in await index.recent(name="idx.o*")} == {h.id for h in hs}
    assert [i.id for i in await index.recent(queue="elsewhere")] == [queued.id]
    assert [i.id for i in await index.recent(task_id=hs[2].id)] == [hs[2].id]
    assert await index.size() == (1, 6)


async def test_a_finished_task_sent_again_is_listed_once(app: App) -> None:
    """A retry under the same id (the dashboard's Retry) is queued while its earlier run
    is still in the finished index: the list showed it twice, both with its new state."""
    ok, _ = register(app)
    async with app.worker().running():
        h = await ok.send(1)  # type: ignore[attr-defined]
        assert await h.result(timeout=10) == 1
    again = await ok.options(task_id=h.id).send(2)  # type: ignore[attr-defined]
    found = [i for i in await TaskIndex(app.client).recent(limit=100) if i.id == h.id]
    assert [i.state for i in found] == [TaskState.PENDING], found
    assert again.id == h.id


async def test_the_index_stays_within_its_cap(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    app = make_app(index_size=50)
    ok, _ = register(app)
    await worker(app, concurrency=16)
    handles = await ok.send_many([((i,), None) for i in range(300)])  # type: ignore[attr-defined]
    for h in handles:
        await h.result(timeout=20)
    live, done = await TaskIndex(app.client).size()
    assert live == 0 and done == 50


async def test_events_are_batched_and_followed_live(app: App, worker: StartWorker) -> None:
    ok, _ = register(app)
    await worker(concurrency=8)
    index = TaskIndex(app.client)
    seen: list[tuple[str | None, str]] = []

    async def follow() -> None:
        async for event in index.follow(after="0"):
            seen.append((event.task_id or event.worker, event.state))

    follower = asyncio.create_task(follow())
    handles = await ok.send_many([((i,), None) for i in range(20)])  # type: ignore[attr-defined]
    for h in handles:
        await h.result(timeout=10)
    await asyncio.sleep(0.3)
    follower.cancel()
    states = {(tid, st) for tid, st in seen}
    for h in handles:
        assert {(h.id, "PENDING"), (h.id, "STARTED"), (h.id, "SUCCESS")} <= states
    assert any(st == "JOINED" for _, st in seen)  # the worker's join is an event too
    # One feed entry per script call, not per task: the enqueue of 20 tasks is one entry.
    entries = await app.client.redis.xlen(app.client.keys.events)
    assert entries < 20 * 3


async def test_a_stopped_worker_leaves_the_registry_and_says_left(app: App) -> None:
    w = app.worker(concurrency=2)
    async with w.running():
        assert await app.client.redis.exists(app.client.keys.worker(w.name))
    assert not await app.client.redis.exists(app.client.keys.worker(w.name))
    assert await app.client.redis.zscore(app.client.keys.workers, w.name) is None
    seen = [(e.worker, e.state) for e in await TaskIndex(app.client).events(after="0")]
    assert (w.name, "JOINED") in seen and (w.name, "LEFT") in seen, seen


async def test_index_and_events_can_be_turned_off(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    app = make_app(index_size=0, events_size=0)
    ok, _ = register(app)
    await worker(app)
    assert await (await ok.send(1)).result(timeout=10) == 1  # type: ignore[attr-defined]
    r = app.client.redis
    assert not await r.exists(app.client.keys.index_done, app.client.keys.events)


async def test_cli_tasks_list(app: App, worker: StartWorker) -> None:
    ok, bad = register(app)
    await worker()
    await (await ok.send(1)).result(timeout=10)  # type: ignore[attr-defined]
    h = await bad.send()  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    base = ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aiotasks", "tasks", "list", *args, *base],
            capture_output=True,
            text=True,
            timeout=30,
        )

    listed = await asyncio.to_thread(run, "--state", "failure", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [h.id] and rows[0]["exc_type"] == "ValueError"
    plain = await asyncio.to_thread(run, "--name", "idx.*")
    assert plain.returncode == 0 and h.id in plain.stdout and "idx.ok" in plain.stdout
    wrong = await asyncio.to_thread(run, "--state", "nope")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error:")
