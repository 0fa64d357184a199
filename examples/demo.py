"""`make demo`: start a real worker, send real tasks (one fails), print what happened.

Runs against $AIOTASKS_REDIS_URL (make demo sets it: the local Redis, or an embedded
Valkey when none runs), in a namespace of its own that it deletes afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO

from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = f"aiotasks-demo-{uuid.uuid4().hex[:6]}"
os.environ["AIOTASKS_NAMESPACE"] = NAMESPACE
sys.path.insert(0, str(ROOT))

from aiotasks import TaskFailed, chord  # noqa: E402
from examples.tasks import add, app, divide, flaky, tsum, word_count  # noqa: E402


def start_worker(log: IO[bytes]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "aiotasks", "run", "examples.tasks:app", "--concurrency", "10"]
    print("$ aiotasks run examples.tasks:app --concurrency 10   (its log is shown at the end)")
    return subprocess.Popen(argv, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=log)


async def main() -> None:
    log = tempfile.TemporaryFile()
    worker = start_worker(log)
    try:
        async with app:
            await asyncio.sleep(1.0)  # let the banner print first
            print("\n--- sending tasks ---")
            h_add = await add.send(2, 3)
            h_words = await word_count.send("the quick brown fox")
            h_flaky = await flaky.send(2)
            h_div = await divide.send(1, 0)
            h_chord = await chord([add.s(i, i) for i in range(5)], tsum.s()).send()
            h_many = await add.send_many([((i, 1), None) for i in range(100)])

            print(f"add(2, 3)                  -> {await h_add.result(timeout=10)}")
            print(f"word_count(...)            -> {await h_words.result(timeout=10)}")
            print(f"flaky(2) (retried twice)   -> {await h_flaky.result(timeout=10)}")
            print(f"chord of 5 adds, then tsum -> {await h_chord.result(timeout=10)}")
            results = [await h.result(timeout=10) for h in h_many]
            print(f"send_many of 100 adds      -> {results[:5]} ... {results[-1]}")
            try:
                await h_div.result(timeout=10)
            except TaskFailed as exc:
                print(
                    f"divide(1, 0)               -> TaskFailed: {exc.exc_type}: {exc.exc_message}"
                )
            print("\n--- states ---")
            for name, h in [("add", h_add), ("flaky", h_flaky), ("divide", h_div)]:
                info = await h.info()
                print(
                    f"{name:8} {info.state.value:8} attempts={info.attempts} worker={info.worker}"
                )
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        log.seek(0)
        print("\n--- worker log (default level: warnings and failures) ---")
        text = log.read().decode(errors="replace").rstrip()
        print(text)
        if "may lose tasks" in text:
            print("(that warning is about the server this demo ran on; for production, see")
            print(" the README's 'Running Redis for aiotasks')")
        # Only once the worker is gone: a running worker recreates its queues' streams.
        left = await delete_namespace()
        done = "deleted" if not left else f"NOT deleted: {left} key(s) left"
        print(f"\nworker stopped (exit {code}); demo namespace {NAMESPACE} {done}")


async def delete_namespace() -> int:
    """Delete the demo's keys; how many are left afterwards (0 unless it failed)."""
    redis = Redis.from_url(app.settings.redis_url)
    try:
        match = "{" + NAMESPACE + "}*"
        keys = [k async for k in redis.scan_iter(match=match)]
        if keys:
            await redis.delete(*keys)
        return len([k async for k in redis.scan_iter(match=match)])
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
