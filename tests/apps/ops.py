"""An App for the ops CLI tests (`--app tests.apps.ops:app`) and supervisor/metrics drills."""

from __future__ import annotations

import asyncio
import os

from aiotasks import App

app = App(namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"))


@app.task(name="ops.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="ops.boom")
async def boom() -> None:
    raise ValueError("boom")


@app.task(name="ops.sleep")
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds
