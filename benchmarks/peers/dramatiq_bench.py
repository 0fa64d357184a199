"""dramatiq (Redis broker) peer benchmark.

Enqueue: ``actor.send()`` in a plain loop (dramatiq has no batch API and a sync client).
Worker: ``python -m dramatiq dramatiq_bench:broker --processes 1 --threads C``, other
settings default.
Round trip: ``send`` + ``Message.get_result(block=True)`` from the Results middleware with
the Redis backend, which blocks on BRPOPLPUSH (no polling).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _peerbench as pb

try:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend
except ImportError as exc:
    pb.skip_missing("dramatiq", exc)

PROBE = pb.Probe()


def _noop() -> None:
    PROBE.hit()


def _echo(i: int) -> int:
    return i


class App:
    """A dramatiq Redis broker with the Results middleware and the benchmark actors."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        # dramatiq's broker and results classes are untyped, hence the ignores.
        self.broker = RedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
        # use_namespace_prefix_keys only makes result keys carry the namespace (for cleanup);
        # by default they are hashed.
        backend = RedisBackend(  # type: ignore[no-untyped-call]
            url=redis_url, namespace=namespace, use_namespace_prefix_keys=True
        )
        self.broker.add_middleware(Results(backend=backend))  # type: ignore[no-untyped-call]
        dramatiq.set_broker(self.broker)
        self.noop: dramatiq.Actor[[], None] = dramatiq.actor(actor_name="noop", broker=self.broker)(
            _noop
        )
        self.echo: dramatiq.Actor[[int], int] = dramatiq.actor(
            actor_name="echo", broker=self.broker, store_results=True
        )(_echo)


# Worker side: the dramatiq CLI imports this module and reads ``broker``.
_env = pb.worker_env()
if _env is not None:
    broker = App(_env.redis_url, _env.namespace).broker


class DramatiqClient:
    def __init__(self, app: App) -> None:
        self.app = app

    async def enqueue_noops(self, n: int) -> None:
        for _ in range(n):
            self.app.noop.send()

    async def echo(self, i: int, timeout: float) -> Any:
        message = self.app.echo.send(i)
        # Blocking, second-granularity timeout in ms (the backend ignores sub-second parts).
        return message.get_result(block=True, timeout=int(timeout * 1000))


@asynccontextmanager
async def client(cfg: pb.Config) -> AsyncIterator[DramatiqClient]:
    app = App(cfg.redis_url, cfg.namespace)
    try:
        yield DramatiqClient(app)
    finally:
        app.broker.close()


def worker_argv(cfg: pb.Config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dramatiq",
        "dramatiq_bench:broker",
        "--processes",
        "1",
        "--threads",
        str(cfg.concurrency),
    ]


SPEC = pb.Spec(
    library="dramatiq",
    dist="dramatiq",
    notes=(
        "sync client, no batch API: actor.send() in a loop; worker --processes 1 "
        "(default = CPU count) --threads C; rss is the forked worker process; noop has "
        "store_results=False (dramatiq's default), echo uses Results+RedisBackend "
        "get_result(block=True) = BRPOPLPUSH, no polling"
    ),
    client=client,
    worker_argv=worker_argv,
)

if __name__ == "__main__":
    pb.main(SPEC)
