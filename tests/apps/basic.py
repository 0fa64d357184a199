"""Tasks for worker subprocesses started by the `spawn_worker` fixture."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from aiotasks import App, current_task

app = App(
    namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"),
    visibility_timeout=float(os.environ.get("AIOTASKS_TEST_VT", "1")),
)


@app.task
async def add(x: int, y: int) -> int:
    return x + y


@app.task
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task
async def count_runs(key: str, seconds: float = 0.0) -> int:
    """Counts its own executions in Redis, then sleeps."""
    r = current_task().app.client.redis
    n = int(await r.incr(key))
    await asyncio.sleep(seconds)
    return n


@app.task
def blocking_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task
async def suicide() -> None:
    """Kills its own worker, every time it runs."""
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
async def slow_suicide(seconds: float) -> None:
    """Kills its own worker `seconds` into every run (the tasks beside it die too)."""
    await asyncio.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
async def boom() -> None:
    raise ValueError("boom")


@app.task
async def gc_settings() -> list[int]:
    """The worker process's collector settings: its thresholds and frozen object count."""
    import gc

    return [*gc.get_threshold(), gc.get_freeze_count()]


@app.task
async def tally(results: list[int], key: str) -> int:
    """A chord body that appends `key` to $AIOTASKS_TEST_RUNS (a file, so counting runs
    needs no Redis); returns the headers' sum."""
    with open(os.environ["AIOTASKS_TEST_RUNS"], "a") as f:
        f.write(key + "\n")
    return sum(results)
