"""Chord tasks for the crash drills of tests/test_chord_crash.py.

Started as `aiotasks run tests.apps.canvas:app`: the App of tests/apps/basic.py (its
namespace from AIOTASKS_TEST_NAMESPACE), with the tasks below. Every task counts its
runs in Redis under `{ns}:test:...`, so the tests read from the server how often each
header and each body really ran.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from aiotasks import current_task
from tests.apps.basic import app

__all__ = ["app", "body_count", "gate", "header", "probe", "replacer", "stall", "victim"]


def _key(name: str) -> str:
    return f"{current_task().app.client.keys.prefix}test:{name}"


async def _count_run(i: int) -> None:
    await current_task().app.client.redis.hincrby(_key("runs"), str(i), 1)


@app.task
async def header(i: int, victim: int = -1, seconds: float = 0.0) -> int:
    """A chord header: counts its run (the side effect), then returns i * 3.

    Header `victim` SIGKILLs its own worker the first time it runs, after the side
    effect and before its result is stored, so it is redelivered and runs again.
    """
    await _count_run(i)
    if i == victim and await current_task().app.client.redis.set(_key("killed"), 1, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    if seconds:
        await asyncio.sleep(seconds)
    return i * 3


@app.task
async def stall(i: int, seconds: float) -> int:
    """Counts its run, sleeps `seconds` (the worker may be stopped meanwhile), returns i * 3."""
    await _count_run(i)
    await asyncio.sleep(seconds)
    return i * 3


@app.task
async def gate(i: int, limit: float = 30.0) -> int:
    """Counts its run, then waits (bounded) until `{ns}:test:open` exists; returns i * 3."""
    await _count_run(i)
    r = current_task().app.client.redis
    deadline = time.monotonic() + limit
    while not await r.exists(_key("open")):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate was never opened")
        await asyncio.sleep(0.05)
    return i * 3


@app.task
async def body_count(values: list[Any]) -> list[Any]:
    """A chord body: counts its executions (INCR `{ns}:test:body`), returns its input."""
    await current_task().app.client.redis.incr(_key("body"))
    return values


# -- the canvas crash drill of tests/test_canvas_crash.py ---------------------------------


async def _count(name: str) -> bool:
    """Counts a run under `name`, and under `first` a run of a first delivery (attempt 1:
    a redelivery counts 2 and up); True the first time `name` runs."""
    ctx = current_task()
    r = ctx.app.client.redis
    await r.hincrby(_key("runs"), name, 1)
    if ctx.attempt == 1:
        await r.hincrby(_key("first"), name, 1)
    return bool(await r.set(_key(f"killed:{name}"), 1, nx=True))


@app.task
async def victim(i: int, tag: str) -> int:
    """Counts its run under `tag`; its first run SIGKILLs its worker after that side
    effect, before the result is stored, so it is redelivered and runs again."""
    if await _count(tag):
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@app.task
async def probe(value: Any, name: str) -> Any:
    """A callback or a body: counts its run under `name`, returns `value`."""
    await _count(name)
    return value


@app.task
async def replacer(i: int) -> None:
    """Kills its worker on its first run; then replaces itself with probe(i * 10)."""
    if await _count("replacer"):
        os.kill(os.getpid(), signal.SIGKILL)
    raise current_task().replace(probe.s(i * 10, "replaced"))
