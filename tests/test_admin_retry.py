"""Retrying a failed task with the arguments it failed with; reading a task's payload."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from aiotasks import App, TaskFailed, TaskState, Worker, chain, chord
from aiotasks.admin import Admin, CannotRetry, TaskNotFound
from aiotasks.payloads import ENTRY, FAILURE, SCHEDULED, read
from tests.helpers import runs_key

StartWorker = Callable[..., Awaitable[Worker]]


def register(app: App) -> tuple[object, object]:
    @app.task(name="retry.picky", max_retries=0)
    async def picky(x: int, *, label: str) -> str:
        """Fails until the test sets its key."""
        if not await app.client.redis.exists(runs_key(app, "allowed")):
            raise ValueError(f"not yet: {x}")
        return f"{label}:{x}"

    @app.task(name="retry.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return picky, add


async def test_a_failed_task_is_sent_again_with_its_arguments_under_its_id(
    app: App, worker: StartWorker
) -> None:
    picky, _ = register(app)
    await worker()
    h = await picky.options(soft_timeout=30).send(7, label="seven")  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed, match="not yet: 7"):
        await h.result(timeout=10)
    kept = await read(app.client, h.id)
    assert kept is not None and kept.source == FAILURE
    assert (kept.name, kept.args, kept.kwargs) == ("retry.picky", [7], {"label": "seven"})
    assert kept.send_options == {"soft_timeout": 30.0}

    await app.client.redis.set(runs_key(app, "allowed"), 1)
    done = await Admin(app).retry(h.id)
    assert "sent again" in done
    again = app.handle(h.id)  # the same id follows the new run
    assert await again.result(timeout=10) == "seven:7"
    info = await again.info()
    assert info.state == TaskState.SUCCESS and info.exc_type is None  # a clean record
    with pytest.raises(CannotRetry, match="only a FAILURE or REVOKED task"):
        await Admin(app).retry(h.id)


async def test_a_failed_chord_body_is_sent_again_with_its_header_results(
    app: App, worker: StartWorker
) -> None:
    """A body ran with its headers' results first, which its payload does not hold: a
    retry reads them from the chord again (a dashboard trial's Retry sent it with none,
    and it failed on a missing argument); once the chord is gone it says why."""
    _, add = register(app)

    @app.task(name="retry.total", max_retries=0)
    async def total(values: list[int], offset: int) -> int:
        if not await app.client.redis.exists(runs_key(app, "allowed")):
            raise ValueError("not yet")
        return sum(values) + offset

    await worker()
    h = await chord([add.s(1, 1), add.s(2, 2)], total.s(100)).send()  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed, match="not yet"):
        await h.result(timeout=10)
    await app.client.redis.set(runs_key(app, "allowed"), 1)
    assert "sent again" in await Admin(app).retry(h.id)
    assert await app.handle(h.id).result(timeout=10) == 106

    await app.client.redis.delete(runs_key(app, "allowed"))
    h = await chord([add.s(3, 3)], total.s(0)).send()  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed, match="not yet"):
        await h.result(timeout=10)
    for key in await app.client.redis.keys(f"{app.client.keys.prefix}chord:*"):
        await app.client.redis.delete(key)  # the chord's ttl passed
    with pytest.raises(CannotRetry, match="header results are no longer kept"):
        await Admin(app).retry(h.id)


async def test_what_cannot_be_retried_says_why(app: App, worker: StartWorker) -> None:
    picky, add = register(app)
    with pytest.raises(TaskNotFound):
        await Admin(app).retry("no-such-task")
    await worker()
    # The chain's second step fails without ever running: no arguments were kept.
    h = await chain(picky.s(1, label="a"), add.s(1)).send()  # type: ignore[attr-defined]
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    with pytest.raises(CannotRetry, match="no longer known"):
        await Admin(app).retry(h.id)


async def test_the_payload_of_a_queued_and_a_scheduled_task(app: App) -> None:
    _, add = register(app)
    queued = await add.send(1, 2)  # type: ignore[attr-defined]
    later = await add.options(countdown=60).send(3, 4)  # type: ignore[attr-defined]
    first = await chain(add.s(1, 1), add.s(2)).send()  # type: ignore[attr-defined]
    p = await read(app.client, queued.id)
    assert p is not None and (p.source, p.args) == (ENTRY, [1, 2])
    p = await read(app.client, later.id)
    assert p is not None and (p.source, p.args) == (SCHEDULED, [3, 4])
    assert await read(app.client, "no-such-task") is None
    # The chain's first step names the step after it and the chain's end.
    entries = await app.client.redis.xrange(app.client.keys.stream("default", 5))
    ids = [f[b"id"].decode() for _, f in entries]
    firsts = [i for i in ids if i not in (queued.id, later.id)]
    assert len(firsts) == 1
    step = await read(app.client, firsts[0])
    assert step is not None and step.next_ids == [first.id] and step.chain_end == first.id
