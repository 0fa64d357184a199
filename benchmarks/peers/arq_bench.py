"""arq peer benchmark.

Enqueue: ``ArqRedis.enqueue_job`` (arq has no batch API), 100 calls in flight.
Worker: ``python -m arq arq_bench.WorkerSettings`` with ``max_jobs=C``, other settings default.
Round trip: ``enqueue_job`` + ``Job.result()`` which polls Redis every 0.5 s by default.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    from arq import create_pool
    from arq.connections import ArqRedis, RedisSettings
except ImportError as exc:
    pb.skip_missing("arq", exc)

PROBE = pb.Probe()


async def noop(ctx: dict[str, Any]) -> None:
    PROBE.hit()


async def echo(ctx: dict[str, Any], i: int) -> int:
    return i


# Worker side: the arq CLI imports this module and reads WorkerSettings.
_env = pb.worker_env()
if _env is not None:
    WorkerSettings: dict[str, Any] = {
        "functions": [noop, echo],
        "redis_settings": RedisSettings.from_dsn(_env.redis_url),
        "queue_name": _env.namespace,
        "max_jobs": _env.concurrency,
    }


class ArqClient:
    def __init__(self, pool: ArqRedis, namespace: str) -> None:
        self.pool = pool
        self.ns = namespace

    async def _enqueue(self, function: str, job_id: str, *args: Any) -> Any:
        # Explicit job ids only so that every key (arq:job:<id>, arq:result:<id>) carries
        # the run's namespace and can be cleaned up; arq's default id is uuid4().hex.
        job = await self.pool.enqueue_job(function, *args, _job_id=job_id)
        if job is None:
            raise RuntimeError(f"arq refused duplicate job id {job_id}")
        return job

    async def enqueue_noops(self, n: int) -> None:
        await pb.run_lanes(n, lambda i: self._enqueue("noop", f"{self.ns}:n{i}"))

    async def echo(self, i: int, timeout: float) -> Any:
        job = await self._enqueue("echo", f"{self.ns}:e{i}", i)
        return await job.result(timeout=timeout)


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[ArqClient]:
    pool = await create_pool(
        RedisSettings.from_dsn(cfg.redis_url), default_queue_name=cfg.namespace
    )
    try:
        yield ArqClient(pool, cfg.namespace)
    finally:
        await pool.aclose()


def worker_argv(cfg: pb.Config) -> list[str]:
    return [sys.executable, "-m", "arq", "arq_bench.WorkerSettings"]


SPEC = pb.Spec(
    library="arq",
    dist="arq",
    notes=(
        "no batch enqueue API: enqueue_job with 100 in flight; worker max_jobs=C, "
        "poll_delay=0.5s default (idle worker polls the queue zset); Job.result() polls "
        "every 0.5s by default, so latency is dominated by the two polls; arq logs each "
        "job at INFO by default; explicit namespaced job ids for cleanup"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
