"""Celery's spellings of sending and composing: `delay`, `apply_async` with partial
arguments, `chord(header)(body)`, `chain(...)()`, `group(...)()`, `sig.link()`/
`link_error()`, `freeze()`, `set(immutable=)`. Each runs through a real worker and
gives what Celery gives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, TaskFailed, Worker, chain, chord, current_task, group
from tests.helpers import wait_until

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def tasks(app: App) -> dict[str, Any]:
    seen: list[Any] = []

    @app.task(name="add")
    async def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="tsum")
    async def tsum(xs: list[int]) -> int:
        return sum(xs)

    @app.task(name="record")
    async def record(value: Any) -> None:
        seen.append(value)

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("boom")

    return {"add": add, "tsum": tsum, "record": record, "boom": boom, "seen": seen}


async def test_delay_and_apply_async_on_tasks_and_signatures(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    add = tasks["add"]
    await worker(concurrency=8)
    assert await (await add.delay(1, 2)).result(timeout=5) == 3
    assert await (await add.options(queue="default").delay(2, 2)).result(timeout=5) == 4
    # Partial arguments go before the signature's own, as in Celery: add(3, 2).
    assert await (await add.s(2).delay(3)).result(timeout=5) == 5
    assert await (await add.s(2).apply_async((5,), countdown=0)).result(timeout=5) == 7
    assert await (await add.s(y=1).apply_async((5,), {"y": 10})).result(timeout=5) == 15
    # An immutable signature keeps only its own arguments.
    assert await (await add.si(1, 1).apply_async((5,))).result(timeout=5) == 2


async def test_delay_and_apply_async_on_canvases(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    add, tsum = tasks["add"], tasks["tsum"]
    await worker(concurrency=8)
    assert await (await chain(add.s(1, 1), add.s(3)).delay()).result(timeout=5) == 5
    # A chain's partial arguments go to its first step: add(10, 1) + 3.
    h = await chain(add.s(1), add.s(3)).apply_async((10,))
    assert await h.result(timeout=5) == 14
    g = await group(add.s(1), add.s(2)).apply_async((10,))  # to each member
    assert await g.results(timeout=5) == [11, 12]
    h = await chord([add.s(1, 1), add.s(2, 2)], tsum.s()).apply_async()
    assert await h.result(timeout=5) == 6
    h = await chord([add.s(1), add.s(2)], tsum.s()).delay(5)  # to each header task
    assert await h.result(timeout=5) == 13
    h = await chord([add.s(1, 1), add.s(2, 2)])(tsum.s())
    assert await h.result(timeout=5) == 6
    # Calling a chain or a group sends it, as in Celery's canvas guide.
    assert await (await chain(add.s(1, 1), add.s(3))()).result(timeout=5) == 5
    assert await (await chain(add.s(1), add.s(3))(10)).result(timeout=5) == 14
    assert await (await chain(add.s(), add.s(3))(2, y=5)).result(timeout=5) == 10
    assert await (await group(add.s(1, 1), add.s(2, 2))()).results(timeout=5) == [2, 4]
    g = await group(add.s(1), add.s(2))(10, countdown=0)
    assert await g.results(timeout=5) == [11, 12]
    with pytest.raises(TypeError, match="needs a body"):
        await chord([add.s(1, 1)]).send()


async def test_link_link_error_freeze_and_set_immutable(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    add, record, boom, seen = tasks["add"], tasks["record"], tasks["boom"], tasks["seen"]
    await worker(concurrency=8)
    sig = add.s(4, 4)
    callback = record.s()
    assert sig.link(callback) is callback
    assert await (await sig.delay()).result(timeout=5) == 8
    await wait_until(lambda: _async(seen == [8]), timeout=5, what="the callback")

    failing = boom.s()
    failing.link_error(record.s())
    with pytest.raises(TaskFailed):
        await (await failing.delay()).result(timeout=5)
    await wait_until(lambda: _async(len(seen) == 2), timeout=5, what="the errback")
    assert seen[1]["exc_type"] == "ValueError"

    # on_error returns the signature itself (link_error returns the errback), so the
    # chained spelling sends the task, not its errback, as in Celery.
    guarded = boom.s()
    assert guarded.on_error(record.s()) is guarded
    handle = await boom.s().on_error(record.s()).delay()
    with pytest.raises(TaskFailed):
        await handle.result(timeout=5)
    await wait_until(lambda: _async(len(seen) == 3), timeout=5, what="on_error's errback")
    assert seen[2]["task_id"] == handle.id

    frozen = add.s(7, 7)
    handle = frozen.freeze()  # the id is known before the send
    assert frozen.id == handle.id
    assert (await frozen.delay()).id == handle.id
    assert await handle.result(timeout=5) == 14

    ignores = add.s(1, 1).set(immutable=True)
    assert ignores.immutable
    assert await (await chain(add.s(5, 5), ignores).delay()).result(timeout=5) == 2


async def test_set_changes_the_signature_or_canvas_itself(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    """As Celery's: `sig.set(...)` on a line of its own is not lost (a black-box trial
    found it returned a copy, so the options were dropped without a word)."""
    add = tasks["add"]

    @app.task(name="where")
    async def where(*_: Any) -> str:
        return current_task().queue

    await worker(concurrency=8, queues=["default", "other"])
    sig = where.s()
    assert sig.set(queue="other") is sig
    assert await (await sig.send()).result(timeout=5) == "other"
    step = add.s(5, 5)
    step.set(immutable=True)  # gets only its own arguments
    assert await (await chain(add.s(1, 1), step).send()).result(timeout=5) == 10
    c = chain(where.s(), where.s())
    assert c.set(queue="other") is c
    assert await (await c.send()).result(timeout=5) == "other"
    g = group(where.s(), where.s())
    g.set(queue="other")
    assert await (await g.send()).results(timeout=5) == ["other", "other"]
    # clone() is the copy: the original keeps its options.
    copy = sig.clone(queue="default")
    assert (copy.options["queue"], sig.options["queue"]) == ("default", "other")


async def _async(value: bool) -> bool:
    return value


async def test_link_link_error_on_error_and_set_on_canvases(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    """Celery's `chain(...).link(cb)`, `group(...).link(cb)`, `.set(link=...)`,
    `.on_error(eb)` on a chain or group: the callback gets the canvas's final result."""
    add, tsum, record, boom, seen = (
        tasks["add"], tasks["tsum"], tasks["record"], tasks["boom"], tasks["seen"]
    )  # fmt: skip
    await worker(concurrency=8)

    steps = chain(add.s(1, 1), add.s(10))
    callback = record.s()
    assert steps.link(callback) is callback
    assert await (await steps.send()).result(timeout=5) == 12
    await wait_until(lambda: _async(seen == [12]), timeout=5, what="the chain's callback")

    both = group(add.s(1, 1), add.s(2, 2))
    both.link(record.s())
    assert await (await both.send()).results(timeout=5) == [2, 4]
    await wait_until(lambda: _async(len(seen) == 2), timeout=5, what="the group's callback")
    assert seen[1] == [2, 4]

    # set() adds to the canvas itself and returns it, as Celery's.
    plain = chain(add.s(2, 2), add.s(1))
    linked = plain.set(link=record.s())
    assert linked is plain and plain.options.keys() == {"link"}
    assert await (await linked.send()).result(timeout=5) == 5
    await wait_until(lambda: _async(len(seen) == 3), timeout=5, what="set(link=)")
    assert seen[2] == 5

    failing = chain(add.s(1, 1), boom.si())
    assert failing.on_error(record.s()) is failing
    with pytest.raises(TaskFailed):
        await (await failing.send()).result(timeout=5)
    await wait_until(lambda: _async(len(seen) == 4), timeout=5, what="on_error's errback")
    assert seen[3]["exc_type"] == "ValueError"

    body = chord([add.s(1, 1), add.s(2, 2)], tsum.s()).set(link=record.s())
    assert await (await body.send()).result(timeout=5) == 6
    await wait_until(lambda: _async(len(seen) == 5), timeout=5, what="the chord's callback")
    assert seen[4] == 6

    # Options set on a canvas inside another are refused, not silently dropped.
    with pytest.raises(ValueError, match="inside another canvas"):
        await chain(add.s(1, 1), group(add.s(1), add.s(2)).set(link=record.s())).send()
    with pytest.raises(TypeError, match="unknown send option"):
        chain(add.s(1, 1)).set(bogus=1)


async def test_canvas_options_survive_partials_chord_call_and_replace(
    app: App, worker: StartWorker, tasks: dict[str, Any]
) -> None:
    """Options set on a canvas are applied on every way it is sent, or refused: never
    dropped."""
    add, tsum, record, seen = tasks["add"], tasks["tsum"], tasks["record"], tasks["seen"]

    @app.task(name="becomes")
    async def becomes(x: int) -> None:
        from aiotasks import current_task

        raise current_task().replace(chain(add.s(x, 1), add.s(1)).set(link=record.s()))

    await worker(concurrency=8)
    # Partial arguments (delay/apply_async with args) keep the canvas's link.
    steps = chain(add.s(1), add.s(10)).set(link=record.s())
    assert await (await steps.delay(1)).result(timeout=5) == 12
    await wait_until(lambda: _async(seen == [12]), timeout=5, what="the partial's link")
    # chord(header)(body) keeps the chord's own options.
    c = chord([add.s(1, 1), add.s(2, 2)]).set(link=record.s())
    assert await (await c(tsum.s())).result(timeout=5) == 6
    await wait_until(lambda: _async(len(seen) == 2), timeout=5, what="chord(h)(b)'s link")
    assert seen[1] == 6
    # A replacement canvas's own options apply as at a send.
    assert await (await becomes.send(5)).result(timeout=5) == 7
    await wait_until(lambda: _async(len(seen) == 3), timeout=5, what="the replacement's link")
    assert seen[2] == 7
    # Composed or used as a chord header, a canvas with options is refused, not dropped.
    with pytest.raises(ValueError, match="inside another canvas"):
        await (chain(add.s(1, 1)).set(link=record.s()) | add.s(1)).send()
    with pytest.raises(ValueError, match="inside another canvas"):
        await (group(add.s(1, 1)).set(link=record.s()) | tsum.s()).send()
    with pytest.raises(ValueError, match="chord's header"):
        chord(group(add.s(1, 1)).set(link=record.s()), tsum.s())
    # Options are part of a canvas's equality.
    assert chain(add.s(1, 1)).set(countdown=5) != chain(add.s(1, 1))
    assert chain(add.s(1, 1)).set(countdown=5) == chain(add.s(1, 1)).set(countdown=5)
