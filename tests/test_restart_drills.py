"""Redis restart drills with real worker processes, under load, with waiters waiting.

With AOF: the server restarts (SIGTERM, AOF on) in the middle of a backlog; every task
ends SUCCESS, every waiter gets its result, no worker reports a loss.

Without persistence: the server comes back empty in the middle of a backlog (queued,
scheduled and running tasks, chains, waiters with and without timeouts, updates()
iterators). Every waiter ends: a result, TaskLost at the reconnect, or ResultTimeout at
its own timeout (a chain's last step, never created, cannot be known lost). None hangs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiotasks import App, ResultTimeout, TaskHandle, TaskLost, chain
from aiotasks.testing.server import OwnServer
from tests.helpers import wait_consuming

PAUSE = "tests.apps.reliability.pause"
ADD = "tests.apps.basic.add"
WORKERS = 2
CONCURRENCY = 8


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[OwnServer]:
    data = tmp_path / "data"
    data.mkdir()
    config = {"appendonly": "yes", "appendfsync": "everysec", "dir": str(data)}
    with OwnServer(config=config) as server:
        yield server


def stand_ins(app: App) -> tuple[Any, Any]:
    async def never(*args: Any) -> Any:
        raise AssertionError("runs on the workers only")

    return app.task(name=PAUSE)(never), app.task(name=ADD)(never)


async def start_workers(app: App, spawn_worker: Any, url: str) -> list[Any]:
    procs = [
        spawn_worker("--concurrency", str(CONCURRENCY), module="reliability", url=url)
        for _ in range(WORKERS)
    ]
    await wait_consuming(app, *procs)
    return procs


async def until_done(waiters: list[asyncio.Task[Any]], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for w in waiters if w.done()) < n:
        assert time.monotonic() < deadline, f"fewer than {n} tasks done after {timeout} s"
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_restart_with_aof_loses_nothing(
    aof_server: OwnServer, namespace: str, spawn_worker: Any
) -> None:
    n_tasks = 3000
    app = App(redis_url=aof_server.url, namespace=namespace)
    pause, _ = stand_ins(app)
    try:
        workers = await start_workers(app, spawn_worker, aof_server.url)
        handles: list[TaskHandle[int]] = []
        for chunk in range(0, n_tasks, 500):
            calls = [((i, 0.01), None) for i in range(chunk, chunk + 500)]
            handles += await pause.send_many(calls)
        waiters = [asyncio.create_task(h.result(timeout=120)) for h in handles]
        await until_done(waiters, n_tasks // 3, 60)
        t0 = time.monotonic()
        await asyncio.to_thread(aof_server.restart)
        down = time.monotonic() - t0
        results = await asyncio.wait_for(asyncio.gather(*waiters), 150)
        elapsed = time.monotonic() - t0
        attempts = Counter([(await h.info()).attempts for h in handles])
    finally:
        await app.close()
    print(
        f"\nAOF restart: {n_tasks} tasks, {WORKERS} workers x {CONCURRENCY}; server down "
        f"{down:.2f} s; every result {elapsed:.1f} s after the restart began; attempts "
        f"{dict(sorted(attempts.items()))}"
    )
    assert results == list(range(n_tasks))  # nothing lost, every waiter answered
    for w in workers:
        out = w.output()
        assert w.proc.poll() is None, out
        assert "LOST DATA" not in out and "Traceback" not in out, out


async def outcome(waiter: asyncio.Task[Any], started: float, timeout: float | None) -> str:
    """How one waiter ended: 'result', 'TaskLost', 'ResultTimeout' (at its own timeout)."""
    try:
        await waiter
    except TaskLost:
        return "TaskLost"
    except ResultTimeout:
        took = time.monotonic() - started
        assert timeout is not None and took >= timeout - 0.2, f"ResultTimeout after {took:.1f} s"
        return "ResultTimeout"
    return "result"


async def drain(h: TaskHandle[Any]) -> Any:
    async for info in h.updates():
        last = info
    return last


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_restart_without_persistence_ends_every_waiter(
    own_server: OwnServer, namespace: str, spawn_worker: Any
) -> None:
    n_tasks, timeout = 2000, 15.0
    app = App(redis_url=own_server.url, namespace=namespace)
    pause, add = stand_ins(app)
    try:
        workers = await start_workers(app, spawn_worker, own_server.url)
        handles = await pause.send_many([((i, 0.02), None) for i in range(n_tasks)])
        scheduled = await pause.send_many([((i, 0.0), None) for i in range(50)], countdown=60)
        chains = [await chain(add.s(i, 1), add.s(2), add.s(3)).send() for i in range(20)]
        t0 = time.monotonic()
        waits: list[tuple[str, asyncio.Task[Any], float | None]] = []
        for h in [*handles, *scheduled]:
            waits.append(("task", asyncio.create_task(h.result(timeout=timeout)), timeout))
        for h in chains:
            waits.append(("chain", asyncio.create_task(h.result(timeout=timeout)), timeout))
        for h in handles[-20:]:  # no timeout at all: must end anyway
            waits.append(("forever", asyncio.create_task(h.result()), None))
            waits.append(("updates", asyncio.create_task(drain(h)), None))
        await until_done([t for _, t, _ in waits], n_tasks // 5, 60)
        restarted = time.monotonic()
        ended_at: dict[asyncio.Task[Any], float] = {}
        for _, t, _ in waits:
            t.add_done_callback(lambda t: ended_at.setdefault(t, time.monotonic()))
        await asyncio.to_thread(own_server.restart)
        # The hang detector: far past every waiter's own timeout.
        _, pending = await asyncio.wait([t for _, t, _ in waits], timeout=timeout + 30)
        assert not pending, f"{len(pending)} waiters still wait"
        ended = time.monotonic() - restarted
        outcomes = Counter([(kind, await outcome(t, t0, to)) for kind, t, to in waits])
        lost_after = max(
            ended_at[t] - restarted for _, t, _ in waits if isinstance(t.exception(), TaskLost)
        )
        after = await pause.send(99_999, 0.0)  # the workers go on
        assert await after.result(timeout=15) == 99_999
    finally:
        await app.close()
    print(f"\nrestart without persistence: {n_tasks} tasks; every TaskLost within "
          f"{lost_after:.2f} s of the restart, every waiter within {ended:.1f} s: "
          f"{dict(sorted(outcomes.items()))}")  # fmt: skip
    kinds = {k for k, _ in outcomes}
    assert kinds == {"task", "chain", "forever", "updates"}
    assert outcomes[("task", "TaskLost")] > 0  # the queued and scheduled ones
    assert outcomes[("task", "result")] > 0  # the ones finished before the restart
    for w in workers:
        out = w.output()
        assert w.proc.poll() is None, out
        assert out.count("LOST DATA") == 1, out
        assert "Traceback" not in out, out
