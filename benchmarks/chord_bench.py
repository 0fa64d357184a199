"""Chord benchmark: a 10,000-header no-op chord against 10,000 plain no-op tasks.

    python benchmarks/chord_bench.py --redis-url URL [--headers 10000] [--concurrency 32]

One process: an in-process worker (concurrency 32) on the same event loop as the client,
on a fresh namespace whose keys are deleted at the end (the server is never flushed).

- chord_s: from `chord([noop.s()] * N, count.s()).send()` to the body's result (the body
  checks that it got N results).
- plain_s: `noop.send_many(N calls)` in one round trip, then waiting for every result.
- ratio: chord_s / plain_s, the price of counting the headers and running the body.
- chord_peak_bytes: MEMORY USAGE of the chord's own keys (its counter hash and its
  results hash) at their peak, which is when the body starts: the results hash only
  grows, and both live until the result TTL. The header tasks' own records cost what
  plain tasks cost; `used_memory_peak_delta` (INFO used_memory sampled before and
  during the run) shows everything together, and is approximate on a shared server.

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiotasks import App, GroupHandle, chord  # noqa: E402


def log(msg: str) -> None:
    print(f"[chord_bench] {msg}", file=sys.stderr, flush=True)


async def used_memory(redis: Any) -> int:
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"])


class MemorySampler:
    """Samples INFO used_memory every `interval` s while running; keeps the peak."""

    def __init__(self, redis: Any, interval: float = 0.05) -> None:
        self.redis = redis
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, await used_memory(self.redis))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> MemorySampler:
        self.peak = await used_memory(self.redis)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self.peak = max(self.peak, await used_memory(self.redis))


async def delete_namespace(redis: Any, namespace: str) -> int:
    """Delete every key of the namespace (SCAN + DEL; never FLUSH)."""
    keys = [k async for k in redis.scan_iter(match="{" + namespace + "}*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])
    return len(keys)


async def chord_keys(app: App) -> list[str]:
    pattern = f"{app.client.keys.prefix}chord:*"
    return [k.decode() async for k in app.client.redis.scan_iter(match=pattern, count=1000)]


async def forget(app: App, handles: list[Any]) -> None:
    """Forget the warm-up tasks so they do not count in the memory figures."""
    await app.client.redis.delete(*[app.client.keys.task(h.id) for h in handles])


async def run(url: str, headers: int, concurrency: int, timeout: float) -> dict[str, Any]:
    namespace = f"bench-chord-{uuid.uuid4().hex[:8]}"
    app = App(redis_url=url, namespace=namespace)

    @app.task(name="bench.noop")
    async def noop() -> None:
        return None

    @app.task(name="bench.count")
    async def count(results: list[Any]) -> int:
        return len(results)

    log(f"namespace {namespace}, {headers:,} headers, in-process worker c={concurrency}")
    async with app:
        redis = app.client.redis
        try:
            worker = app.worker(concurrency=concurrency)
            async with worker.running():
                # Warm up: connections, scripts, the worker's first fetches.
                warm = await noop.send_many([((), None)] * 200)
                await GroupHandle(app, warm).results(timeout=timeout)
                await forget(app, warm)

                mem_before = await used_memory(redis)
                async with MemorySampler(redis) as sampler:
                    t0 = time.perf_counter()
                    h = await chord([noop.s() for _ in range(headers)], count.s()).send()
                    got = await h.result(timeout=timeout)
                    chord_s = time.perf_counter() - t0
                if got != headers:
                    raise RuntimeError(f"the chord body got {got} results, not {headers}")
                keys = await chord_keys(app)
                chord_peak = 0
                for key in keys:
                    chord_peak += int(await redis.memory_usage(key, samples=0) or 0)
                ttl_ms = max([int(await redis.pttl(k)) for k in keys] or [0])
                used_delta = sampler.peak - mem_before
                log(f"chord: {chord_s:.3f} s, chord keys {chord_peak:,} B ({len(keys)} keys)")

                t0 = time.perf_counter()
                handles = await noop.send_many([((), None)] * headers)
                await GroupHandle(app, handles).results(timeout=timeout)
                plain_s = time.perf_counter() - t0
                log(f"plain: {plain_s:.3f} s")
        finally:
            deleted = await delete_namespace(redis, namespace)
            log(f"deleted {deleted:,} keys of {namespace}")

    ratio = chord_s / plain_s if plain_s else None
    return {
        "scenario": "chord",
        "headers": headers,
        "chord_s": round(chord_s, 3),
        "plain_s": round(plain_s, 3),
        "ratio": round(ratio, 3) if ratio is not None else None,
        "chord_peak_bytes": chord_peak,
        "chord_bytes_per_header": round(chord_peak / headers, 1) if headers else None,
        "used_memory_peak_delta": used_delta,
        "chord_keys_ttl_s": round(ttl_ms / 1000),
        "worker": f"in-process, concurrency {concurrency}",
        "summary": (
            f"{headers:,}-header chord {chord_s:.2f} s vs {headers:,} plain tasks "
            f"{plain_s:.2f} s (x{ratio:.2f}); chord state {chord_peak / 1e6:.2f} MB"
            if ratio is not None
            else f"{headers:,}-header chord {chord_s:.2f} s"
        ),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--redis-url", default=os.environ.get("AIOTASKS_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--headers", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    a = p.parse_args()
    result = asyncio.run(run(a.redis_url, a.headers, a.concurrency, a.timeout))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
