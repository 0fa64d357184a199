"""Canvas as Celery users write it: every shape runs to a final state or is refused at send.

Each test asserts the value, and how many times each body ran (counted in Redis).
The first block is one test per shape that 0.1 hung, re-ran or got wrong.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import (
    App,
    ChordError,
    GroupHandle,
    TaskFailed,
    TaskRevoked,
    TaskState,
    Worker,
    chain,
    chord,
    current_task,
    group,
)
from tests.test_canvas import Tasks, counter, rkey

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def t(app: App) -> Tasks:
    return Tasks(app)


async def recorded(app: App, name: str) -> list[Any]:
    return [json.loads(x) for x in await app.client.redis.lrange(rkey(app, name), 0, -1)]


async def wait_recorded(app: App, name: str, n: int, timeout: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await recorded(app, name)
        if len(got) >= n:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: {await recorded(app, name)} after {timeout} s")


# -- the shapes that failed in 0.1 -------------------------------------------------------


async def test_a_chain_with_two_later_groups_finishes(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    h = await chain(
        t.add.s(1, 1),
        group(t.add.s(1), t.add.s(2)),
        t.tsum.s(),
        group(t.mul.s(2), t.mul.s(3)),
        t.tsum.s(),
    ).send()
    # 2 -> [3, 4] -> 7 -> [14, 21] -> 35
    assert await h.result(timeout=15) == 35


async def test_a_chain_that_ends_in_a_group_gives_the_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    h = await chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2))).send()
    assert await h.result(timeout=10) == [3, 4]


async def test_two_groups_in_a_row_as_the_first_steps(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    h = await chain(group(t.add.s(1, 1), t.add.s(2, 2)), group(t.tsum.s(), t.tsum.s(10))).send()
    assert await h.result(timeout=10) == [6, 16]


async def test_two_groups_in_a_row_after_a_step_run_each_step_once(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    h = await chain(
        t.add.s(1, 1),
        group(t.record.s("g1"), t.record.s("g1")),
        group(t.count_body.s("g2"), t.count_body.s("g2")),
    ).send()
    # 2 -> [2, 2] -> [sum=4, 4]
    assert await h.result(timeout=10) == [4, 4]
    await asyncio.sleep(0.3)
    assert await counter(app, "g1") == 2
    assert await counter(app, "g2") == 2


async def test_task_id_names_the_final_task_of_a_chain(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await chain(t.add.s(1, 1), t.add.s(2)).send(task_id="the-end")
    assert h.id == "the-end"
    assert await h.result(timeout=10) == 4


async def test_task_id_of_a_group_names_the_group_not_its_members(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    g = await group(t.add.s(1, 1), t.add.s(2, 2)).send(task_id="the-group")
    assert g.id == "the-group"
    assert await g.results(timeout=10) == [2, 4]
    assert len({h.id for h in g}) == 2 and "the-group" not in {h.id for h in g}


async def test_a_chord_body_may_be_a_group(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=8)
    h = await chord([t.add.s(1, 1), t.add.s(2, 2)], group(t.tsum.s(), t.tsum.s(10))).send()
    assert await h.result(timeout=10) == [6, 16]


async def test_a_chord_body_may_be_a_chord(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=8)
    inner = chord([t.tsum.s(), t.tsum.s(1)], t.tsum.s())
    h = await chord([t.add.s(1, 1), t.add.s(2, 2)], inner).send()
    # header [2, 4] -> inner header [6, 7] -> 13
    assert await h.result(timeout=10) == 13


async def test_a_chord_body_may_be_a_chain_starting_with_a_group(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    body = chain(group(t.tsum.s(), t.tsum.s(1)), t.tsum.s())
    h = await chord([t.add.s(1, 1)], body).send()
    # [2] -> [2, 3] -> 5
    assert await h.result(timeout=10) == 5


async def test_groups_nest(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=8)
    g = await group(group(t.add.s(1, 1)), t.add.s(2, 2)).send()
    assert await g.results(timeout=10) == [[2], 4]


async def test_an_empty_group_gives_an_empty_list() -> None:
    g = await group([]).send()
    assert isinstance(g, GroupHandle)
    assert await g.results(timeout=1) == []


async def test_groups_of_empty_groups_keep_their_shape() -> None:
    """Groups nest, empty ones too, as they do beside a task ([[], 2])."""
    assert await (await group(group([])).send()).results(timeout=1) == [[]]
    assert await (await group(group([]), group([group([])])).send()).results() == [[], [[]]]
    with pytest.raises(ValueError, match="at least one task"):
        await group(chain()).send()  # as chain() alone is refused


async def test_an_empty_group_with_a_link_calls_it_with_an_empty_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    g = await group([]).send(link=t.record.s("empty-link").set(task_id="empty-link"))
    assert await g.results(timeout=5) == []
    assert await app.handle("empty-link").result(timeout=5) == []
    assert await counter(app, "empty-link") == 1


async def test_an_empty_group_in_a_chain_passes_an_empty_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await chain(t.add.s(1, 1), group([]), t.tsum.s(5)).send()
    assert await h.result(timeout=10) == 5


async def test_countdown_on_a_chain_delays_its_first_step_only(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    first = t.add.s(1, 1).set(task_id="first")
    sent = time.time()
    h = await chain(first, t.add.s(2)).send(countdown=1)
    assert await h.result(timeout=10) == 4
    a, b = await app.handle("first").info(), await h.info()
    assert a.started_at is not None and b.started_at is not None and a.finished_at is not None
    assert a.started_at.timestamp() >= sent + 0.9
    assert b.started_at.timestamp() - a.finished_at.timestamp() < 0.5


async def test_on_error_fires_once_when_the_chord_body_fails(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await chord([t.add.s(1, 1)], t.boom.s(), on_error=t.errback.s("errors")).send()
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "ValueError"
    (info,) = await wait_recorded(app, "errors", 1)
    assert info["task_id"] == h.id and info["exc_type"] == "ValueError"
    assert info["chord_id"]
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "errors")) == 1


async def test_on_error_fires_once_when_a_header_fails(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.boom.s(), t.boom.s(), t.add.s(1, 1)], t.tsum.s(), on_error=t.errback.s("errors")
    ).send()
    with pytest.raises(ChordError):
        await h.result(timeout=10)
    (info,) = await wait_recorded(app, "errors", 1)
    assert info["exc_type"] == "ValueError" and info["chord_id"]
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "errors")) == 1


async def test_an_inner_chord_body_that_never_ran_is_named_to_the_outer_on_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    """A nested chord whose header fails: its body never runs, yet the outer chord's
    on_error names it, and its info() has its name and queue."""
    await worker(concurrency=4)
    inner_body = t.tsum.s()
    inner_body.freeze()
    h = await chord(
        [chord([t.boom.s(), t.add.s(1, 1)], inner_body), t.add.s(1, 1)],
        t.tsum.s(),
        on_error=t.errback.s("nested"),
    ).send()
    with pytest.raises(ChordError):
        await h.result(timeout=10)
    (failure,) = await wait_recorded(app, "nested", 1)
    assert failure["task_id"] == inner_body.id
    assert failure["name"] == t.tsum.name and failure["exc_type"] == "ChordError"
    info = await app.handle(inner_body.id).info()
    assert (info.name, info.queue) == (t.tsum.name, "default")


async def test_soft_timeout_not_below_hard_timeout_is_refused(app: App, t: Tasks) -> None:
    with pytest.raises(ValueError, match="soft_timeout"):
        await t.add.options(soft_timeout=2, hard_timeout=1).send(1, 2)
    with pytest.raises(ValueError, match="soft_timeout"):
        t.add.s(1, 2).set(soft_timeout=5, hard_timeout=5)
    with pytest.raises(ValueError, match="soft_timeout"):

        @app.task(soft_timeout=3, hard_timeout=1)
        async def never() -> None: ...


async def test_arguments_that_do_not_fit_are_refused_at_send(app: App, t: Tasks) -> None:
    with pytest.raises(TypeError, match="add"):
        await t.add.send(1, 2, 3)
    with pytest.raises(TypeError, match="add"):
        await t.add.s(1).send(y=2, z=3)
    # The second step gets the first's result too: three arguments for add.
    with pytest.raises(TypeError, match="add"):
        await chain(t.add.s(1, 1), t.add.s(1, 2)).send()
    with pytest.raises(TypeError, match="add"):
        await chord([t.add.s(1, 1)], t.add.s(1, 2)).send()
    with pytest.raises(TypeError, match="add"):
        await t.add.send_many([((1, 2), None), ((1,), None)])
    keys = [k async for k in app.client.redis.scan_iter(match=app.client.keys.prefix + "*")]
    assert keys == []  # nothing was enqueued


async def test_headers_may_be_a_generator(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chord((t.add.s(i, i) for i in range(3)), t.tsum.s()).send()
    assert await h.result(timeout=10) == 6
    g = await group(t.add.s(i, 1) for i in range(3)).send()
    assert await g.results(timeout=10) == [1, 2, 3]


async def test_chords_of_chains_of_chords(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=8)
    inner = chain(t.add.s(1, 1), chord([t.add.s(1), t.add.s(2)], t.tsum.s()))
    h = await chord([inner, t.add.s(10, 10)], t.tsum.s()).send()
    # inner: 2 -> [3, 4] -> 7; outer: [7, 20] -> 27
    assert await h.result(timeout=15) == 27


# -- immutable signatures and | ------------------------------------------------------------


async def test_si_ignores_the_previous_result(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker()
    h = await chain(t.add.s(1, 1), t.add.si(10, 10), t.add.s(1)).send()
    assert await h.result(timeout=10) == 21


async def test_pipe_builds_chains_and_chords(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    pipeline = t.add.s(2, 2) | t.add.s(4) | t.mul.s(8)
    assert isinstance(pipeline, chain)
    assert await (await pipeline.send()).result(timeout=10) == 64
    c = group(t.add.s(1, 1), t.add.s(2, 2)) | t.tsum.s()
    assert isinstance(c, chord)
    assert await (await c.send()).result(timeout=10) == 6
    longer = pipeline | (t.add.s(1) | t.add.s(1))
    assert await (await longer.send()).result(timeout=10) == 66


# -- link and link_error -------------------------------------------------------------------


async def test_link_gets_the_result_and_runs_once(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker()
    h = await t.add.options(link=t.record.s("linked")).send(2, 2)
    assert await h.result(timeout=10) == 4
    await wait_until_count(app, "linked", 1)
    await asyncio.sleep(0.3)
    assert await counter(app, "linked") == 1


async def wait_until_count(app: App, name: str, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await counter(app, name) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} counted {await counter(app, name)}, not {n}")
        await asyncio.sleep(0.05)


async def test_link_error_gets_the_failure_after_the_retries(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await t.flaky.options(link_error=t.errback.s("errs")).send("flaky-runs")
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    (info,) = await wait_recorded(app, "errs", 1)
    assert info == {
        "task_id": h.id,
        "name": t.flaky.name,
        "exc_type": "ValueError",
        "exc_message": "flaky run 2",
    }
    assert await counter(app, "flaky-runs") == 2  # the errback came after the retry
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "errs")) == 1


async def test_links_as_a_list_on_a_signature_and_immutable(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    sig = t.add.s(1, 2).set(link=[t.record.s("a"), t.record.si("x", "b")])
    h = await sig.send()
    assert await h.result(timeout=10) == 3
    await wait_until_count(app, "a", 1)
    await wait_until_count(app, "b", 1)


async def test_immutable_errback_gets_only_its_arguments(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await t.boom.options(link_error=t.errback.si({"mine": 1}, "errs")).send()
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    assert await wait_recorded(app, "errs", 1) == [{"mine": 1}]


async def test_link_on_a_chain_gets_the_last_result(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    await chain(t.add.s(1, 1), t.add.s(2)).send(link=t.errback.s("last"))
    assert await wait_recorded(app, "last", 1) == [4]


async def test_link_error_on_a_chain_fires_once_whichever_step_fails(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker()
    h = await chain(t.add.s(1, 1), t.boom.s(), t.add.s(1)).send(link_error=t.errback.s("e"))
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    (info,) = await wait_recorded(app, "e", 1)
    assert info["exc_type"] == "ValueError" and info["name"] == t.boom.name
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "e")) == 1


async def test_link_on_a_group_gets_the_list_once(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    g = await group(t.add.s(1, 1), t.add.s(2, 2)).send(link=t.errback.s("all"))
    assert await g.results(timeout=10) == [2, 4]
    assert await wait_recorded(app, "all", 1) == [[2, 4]]
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "all")) == 1


async def test_link_error_on_a_group_fires_once_for_the_first_failure(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    g = await group(t.boom.s(), t.boom.s(), t.add.s(1, 1)).send(link_error=t.errback.s("ge"))
    results = await g.results(timeout=10, return_exceptions=True)
    assert results[2] == 2 and all(isinstance(r, TaskFailed) for r in results[:2])
    await wait_recorded(app, "ge", 1)
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "ge")) == 1


async def test_link_on_a_chord_gets_the_body_result(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()).send(link=t.errback.s("c"))
    assert await h.result(timeout=10) == 6
    assert await wait_recorded(app, "c", 1) == [6]


async def test_links_inside_a_canvas(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    step = t.add.s(10).set(link=t.errback.s("inner"))
    h = await chain(t.add.s(1, 1), step, t.add.s(100)).send()
    assert await h.result(timeout=10) == 112
    assert await wait_recorded(app, "inner", 1) == [12]


# -- replace -------------------------------------------------------------------------------


async def test_replace_with_a_signature(app: App, worker: StartWorker, t: Tasks) -> None:
    @app.task
    async def delegate(x: int) -> None:
        raise current_task().replace(t.add.s(x, 100))

    await worker()
    h = await delegate.send(1)
    assert await h.result(timeout=10) == 101
    assert await h.state() == TaskState.SUCCESS


async def test_replace_with_a_chain_keeps_links_and_chain(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    @app.task
    async def delegate(x: int) -> None:
        raise current_task().replace(chain(t.add.s(x, 1), t.mul.s(10)))

    await worker(concurrency=4)
    h = await chain(t.add.s(1, 1), delegate.s().set(link=t.errback.s("rl")), t.add.s(5)).send()
    # 2 -> delegate(2) == (2 + 1) * 10 = 30 -> 35; the link gets 30
    assert await h.result(timeout=10) == 35
    assert await wait_recorded(app, "rl", 1) == [30]


async def test_replace_with_a_group_resolves_to_the_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    @app.task
    async def fan(n: int) -> None:
        raise current_task().replace(group(t.add.s(i, i) for i in range(n)))

    await worker(concurrency=4)
    assert await (await fan.send(3)).result(timeout=10) == [0, 2, 4]


async def test_a_replaced_chord_header_counts_once(app: App, worker: StartWorker, t: Tasks) -> None:
    @app.task
    async def header(x: int) -> None:
        raise current_task().replace(t.record.s(x * 10, "replacement"))

    await worker(concurrency=4)
    h = await chord([header.s(1), header.s(2), t.add.s(1, 2)], t.count_body.s("body")).send()
    assert await h.result(timeout=10) == 33
    await asyncio.sleep(0.3)
    assert await counter(app, "body") == 1
    assert await counter(app, "replacement") == 2


async def test_a_failing_replacement_fires_the_errbacks_of_the_replaced_task(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    @app.task
    async def delegate() -> None:
        raise current_task().replace(t.boom.s())

    await worker()
    h = await delegate.options(link_error=t.errback.s("re")).send()
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)
    (info,) = await wait_recorded(app, "re", 1)
    assert info["task_id"] == h.id and info["exc_type"] == "ValueError"


async def test_unrunnable_shapes_are_refused_at_send(t: Tasks) -> None:
    with pytest.raises(ValueError, match="chain"):
        await chain().send()
    with pytest.raises(TypeError, match="link_error"):
        await t.add.options(link_error=group(t.add.s(1, 1))).send(1, 2)
    with pytest.raises(TypeError, match="canvas"):
        await group([t.add.s(1, 1), 42]).send()
    with pytest.raises(TypeError, match="on_error"):
        await chord([t.add.s(1, 1)], t.tsum.s(), on_error=chain(t.add.s(1, 1))).send()  # type: ignore[arg-type]


async def test_two_tasks_of_one_canvas_with_one_id_are_refused(app: App, t: Tasks) -> None:
    """The second would be taken for the first (dedup) and skipped without a word."""
    same = t.add.s(1, 1).set(task_id="same")
    for canvas in (
        chain(same, t.add.s(1).set(task_id="same")),
        group(same, t.add.s(2, 2).set(task_id="same")),
        chord([same], t.tsum.s().set(task_id="same")),
    ):
        with pytest.raises(ValueError, match="'same' is given to two tasks"):
            await canvas.send()
    assert not await app.client.redis.exists(app.client.keys.task("same"))
    # One errback shared by every member is one task: fine.
    handle = await group(t.add.s(1, 1), t.add.s(2, 2)).send(link_error=t.add.s(0))
    assert len(handle.handles) == 2


# -- revoked before they exist, and the body's errbacks ------------------------------------


async def test_a_chain_step_revoked_before_the_chain_reaches_it_ends_the_chain(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    mid = t.record.s("mid")
    mid_h = mid.freeze()
    last = await chain(t.slow.s(1, 0.3), mid, t.record.s("last")).send()
    await mid_h.revoke()
    with pytest.raises(TaskRevoked):
        await last.result(timeout=10)
    assert await mid_h.state() == TaskState.REVOKED
    assert await counter(app, "mid") == 0 and await counter(app, "last") == 0


async def test_a_chord_body_revoked_before_it_exists_never_runs_mid_chain(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    body = t.count_body.s("body")
    body_h = body.freeze()
    last = await chain(
        t.slow.s(1, 0.3), chord([t.add.s(1), t.add.s(2)], body), t.record.s("after")
    ).send()
    await body_h.revoke()
    with pytest.raises(TaskRevoked):
        await last.result(timeout=10)
    assert await body_h.state() == TaskState.REVOKED
    assert await counter(app, "body") == 0 and await counter(app, "after") == 0


async def test_a_frozen_id_revoked_before_its_send_does_not_run_that_send(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=2)
    sig = t.record.s(1, "once")
    h = sig.freeze()
    await h.revoke()  # unknown until now
    await sig.send()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)
    # That send was the one the revoke cancelled: the next one starts over, as for any
    # finished id.
    again = await t.record.s(1, "once").set(task_id=h.id).send()
    assert await again.result(timeout=10) == 1
    assert await counter(app, "once") == 1


async def test_a_failed_header_sends_the_body_s_own_link_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    body = t.tsum.s().set(link_error=t.errback.s("body_eb"))
    h = await (group(t.boom.s(), t.add.s(1, 1)) | body).send()
    with pytest.raises(ChordError):
        await h.result(timeout=10)
    [info] = await wait_recorded(app, "body_eb", 1)
    assert info["task_id"] == h.id and info["exc_type"] == "ChordError"
    assert "ValueError: boom" in info["exc_message"]
    await asyncio.sleep(0.3)
    assert len(await recorded(app, "body_eb")) == 1


async def test_a_chord_with_on_error_and_a_body_errback_reports_the_header_to_on_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    body = t.tsum.s().set(link_error=t.errback.s("body_eb"))
    h = await chord([t.boom.s(), t.add.s(1, 1)], body, on_error=t.errback.s("on_error")).send()
    with pytest.raises(ChordError) as failed:
        await h.result(timeout=10)
    [info] = await wait_recorded(app, "on_error", 1)
    assert info["task_id"] == failed.value.failed_task_id and info["exc_type"] == "ValueError"
    assert [i["task_id"] for i in await wait_recorded(app, "body_eb", 1)] == [h.id]


async def test_a_chord_whose_body_is_a_group_fails_with_chord_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord([t.boom.s(), t.add.s(1, 1)], group(t.tsum.s(), t.tsum.s(1))).send()
    with pytest.raises(ChordError) as failed:
        await h.result(timeout=10)
    assert "ValueError: boom" in str(failed.value)
    assert str(failed.value).count("header task") == 1


async def test_a_chord_body_revoked_before_a_header_fails_stays_revoked(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    body = t.tsum.s().set(link_error=t.errback.s("body_eb"))
    body_h = body.freeze()
    await body_h.revoke()
    h = await chord([t.slow.s(1, 0.3), t.boom.s()], body, on_error=t.errback.s("on_error")).send()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=10)
    assert await body_h.state() == TaskState.REVOKED
    [info] = await wait_recorded(app, "on_error", 1)  # the failed header is still reported
    assert info["exc_type"] == "ValueError"
    await asyncio.sleep(0.5)
    assert await recorded(app, "body_eb") == []
