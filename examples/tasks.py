"""The demo's tasks: `aiotasks run examples.tasks:app` runs a worker for them."""

from __future__ import annotations

import asyncio
import os

from aiotasks import App, current_task

app = App(namespace=os.environ.get("AIOTASKS_NAMESPACE", "aiotasks-demo"))


@app.task
async def add(x: int, y: int) -> int:
    """Add two numbers."""
    return x + y


@app.task(max_retries=2, retry_backoff=0.1, autoretry_for=(ConnectionError,))
async def flaky(fail_times: int) -> str:
    """Fails with ConnectionError `fail_times` times, then succeeds (retried with backoff)."""
    attempt = current_task().attempt
    if attempt <= fail_times:
        raise ConnectionError(f"attempt {attempt} failed")
    return f"succeeded on attempt {attempt}"


@app.task
async def divide(x: float, y: float) -> float:
    """Divide; dividing by zero fails the task."""
    return x / y


@app.task
def word_count(text: str) -> int:
    """A plain `def` task: runs in a worker thread."""
    return len(text.split())


@app.task
async def tsum(numbers: list[int]) -> int:
    """Sum a list: the body of the demo's chord."""
    await asyncio.sleep(0)
    return sum(numbers)
