"""Soak drills with real worker processes and real signals.

SIGKILL: 5,000 tasks, three workers, one killed and restarted every second. Every task must
end SUCCESS and none may be lost; tasks held by a killed worker run again (at-least-once),
and the drill reports how many ran more than once.

SIGTERM: rolling graceful stops over a backlog. Nothing is left pending on a stopped
worker's consumer, and every task runs exactly once.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiotasks import App, Task, TaskHandle
from aiotasks.keys import GROUP
from tests.helpers import pid_of, wait_consuming

N_TASKS = 5000
N_WORKERS = 3
CONCURRENCY = 20
KILL_EVERY = 1.0
SOAK = "tests.apps.reliability.soak"
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def soak_keys(app: App) -> tuple[str, str]:
    """The drill task's bookkeeping: a hash of runs per task, a set of finished tasks."""
    prefix = app.client.keys.prefix
    return prefix + "soak:runs", prefix + "soak:done"


def stand_in(app: App) -> Task[[int, float], int]:
    """A client-side task with the worker task's name, so the client can use send_many."""

    @app.task(name=SOAK)
    async def soak(i: int, seconds: float) -> int:
        raise AssertionError("runs on the workers only")

    return soak


async def run_with_kills(app: App, start: Callable[[], Any], done_key: str) -> int:
    """Until every task has finished once, SIGKILL one worker a second (in turn) and start
    a new one in its place. Returns the number of kills."""
    r = app.client.redis
    workers = [start() for _ in range(N_WORKERS)]
    kills, victim = 0, 0
    deadline = time.monotonic() + 120
    next_kill = time.monotonic() + KILL_EVERY
    while (done := int(await r.scard(done_key))) < N_TASKS:
        assert time.monotonic() < deadline, f"only {done}/{N_TASKS} done after 120 s"
        if time.monotonic() >= next_kill:
            workers[victim].kill()
            kills += 1
            workers[victim] = start()
            victim = (victim + 1) % N_WORKERS
            next_kill += KILL_EVERY
        await asyncio.sleep(0.05)
    return kills


async def settled_rows(app: App, handles: list[TaskHandle[Any]]) -> list[tuple[str, int]]:
    """(state, attempts) of every task, once all are final (or after 30 s, as they are).

    A worker killed between a task's last line and its commit leaves it STARTED: it
    finishes on a redelivery, a little after its `done` mark.
    """
    r, keys = app.client.redis, app.client.keys
    deadline = time.monotonic() + 30
    while True:
        async with r.pipeline(transaction=False) as pipe:
            for h in handles:
                pipe.hmget(keys.task(h.id), "state", "attempts")
            raw = await pipe.execute()
        rows = [((s or b"?").decode(), int(a or 0)) for s, a in raw]
        if all(s in FINAL for s, _ in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_soak_sigkill_every_second_loses_nothing(app: App, spawn_worker: Any) -> None:
    r = app.client.redis
    keys = app.client.keys
    runs_key, done_key = soak_keys(app)
    soak = stand_in(app)

    def start() -> Any:
        return spawn_worker("--concurrency", str(CONCURRENCY), module="reliability")

    rng = random.Random(1234)
    calls = [((i, round(rng.uniform(0.0, 0.2), 3)), None) for i in range(N_TASKS)]
    t0 = time.monotonic()
    handles: list[TaskHandle[Any]] = []
    for chunk in range(0, N_TASKS, 500):
        handles += await soak.send_many(calls[chunk : chunk + 500])
    sent_in = time.monotonic() - t0

    kills = await run_with_kills(app, start, done_key)
    rows = await settled_rows(app, handles)  # no more kills from here on
    elapsed = time.monotonic() - t0

    runs = {int(k): int(v) for k, v in (await r.hgetall(runs_key)).items()}
    done_ids = {int(x) for x in await r.smembers(done_key)}
    not_success = [(h.id, s) for h, (s, _) in zip(handles, rows, strict=True) if s != "SUCCESS"]
    ran_twice = sum(1 for n in runs.values() if n > 1)
    redelivered = sum(1 for _, a in rows if a > 1)
    print(
        f"\nsoak: {N_TASKS} tasks, {N_WORKERS} workers x {CONCURRENCY}, {kills} SIGKILLs; "
        f"sent in {sent_in:.2f} s, all SUCCESS in {elapsed:.1f} s; "
        f"{ran_twice} started more than once (max {max(runs.values())} runs), "
        f"{redelivered} finished on a redelivery (attempts > 1)"
    )

    assert not_success == [], f"{len(not_success)} not SUCCESS, e.g. {not_success[:5]}"
    assert done_ids == set(range(N_TASKS))
    assert set(runs) == set(range(N_TASKS))
    assert kills >= 3, "the drill ended before it killed anything much"
    # At-least-once, not at-will: only what a killed worker held (at most its
    # concurrency) can run again.
    assert ran_twice <= kills * CONCURRENCY
    # Nothing is left behind: no queued or pending entry, nothing scheduled.
    for stream in keys.streams("default"):
        assert await r.xlen(stream) == 0
    assert await r.zcard(keys.delayed) == 0


@pytest.mark.slow
@pytest.mark.timeout(360)
async def test_rolling_sigterms_run_every_task_exactly_once(app: App, spawn_worker: Any) -> None:
    """Graceful stops, one every 0.4 s in turn, over a backlog of short tasks: a stopping
    worker finishes what it runs and gives back what it read ahead, so nothing is left
    pending on its consumer and nothing runs twice."""
    n_tasks = 4000
    r = app.client.redis
    keys = app.client.keys
    runs_key, done_key = soak_keys(app)
    soak = stand_in(app)

    handles: list[TaskHandle[Any]] = []
    for chunk in range(0, n_tasks, 500):
        handles += await soak.send_many([((i, 0.003), None) for i in range(chunk, chunk + 500)])

    def start() -> Any:
        return spawn_worker("--concurrency", "4", module="reliability")

    async def left_pending(pid: int) -> int:
        total = 0
        for stream in keys.streams("default"):
            if not await r.exists(stream):
                continue
            for c in await r.xinfo_consumers(stream, GROUP):
                if pid_of(c["name"].decode()) == pid:
                    total += int(c["pending"])
        return total

    workers = [start(), start()]
    stops, victim = 0, 0
    # 92-121 s on a 2-core machine with Python 3.13 (the code of stops 41 and 42 alike):
    # a budget of 120 s failed CI there, with nothing lost or run twice.
    deadline = time.monotonic() + 300
    while int(await r.scard(done_key)) < n_tasks:
        assert time.monotonic() < deadline, "the drill did not finish in 300 s"
        await asyncio.sleep(0.4)
        w = workers[victim]
        await wait_consuming(app, w)  # a SIGTERM before its handlers exist just kills it
        w.signal(signal.SIGTERM)
        code = await asyncio.to_thread(w.wait, 15)
        assert code == 0, w.output()
        assert await left_pending(w.pid) == 0, w.output()
        stops += 1
        workers[victim] = start()
        victim = (victim + 1) % 2

    assert [await h.result(timeout=30) for h in handles] == list(range(n_tasks))
    runs = {int(k): int(v) for k, v in (await r.hgetall(runs_key)).items()}
    assert runs == dict.fromkeys(range(n_tasks), 1)
    print(f"\nrolling SIGTERMs: {n_tasks} tasks, {stops} graceful stops, each ran once")
    assert stops >= 3, "the drill ended before it stopped anything much"
