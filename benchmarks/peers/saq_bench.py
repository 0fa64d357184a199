"""saq peer benchmark.

Enqueue: ``Queue.enqueue`` (saq has no batch enqueue; ``Queue.map`` also waits for results),
100 calls in flight.
Worker: ``python -m saq saq_bench.settings`` with ``concurrency=C``, other settings default.
Round trip: ``Queue.apply`` which polls the job every 0.5 s by default.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    from saq import Queue
except ImportError as exc:
    pb.skip_missing("saq", exc)

PROBE = pb.Probe()


async def noop(ctx: dict[str, Any]) -> None:
    PROBE.hit()


async def echo(ctx: dict[str, Any], *, i: int) -> int:
    return i


# Worker side: the saq CLI imports this module and reads ``settings``.
_env = pb.worker_env()
if _env is not None:
    settings: dict[str, Any] = {
        "queue": Queue.from_url(_env.redis_url, name=_env.namespace),
        "functions": [noop, echo],
        "concurrency": _env.concurrency,
    }


class SaqClient:
    def __init__(self, queue: Queue, namespace: str) -> None:
        self.queue = queue
        self.ns = namespace

    # Explicit job keys only so that every key, including saq:abort:<key>, carries the
    # run's namespace and can be cleaned up; saq's default key is a uuid1.
    async def enqueue_noops(self, n: int) -> None:
        await pb.run_lanes(n, lambda i: self.queue.enqueue("noop", key=f"{self.ns}:n{i}"))

    async def echo(self, i: int, timeout: float) -> Any:
        # apply() waits forever by default; the driver's overall timeout bounds it.
        return await self.queue.apply("echo", key=f"{self.ns}:e{i}", i=i)


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[SaqClient]:
    queue = Queue.from_url(cfg.redis_url, name=cfg.namespace)
    await queue.connect()
    try:
        yield SaqClient(queue, cfg.namespace)
    finally:
        await queue.disconnect()


def worker_argv(cfg: pb.Config) -> list[str]:
    return [sys.executable, "-m", "saq", "saq_bench.settings"]


SPEC = pb.Spec(
    library="saq",
    dist="saq",
    notes=(
        "no batch enqueue API: Queue.enqueue with 100 in flight; worker concurrency=C "
        "(dequeue via BLMOVE, no polling); Queue.apply() polls the job every 0.5s by "
        "default and sleeps once more after seeing the result, so a round trip is ~1s "
        "(job.refresh(until_complete) would use pub/sub instead); namespaced job keys"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
