"""streaq peer benchmark.

Enqueue: ``Worker.enqueue_many`` (streaq's batch API: one pipeline for all N tasks).
Worker: ``python -m streaq run streaq_bench:worker`` with ``concurrency=C``, other settings
default.
Round trip: ``await task.enqueue(i)`` + ``Task.result()``, which waits on pub/sub (no polling).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    from streaq import Worker
except ImportError as exc:
    pb.skip_missing("streaq", exc)

PROBE = pb.Probe()


class App:
    """A streaq Worker with the two benchmark tasks registered on it."""

    def __init__(self, redis_url: str, namespace: str, concurrency: int) -> None:
        self.worker: Worker[Any] = Worker(
            redis_url=redis_url, queue_name=namespace, concurrency=concurrency
        )

        @self.worker.task(name="noop")
        async def noop() -> None:
            PROBE.hit()

        @self.worker.task(name="echo")
        async def echo(i: int) -> int:
            return i

        self.noop = noop
        self.echo = echo


# Worker side: the streaq CLI imports this module and reads ``worker``.
_env = pb.worker_env()
if _env is not None:
    worker = App(_env.redis_url, _env.namespace, _env.concurrency).worker


class StreaqClient:
    def __init__(self, app: App) -> None:
        self.app = app

    async def enqueue_noops(self, n: int) -> None:
        await self.app.worker.enqueue_many([self.app.noop.enqueue() for _ in range(n)])

    async def echo(self, i: int, timeout: float) -> Any:
        task = await self.app.echo.enqueue(i)
        result = await task.result(timeout=int(timeout) + 1)
        return result.result


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[StreaqClient]:
    app = App(cfg.redis_url, cfg.namespace, cfg.concurrency)
    async with app.worker:
        yield StreaqClient(app)


def worker_argv(cfg: pb.Config) -> list[str]:
    return [sys.executable, "-m", "streaq", "run", "streaq_bench:worker"]


SPEC = pb.Spec(
    library="streaq",
    dist="streaq",
    notes=(
        "batched enqueue: Worker.enqueue_many (one pipeline); worker concurrency=C, "
        "prefetch default (=C extra); results via pub/sub, no polling; streaq logs two "
        "INFO lines per task by default; producer uses the same Worker object as client"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
