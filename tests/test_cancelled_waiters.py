"""A cancelled waiter ends: Python 3.11's asyncio.wait_for, which redis-py sends every
command under, swallows a cancel that arrives as the command completes (CPython
gh-86296); a caller's timeout around a read or a wait must still end it."""

from __future__ import annotations

import asyncio

from aiotasks import App


async def test_reads_cancelled_mid_command_end_every_time(app: App) -> None:
    @app.task(queue="nobody-works-this")
    async def idle() -> None:
        return None

    handles = await idle.send_many([((), None) for _ in range(50)])

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
    @app.task(queue="nobody-works-this")
    async def idle() -> None:
        return None

    handles = await idle.send_many([((), None) for _ in range(200)])

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
        assert all(isinstance(r, asyncio.TimeoutError) for r in results), results
