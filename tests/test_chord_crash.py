"""Chords under worker crashes: real worker processes, SIGKILL, SIGSTOP.

A header's result is stored and its entry acked by one Lua call, so "stored but not
acked" cannot happen. What can happen is a header that runs twice: its worker dies
after the task's side effects (it is redelivered and runs again), or its worker stalls
past the visibility timeout (another worker reruns it) and then wakes and commits its
own result too. Either way each header counts once and the body runs exactly once,
with every result in header order.

The worker subprocesses run tests.apps.canvas with visibility_timeout=1 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiotasks import App, Signature, TaskState, chord
from tests.helpers import pid_of, wait_consuming, wait_until

pytestmark = pytest.mark.slow

Spawn = Callable[..., Any]
MODULE = "canvas"


def sig(app: App, name: str, *args: Any, **options: Any) -> Signature:
    """A signature of a tests.apps.canvas task, sent through the test's App."""
    return Signature(f"tests.apps.canvas.{name}", args, app=app, options=options)


def key(app: App, name: str) -> str:
    return f"{app.client.keys.prefix}test:{name}"


async def runs(app: App) -> dict[int, int]:
    raw = await app.client.redis.hgetall(key(app, "runs"))
    return {int(k): int(v) for k, v in raw.items()}


async def body_runs(app: App) -> int:
    return int(await app.client.redis.get(key(app, "body")) or 0)


async def chord_id(app: App) -> str:
    pattern = f"{app.client.keys.prefix}chord:*"
    ids = {k.decode().split(":")[2] async for k in app.client.redis.scan_iter(match=pattern)}
    assert len(ids) == 1, ids
    return ids.pop()


async def test_header_rerun_after_sigkill_counts_once(app: App, spawn_worker: Spawn) -> None:
    """Header 3 kills its worker after its side effect; the rerun settles it, once."""
    w1, w2 = spawn_worker(module=MODULE), spawn_worker(module=MODULE)
    await wait_consuming(app, w1, w2)
    n, victim = 10, 3
    h = await chord(
        [sig(app, "header", i, victim, 0.2) for i in range(n)], sig(app, "body_count")
    ).send()

    assert await h.result(timeout=30) == [i * 3 for i in range(n)]
    dead = [w for w in (w1, w2) if w.proc.poll() is not None]
    assert [w.proc.returncode for w in dead] == [-signal.SIGKILL], "exactly one worker died"
    survivor = w2 if dead[0] is w1 else w1
    assert survivor.proc.poll() is None
    assert "reclaimed entry" in survivor.output()

    await asyncio.sleep(1.5)  # anything left to redeliver would have run by now
    counted = await runs(app)
    assert counted[victim] == 2, counted
    assert set(counted) == set(range(n))
    assert await body_runs(app) == 1
    cid = await chord_id(app)
    chord_hash = await app.client.redis.hgetall(app.client.keys.chord(cid))
    assert int(chord_hash[b"done"]) == n
    assert chord_hash[b"fired"] == b"body"


async def test_big_chord_survives_a_worker_sigkilled_midway(app: App, spawn_worker: Spawn) -> None:
    """200 headers on three workers; one is SIGKILLed mid-way; the body runs exactly once."""
    procs = [spawn_worker("--concurrency", "4", module=MODULE) for _ in range(3)]
    await wait_consuming(app, *procs)
    n = 200
    h = await chord(
        # Each header sleeps 0.4 s after counting its run: wide enough that the victim is
        # still inside one when it is killed, even on a loaded machine.
        [sig(app, "header", i, -1, 0.4, task_id=f"hdr-{i}") for i in range(n)],
        sig(app, "body_count"),
    ).send()
    cid = await chord_id(app)
    ck = app.client.keys.chord(cid)
    victim = procs[0]

    async def a_third_done() -> bool:
        return int(await app.client.redis.hget(ck, "done") or 0) >= n // 3

    async def victim_mid_header() -> bool:
        """The victim runs a header that has counted its run and started less than 0.2 s
        ago, so it is still inside its 0.4 s sleep when the kill lands (one that read
        STARTED at its end might have stored its result meanwhile)."""
        counted = list(await runs(app))
        async with app.client.redis.pipeline(transaction=False) as pipe:
            for i in counted:
                pipe.hmget(app.client.keys.task(f"hdr-{i}"), "state", "worker", "started_at")
            rows = await pipe.execute()
        now_ms = time.time() * 1000
        return any(
            state == b"STARTED"
            and pid_of(worker.decode()) == victim.pid
            and now_ms - int(started) < 200
            for state, worker, started in rows
            if worker and started
        )

    await wait_until(a_third_done, 20, "a third of the headers")
    await wait_until(victim_mid_header, 10, "the victim to be in the middle of a header")
    victim.kill()
    assert victim.proc.returncode == -signal.SIGKILL

    assert await h.result(timeout=40) == [i * 3 for i in range(n)]
    await asyncio.sleep(1.5)
    assert await body_runs(app) == 1
    counted = await runs(app)
    assert set(counted) == set(range(n))
    # The killed worker held running headers: they ran again elsewhere, and counted once.
    assert sum(counted.values()) > n, "the SIGKILL interrupted no header"
    chord_hash = await app.client.redis.hgetall(ck)
    assert int(chord_hash[b"done"]) == n
    assert chord_hash[b"fired"] == b"body"
    for p in procs[1:]:
        assert p.proc.poll() is None


async def test_stalled_worker_committing_a_rerun_header_late_counts_once(
    app: App, spawn_worker: Spawn
) -> None:
    """A worker frozen past the visibility timeout: its header is rerun and stored by
    another worker, then the frozen one wakes and stores the same header again. The
    duplicate is ignored: the chord still waits for its other header, fires once."""
    r = app.client.redis
    w1 = spawn_worker(module=MODULE)
    await wait_consuming(app, w1)
    h = await chord(
        [sig(app, "stall", 0, 2.0, task_id="stall-0"), sig(app, "gate", 1, task_id="gate-1")],
        sig(app, "body_count"),
    ).send()
    cid = await chord_id(app)

    async def both_started() -> bool:
        return (await runs(app)).keys() == {0, 1}

    await wait_until(both_started, 10, "both headers to start on the first worker")
    w1.signal(signal.SIGSTOP)
    try:
        w2 = spawn_worker(module=MODULE)
        await wait_consuming(app, w2)
        stalled = app.handle("stall-0")

        async def rerun_stored() -> bool:
            info = await stalled.info()
            return info.state == TaskState.SUCCESS and pid_of(info.worker) == w2.pid

        await wait_until(rerun_stored, 15, "the second worker to rerun and store header 0")
        assert (await runs(app))[0] == 2
        assert int(await r.hget(app.client.keys.chord(cid), "done")) == 1
    finally:
        w1.signal(signal.SIGCONT)

    async def late_commit_landed() -> bool:
        return pid_of((await stalled.info()).worker) == w1.pid

    await wait_until(late_commit_landed, 10, "the woken worker to store header 0 again")
    # The duplicate did not count: the chord still waits for the gate.
    assert int(await r.hget(app.client.keys.chord(cid), "done")) == 1
    assert await body_runs(app) == 0
    assert await h.state() == TaskState.PENDING

    await r.set(key(app, "open"), 1)
    assert await h.result(timeout=15) == [0, 3]
    await asyncio.sleep(1.0)
    assert await body_runs(app) == 1
    chord_hash = await r.hgetall(app.client.keys.chord(cid))
    assert int(chord_hash[b"done"]) == 2
    assert w1.proc.poll() is None
    assert w2.proc.poll() is None
