"""taskiq (+ taskiq-redis) peer benchmark.

Broker: ``RedisStreamBroker`` with ``RedisAsyncResultBackend`` (the pairing taskiq-redis's
README shows first).
Enqueue: ``task.kiq()`` (taskiq has no batch API), 100 calls in flight.
Worker: ``python -m taskiq worker taskiq_bench:broker --workers 1 --max-async-tasks C``,
other settings default.
Round trip: ``kiq`` + ``wait_result()``, which polls every 0.2 s by default.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    from taskiq import AsyncBroker
    from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker
except ImportError as exc:
    pb.skip_missing("taskiq", exc)

PROBE = pb.Probe()


class App:
    """A taskiq broker (stream broker + Redis result backend) with the benchmark tasks."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
            redis_url=redis_url, prefix_str=namespace
        )
        self.broker: AsyncBroker = RedisStreamBroker(
            url=redis_url, queue_name=namespace
        ).with_result_backend(backend)

        @self.broker.task(task_name="noop")
        async def noop() -> None:
            PROBE.hit()

        @self.broker.task(task_name="echo")
        async def echo(i: int) -> int:
            return i

        self.noop = noop
        self.echo = echo


# Worker side: the taskiq CLI imports this module and reads ``broker``.
_env = pb.worker_env()
if _env is not None:
    broker = App(_env.redis_url, _env.namespace).broker


class TaskiqClient:
    def __init__(self, app: App) -> None:
        self.app = app

    async def enqueue_noops(self, n: int) -> None:
        await pb.run_lanes(n, lambda _i: self.app.noop.kiq())

    async def echo(self, i: int, timeout: float) -> Any:
        task = await self.app.echo.kiq(i)
        result = await task.wait_result(timeout=timeout)
        return result.raise_for_error().return_value


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[TaskiqClient]:
    app = App(cfg.redis_url, cfg.namespace)
    # startup() also creates the consumer group at "$", before anything is enqueued,
    # so the worker that starts later sees the backlog.
    await app.broker.startup()
    try:
        yield TaskiqClient(app)
    finally:
        await app.broker.shutdown()


def worker_argv(cfg: pb.Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "taskiq",
        "worker",
        "taskiq_bench:broker",
        "--workers",
        "1",
        "--max-async-tasks",
        str(cfg.concurrency),
    ]


SPEC = pb.Spec(
    library="taskiq",
    dist="taskiq",
    notes=(
        "RedisStreamBroker + RedisAsyncResultBackend; no batch enqueue API: kiq() with 100 "
        "in flight; worker --workers 1 (default is 2) --max-async-tasks C; "
        "wait_result() polls every 0.2s by default; taskiq-redis version in "
        "the environment matters (see README)"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
