"""pydocket peer benchmark.

Enqueue: ``Docket.add_many`` of ``Docket.call(noop)()`` specs (docket's batch API: pipelined
chunks of 1,000, its default).
Worker: ``python -m docket worker --tasks docket_bench:tasks --concurrency C``, other settings
default (``docket worker``'s own defaults: INFO logging, message_batch 1000, checks for work
every 100 ms at least).
Round trip: ``await docket.add(echo)(i)`` + ``Execution.get_result()``, which waits on the
task's state channel (pub/sub, no polling) and then reads the stored result.
pydocket needs redis-py >= 6, so it runs from its own venv (.venv-docket).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import _peerbench as pb

try:
    from docket import Docket
except ImportError as exc:
    pb.skip_missing("docket", exc)

PROBE = pb.Probe()


async def noop() -> None:
    PROBE.hit()


async def echo(i: int) -> int:
    return i


# Worker side: `docket worker --tasks docket_bench:tasks` registers this collection.
tasks = [noop, echo]


class DocketClient:
    def __init__(self, docket: Docket) -> None:
        self.docket = docket

    async def enqueue_noops(self, n: int) -> None:
        await self.docket.add_many([self.docket.call(noop)() for _ in range(n)])

    async def echo(self, i: int, timeout: float) -> Any:
        execution = await self.docket.add(echo)(i)
        return await execution.get_result(timeout=timedelta(seconds=timeout))


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[DocketClient]:
    # The docket's name prefixes every key it writes, so it is the run's namespace.
    async with Docket(name=cfg.namespace, url=cfg.redis_url) as docket:
        yield DocketClient(docket)


def worker_argv(cfg: pb.Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "docket",
        "worker",
        "--tasks",
        "docket_bench:tasks",
        "--docket",
        cfg.namespace,
        "--url",
        cfg.redis_url,
        "--concurrency",
        str(cfg.concurrency),
    ]


SPEC = pb.Spec(
    library="docket",
    dist="pydocket",
    notes=(
        "batched enqueue: Docket.add_many (pipelined chunks of 1000); worker concurrency=C, "
        "message_batch=1000 default; with all C slots busy the worker sleeps "
        "minimum_check_interval (100 ms default) before it looks again, which caps it near "
        "C per 100 ms; Execution.get_result() waits on pub/sub, no polling; "
        "the no-op returns None so no result is stored, but each run's state hash is kept "
        "15 min (execution_ttl default); docket logs two INFO lines per task by default"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
