"""redis-py 8's socket timeout, and what it brings: a cancelled waiter ends (Python
3.11's asyncio.wait_for, which redis-py sends every command under, swallows a cancel
that arrives as the command completes: CPython gh-86296), and a worker's idle wait may
outlast the timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aiotasks import App
from aiotasks.index import Event, TaskIndex
from aiotasks.testing.server import OwnServer


async def never_run(app: App, n: int) -> list[Any]:
    """Handles of `n` tasks sent to a queue no worker serves."""

    @app.task(queue="nobody-works-this")
    async def idle() -> None:
        return None

    return await idle.send_many([((), None) for _ in range(n)])


async def test_reads_cancelled_mid_command_end_every_time(app: App) -> None:
    handles = await never_run(app, 50)

    async def poll(i: int) -> None:
        h = handles[i % len(handles)]
        while True:  # each read is one command on the App's pool; cancelled, it must end
            await h.info()

    for _ in range(10):
        pollers = [asyncio.ensure_future(poll(i)) for i in range(300)]
        await asyncio.sleep(0.005)
        for p in pollers:
            p.cancel()
        _, pending = await asyncio.wait(pollers, timeout=10)
        assert not pending, f"{len(pending)} cancelled readers still read"
        assert all(p.cancelled() for p in pollers)


async def test_a_timeout_around_updates_ends_it(app: App) -> None:
    handles = await never_run(app, 200)

    async def follow(i: int) -> None:
        async for _ in handles[i].updates():
            pass

    for _ in range(3):
        results = await asyncio.wait_for(
            asyncio.gather(
                *(asyncio.wait_for(follow(i), 0.05) for i in range(len(handles))),
                return_exceptions=True,
            ),
            timeout=20,
        )
        assert all(isinstance(r, asyncio.TimeoutError) for r in results), [
            r for r in results if not isinstance(r, asyncio.TimeoutError)
        ]


async def test_an_idle_wait_longer_than_the_socket_timeout_is_no_lost_connection(
    own_server: OwnServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py times a read out after its socket timeout (5 s unless the URL names one):
    a worker's blocking wait (`block`) past it must not read as a lost connection."""
    app = App(redis_url=f"{own_server.url}?socket_timeout=1", namespace=namespace)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with app.worker(block=5.0).running():
            # Idle: a wait of 5 s, and redis-py's two retries of it, would each time out.
            await asyncio.sleep(4.0)
            assert await (await add.send(1, 2)).result(timeout=5) == 3
    finally:
        await app.close()
    lost = [r.getMessage() for r in caplog.records if "lost Redis" in r.getMessage()]
    assert not lost, lost


async def test_the_event_feed_follows_past_the_socket_timeout(
    own_server: OwnServer, namespace: str
) -> None:
    """TaskIndex.follow() waits in blocking reads too: an idle feed is no lost connection."""
    app = App(redis_url=f"{own_server.url}?socket_timeout=1", namespace=namespace)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    index = TaskIndex(app.client)

    async def first_event() -> Event:
        async for event in index.follow(block_ms=6000):
            return event
        raise AssertionError("the feed ended")

    try:
        following = asyncio.ensure_future(first_event())
        await asyncio.sleep(4.0)  # idle: waits (and their retries) would outlast the timeout
        assert not following.done(), following
        h = await add.send(1, 2)
        event = await asyncio.wait_for(following, 5)
        assert event.task_id == h.id
    finally:
        await app.close()


async def test_a_waiter_cancelled_as_it_subscribes_leaves_the_others_their_result(
    own_server: OwnServer, namespace: str
) -> None:
    """Waiters of one channel share its subscription: the first one, cancelled while it
    subscribes (before, during, or while Redis confirms), must not strand the others."""
    workers = App(redis_url=own_server.url, namespace=namespace)

    @workers.task(name="slow_add")
    async def slow_add(a: int, b: int) -> int:
        await asyncio.sleep(0.3)
        return a + b

    async def last_state(h: Any) -> str:
        states = [info.state.value async for info in h.updates()]
        return states[-1]

    try:
        async with workers.worker(concurrency=4).running():
            for spins in range(8):
                app = App(redis_url=own_server.url, namespace=namespace)  # a fresh notifier
                try:
                    h = await app.send_task("slow_add", args=(spins, 1))
                    first = [
                        asyncio.ensure_future(h.result()),
                        asyncio.ensure_future(last_state(h)),
                    ]
                    others = [
                        asyncio.ensure_future(h.result(timeout=10)),
                        asyncio.ensure_future(last_state(h)),
                    ]
                    for _ in range(spins):
                        await asyncio.sleep(0)
                    for f in first:
                        f.cancel()
                    assert await asyncio.wait_for(asyncio.gather(*others), 15) == [
                        spins + 1,
                        "SUCCESS",
                    ], spins
                    # The cancelled ones end too.
                    _, stuck = await asyncio.wait(first, timeout=10)
                    assert not stuck, (spins, stuck)
                finally:
                    await app.close()
    finally:
        await workers.close()
