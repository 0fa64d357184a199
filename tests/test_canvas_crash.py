"""Canvas callbacks under worker crashes: real worker processes and SIGKILL.

Each parent task SIGKILLs its worker on its first run, after its side effect and before
its result is stored, so it runs again elsewhere (and again when the worker running it
again is killed by another parent's first run before it stores the result). What its
result sets off (link callbacks, the replacement of a task that replaces itself, the
group that ends a chain) is enqueued only by the Lua call that stores the result, so
each is enqueued exactly once (one first delivery), and nothing is left unfinished. A
child may still run again, redelivered: a worker running it can be killed by a parent's
first run on the same worker before the child's result is stored (at-least-once).

The worker subprocesses run tests.apps.canvas with visibility_timeout=2 s: long enough
that a worker starved of CPU on a busy two-core CI machine still renews its leases in
time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import pytest

from aiotasks import App, Signature, chain, group
from tests.helpers import wait_consuming

pytestmark = pytest.mark.slow

Spawn = Callable[..., Any]

VT = 2.0


def sig(app: App, name: str, *args: Any, **options: Any) -> Signature:
    return Signature(f"tests.apps.canvas.{name}", args, app=app, options=options)


async def runs(app: App) -> dict[str, int]:
    raw = await app.client.redis.hgetall(f"{app.client.keys.prefix}test:runs")
    return {k.decode(): int(v) for k, v in raw.items()}


async def first_runs(app: App) -> dict[str, int]:
    """Runs of a first delivery, by name: one per enqueue, whatever the redeliveries."""
    raw = await app.client.redis.hgetall(f"{app.client.keys.prefix}test:first")
    return {k.decode(): int(v) for k, v in raw.items()}


async def unfinished(app: App) -> list[tuple[str, bytes]]:
    r = app.client.redis
    out = []
    async for key in r.scan_iter(match=app.client.keys.task("*")):
        state = await r.hget(key, "state")
        if state not in (b"SUCCESS", b"FAILURE", b"REVOKED"):
            out.append((key.decode(), state))
    return out


async def test_sigkill_mid_callbacks_replace_and_chain_sets_each_off_once(
    app: App, spawn_worker: Spawn
) -> None:
    workers = [spawn_worker(module="canvas", env={"AIOTASKS_TEST_VT": str(VT)}) for _ in range(4)]
    await wait_consuming(app, *workers)

    linked = sig(app, "victim", 1, "link").set(
        link=[sig(app, "probe", "cb1"), sig(app, "probe", "cb2")],
        link_error=sig(app, "probe", None, "errback"),
    )
    h_link = await linked.send()
    h_replace = await sig(app, "replacer", 2).send()
    h_chain = await chain(
        sig(app, "victim", 3, "chain"), group(sig(app, "probe", "g"), sig(app, "probe", "g"))
    ).send()

    assert await h_link.result(timeout=30) == 1
    assert await h_replace.result(timeout=30) == 20
    assert await h_chain.result(timeout=30) == [3, 3]

    await asyncio.sleep(2 * VT)  # anything left to redeliver would have run by now
    counted = await runs(app)
    killed = [w for w in workers if w.proc.poll() is not None]
    assert 1 <= len(killed) <= 3
    assert all(w.proc.returncode == -signal.SIGKILL for w in killed)
    # Each parent ran again after the kill that cut its first run. A worker running a
    # redelivered parent can be killed by another parent's first run before it stores
    # that result, so a parent runs again once per kill at most (at-least-once).
    for parent in ("link", "chain", "replacer"):
        assert 2 <= counted[parent] <= 1 + len(killed), counted
    # What a stored result sets off is enqueued with it, by one Lua call: exactly once,
    # so one first delivery each. A kill of the worker running a child delivers it again.
    first = await first_runs(app)
    for child, members in (("cb1", 1), ("cb2", 1), ("replaced", 1), ("g", 2)):
        assert first[child] == members, (child, first, counted)
        assert members <= counted[child] <= members * (1 + len(killed)), (child, counted)
    assert "errback" not in counted
    assert await unfinished(app) == []
