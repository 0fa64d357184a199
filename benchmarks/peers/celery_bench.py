"""celery (Redis broker + Redis result backend) peer benchmark.

Enqueue: ``task.delay()`` in a plain loop (sync client; ``group`` also sends one message
per task).
Worker: ``python -m celery -A celery_bench worker --pool threads --concurrency C``, other
settings default (prefetch multiplier 4, mingle/gossip/heartbeat on, loglevel WARNING).
Round trip: ``delay`` + ``AsyncResult.get()``, which waits on Redis pub/sub (no polling).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    from celery import Celery, Task
except ImportError as exc:
    pb.skip_missing("celery", exc)

PROBE = pb.Probe()


def _noop() -> None:
    PROBE.hit()


def _echo(i: int) -> int:
    return i


class App:
    """A Celery app whose every Redis key (broker and results) starts with the namespace."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.celery = Celery("peerbench", broker=redis_url, backend=redis_url)
        prefix = {"global_keyprefix": f"{namespace}:"}
        self.celery.conf.update(
            task_default_queue=namespace,
            broker_transport_options=prefix,
            result_backend_transport_options=prefix,
            broker_connection_retry_on_startup=True,
        )
        self.noop: Task[[], None] = self.celery.task(name="noop")(_noop)
        self.echo: Task[[int], int] = self.celery.task(name="echo")(_echo)


# Worker side: ``celery -A celery_bench`` imports this module and reads ``app``.
_env = pb.worker_env()
if _env is not None:
    app = App(_env.redis_url, _env.namespace).celery


class CeleryClient:
    def __init__(self, app: App) -> None:
        self.app = app

    async def enqueue_noops(self, n: int) -> None:
        for _ in range(n):
            self.app.noop.delay()

    async def echo(self, i: int, timeout: float) -> Any:
        return self.app.echo.delay(i).get(timeout=timeout)


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[CeleryClient]:
    app = App(cfg.redis_url, cfg.namespace)
    try:
        yield CeleryClient(app)
    finally:
        app.celery.close()


def worker_argv(cfg: pb.Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_bench",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(cfg.concurrency),
    ]


SPEC = pb.Spec(
    library="celery",
    dist="celery",
    notes=(
        "sync client, no batch API: delay() in a loop; worker --pool threads "
        "--concurrency C, prefetch multiplier 4; noop results are stored (celery's "
        "default with a backend); AsyncResult.get() waits on pub/sub, no polling; "
        "global_keyprefix for broker and backend keys (cleanup only)"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
