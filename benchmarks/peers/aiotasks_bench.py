"""aiotasks benchmark, by the same protocol as the peers (see _peerbench.py).

Enqueue: ``Task.send_many`` in batches of 1,000 (one round trip per batch).
Worker: ``python -m aiotasks run aiotasks_bench:app --concurrency C``, defaults otherwise
(uvloop, result stored, leases kept; the no-op sets no timeout, as the peers' do not).
Round trip: ``await (await echo.send(i)).result()``, woken by pub/sub (no polling).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

from aiotasks import App

PROBE = pb.Probe()
_env = pb.worker_env()
app = App(
    redis_url=_env.redis_url if _env else None,
    namespace=_env.namespace if _env else "aiotasks-bench",
)


@app.task(name="noop")
async def noop() -> None:
    PROBE.hit()


@app.task(name="echo")
async def echo(i: int) -> int:
    return i


BATCH = 1000


class AiotasksClient:
    def __init__(self, client_app: App) -> None:
        self.app = client_app

    async def enqueue_noops(self, n: int) -> None:
        for start in range(0, n, BATCH):
            calls: list[tuple[tuple[Any, ...], dict[str, Any] | None]] = [
                ((), None) for _ in range(min(BATCH, n - start))
            ]
            await noop.send_many(calls)

    async def echo(self, i: int, timeout: float) -> Any:
        return await (await echo.send(i)).result(timeout=timeout)


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[AiotasksClient]:
    app.configure(redis_url=cfg.redis_url, namespace=cfg.namespace)
    async with app:
        yield AiotasksClient(app)


def worker_argv(cfg: pb.Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "aiotasks",
        "run",
        "aiotasks_bench:app",
        "--concurrency",
        str(cfg.concurrency),
        "--redis-url",
        cfg.redis_url,
    ]


SPEC = pb.Spec(
    library="aiotasks",
    dist="aiotasks-streams",
    notes="send_many batches of 1000; result() woken by pub/sub",
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
