"""RSS of a process whose result notifier hears N result notifications.

    python benchmarks/notifier_rss.py [--redis-url URL] [--messages 1000000] [--resp 2|3]

A listener process opens one App's notifier (aiotasks/notifier.py) and subscribes to its
reply channel, as every App that sends tasks does. This process then PUBLISHes result
notifications to that channel from a second connection, in pipelined batches, shaped as
the worker's finish script writes them (`<id>\\nSUCCESS\\nmsgpack\\n<result>`), and reads
the listener's RSS after a warm-up and at the end. `--resp 3` opens the notifier's
connection at RESP3 instead of its default, to show what it costs with hiredis.

After each batch the publisher waits for the listener to have read it, so Redis never
holds more than one batch in the subscriber's output buffer (its default limit would
drop a subscriber that falls 32 MB behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10_000  # notifications per synchronisation with the listener
PIPELINE = 1_000  # PUBLISHes per round trip
WARMUP = 50_000  # notifications before the first RSS reading
SYNC = "sync"  # the task id of the marker that ends each batch


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- the listener (a child process) ------------------------------------------------------


async def listen(url: str, resp: int) -> None:
    """Subscribe one notifier's reply channel; print `sync` each time a batch marker lands."""
    from redis.asyncio import Redis

    from aiotasks import App

    app = App(redis_url=url, namespace=f"bench-rss-{uuid.uuid4().hex[:8]}")
    notifier = app.client.notifier
    if resp != 2:
        # Replaces the connection before its first use (the benchmark's comparison only).
        notifier._redis = Redis.from_url(url, protocol=resp)
    async with notifier.watch_reply(SYNC) as marker:
        print(f"ready {notifier.reply_channel}", flush=True)
        while True:
            await marker.get()
            print(SYNC, flush=True)


# -- the publisher (this process) ---------------------------------------------------------


async def publish(url: str, channel: str, count: int, proc: subprocess.Popen[str]) -> None:
    """Publish `count` result notifications in batches, waiting for the listener after each."""
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    result = b"\x93\x01\x02\x03"  # msgpack [1, 2, 3]
    sent = 0
    try:
        while sent < count:
            n = min(BATCH, count - sent)
            for start in range(0, n, PIPELINE):
                async with redis.pipeline(transaction=False) as pipe:
                    for _ in range(min(PIPELINE, n - start)):
                        note = uuid.uuid4().hex.encode() + b"\nSUCCESS\nmsgpack\n" + result
                        pipe.publish(channel, note)
                    await pipe.execute()
            await redis.publish(channel, f"{SYNC}\nSUCCESS")
            await asyncio.to_thread(expect, proc.stdout, SYNC)
            sent += n
    finally:
        await redis.aclose()


def expect(stream: IO[str] | None, word: str) -> str:
    assert stream is not None
    line = stream.readline().strip()
    if not line.startswith(word):
        raise RuntimeError(f"listener said {line!r}, expected {word!r}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("AIOTASKS_REDIS_URL"))
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--resp", type=int, choices=(2, 3), default=2)
    parser.add_argument("--listen", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    url = args.redis_url or "redis://127.0.0.1:6379/0"
    if args.listen:
        asyncio.run(listen(url, args.resp))
        return
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, __file__, "--listen", "--redis-url", url, "--resp", str(args.resp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        channel = expect(proc.stdout, "ready").split()[1]
        asyncio.run(publish(url, channel, WARMUP, proc))
        before = rss_bytes(proc.pid)
        started = time.perf_counter()
        asyncio.run(publish(url, channel, args.messages, proc))
        elapsed = time.perf_counter() - started
        after = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    report(args, before, after, elapsed)


def report(args: Any, before: int, after: int, elapsed: float) -> None:
    import hiredis  # type: ignore[import-not-found,unused-ignore]
    import redis

    mb = 1024 * 1024
    per_message = (after - before) / args.messages
    print(
        f"notifier RESP{args.resp}, redis-py {redis.__version__}, hiredis {hiredis.__version__}:"
        f" {args.messages:,} notifications in {elapsed:.1f} s;"
        f" listener RSS {before / mb:.1f} MiB -> {after / mb:.1f} MiB"
        f" ({per_message:+.1f} bytes per notification)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "scenario": f"result notifier (RESP{args.resp}), {args.messages:,} results",
                "summary": f"listener RSS {before / mb:.1f} MiB -> {after / mb:.1f} MiB"
                f" ({per_message:+.1f} B per result)",
                "resp": args.resp,
                "messages": args.messages,
                "seconds": round(elapsed, 2),
                "rss_before": before,
                "rss_after": after,
                "bytes_per_message": round(per_message, 2),
                "redis_py": redis.__version__,
                "hiredis": hiredis.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
