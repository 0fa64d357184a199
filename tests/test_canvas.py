"""Canvas: chords, groups and chains against a real server and an in-process worker.

Every task that must be seen to run (or not) records itself in Redis under the test's
namespace, so "ran exactly once" and "never ran" are read from the server, not inferred.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aiotasks import (
    App,
    ChordError,
    GroupHandle,
    ResultTimeout,
    Signature,
    TaskFailed,
    TaskHandle,
    TaskRevoked,
    TaskState,
    Worker,
    chain,
    chord,
    current_task,
    group,
)
from tests.helpers import wait_until

StartWorker = Callable[..., Awaitable[Worker]]


def rkey(app: App, name: str) -> str:
    """A key in the test's namespace (removed with it)."""
    return f"{app.client.keys.prefix}test:{name}"


async def counter(app: App, name: str) -> int:
    return int(await app.client.redis.get(rkey(app, name)) or 0)


async def chord_keys(app: App) -> list[str]:
    """Every chord key of the namespace (hashes and their results hashes)."""
    pattern = f"{app.client.keys.prefix}chord:*"
    return sorted([k.decode() async for k in app.client.redis.scan_iter(match=pattern)])


async def only_chord_id(app: App) -> str:
    """The id of the one chord of the test."""
    ids = {k.split(":")[2] for k in await chord_keys(app)}
    assert len(ids) == 1, ids
    return ids.pop()


async def _incr(name: str) -> int:
    app = current_task().app
    return int(await app.client.redis.incr(rkey(app, name)))


async def add(x: int, y: int) -> int:
    return x + y


async def mul(x: int, y: int) -> int:
    return x * y


async def tsum(values: list[int], extra: int = 0) -> int:
    return sum(values) + extra


async def ident(*args: Any) -> Any:
    """Returns what it was called with: one argument as is, several as a list."""
    return args[0] if len(args) == 1 else list(args)


async def slow(value: Any, delay: float) -> Any:
    await asyncio.sleep(delay)
    return value


async def boom(*args: Any) -> None:
    raise ValueError("boom")


async def record(value: Any, name: str) -> Any:
    """Counts its own runs under `name`; returns its input."""
    await _incr(name)
    return value


async def count_body(values: list[int], name: str) -> int:
    """A chord body that counts its executions under `name`."""
    await _incr(name)
    return sum(values)


async def flaky(name: str) -> None:
    """Counts its runs, then always fails (so autoretry gives up after one retry)."""
    n = await _incr(name)
    raise ValueError(f"flaky run {n}")


async def errback(info: dict[str, Any], name: str) -> None:
    """An on_error callback: appends what it was given to a list."""
    app = current_task().app
    await app.client.redis.rpush(rkey(app, name), json.dumps(info))


class Tasks:
    """The tasks of these tests, registered on the test's App."""

    def __init__(self, app: App) -> None:
        self.add = app.task(add)
        self.mul = app.task(mul)
        self.tsum = app.task(tsum)
        self.ident = app.task(ident)
        self.slow = app.task(slow)
        self.boom = app.task(boom)
        self.record = app.task(record)
        self.count_body = app.task(count_body)
        self.flaky = app.task(autoretry_for=(ValueError,), max_retries=1)(flaky)
        self.errback = app.task(errback)


@pytest.fixture
def t(app: App) -> Tasks:
    return Tasks(app)


# -- chords ------------------------------------------------------------------------------


async def test_chord_body_gets_header_results(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.tsum.s()).send()
    assert isinstance(h, TaskHandle)
    assert await h.result(timeout=10) == 10
    # The body saw the list itself, in header order.
    h2 = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.ident.s()).send()
    assert await h2.result(timeout=10) == [3, 7]


async def test_chord_body_countdown_counts_from_the_last_header(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    header = [t.slow.s(1, 0.4).set(task_id="cd-h0"), t.add.s(1, 1).set(task_id="cd-h1")]
    h = await chord(header, t.tsum.s().set(countdown=0.5)).send()
    assert await app.handle("cd-h0").result(timeout=10) == 1
    await wait_until(lambda: _state_is(h, TaskState.SCHEDULED), timeout=5)
    assert await h.result(timeout=10) == 3
    last_header = await app.handle("cd-h0").info()
    body = await h.info()
    assert last_header.finished_at is not None and body.started_at is not None
    waited = (body.started_at - last_header.finished_at).total_seconds()
    assert 0.45 <= waited < 3.0, waited


async def test_chord_body_eta_is_the_time_it_names(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    eta = datetime.now(UTC) + timedelta(seconds=0.8)
    h = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.tsum.s().set(eta=eta)).send()
    await wait_until(lambda: _state_is(h, TaskState.SCHEDULED), timeout=5)
    assert await h.result(timeout=10) == 10
    body = await h.info()
    assert body.started_at is not None
    assert body.started_at >= eta - timedelta(milliseconds=50)
    assert (body.started_at - eta).total_seconds() < 3.0


async def _state_is(h: TaskHandle[Any], state: TaskState) -> bool:
    return await h.state() == state


async def test_chord_header_order_survives_out_of_order_finish(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=10)
    n = 6
    # Header i sleeps longest when i is smallest: they finish in reverse order.
    header = [t.slow.s(i, 0.1 * (n - i)).set(task_id=f"hdr-{i}") for i in range(n)]
    h = await chord(header, t.ident.s()).send()
    assert await h.result(timeout=15) == list(range(n))
    finished = [(await app.handle(f"hdr-{i}").info()).finished_at for i in range(n)]
    assert all(f is not None for f in finished)
    assert finished == sorted(finished, reverse=True), "headers did not finish out of order"


async def test_chord_body_partial_args_follow_the_results(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.tsum.s(10)).send()
    assert await h.result(timeout=10) == 20
    h2 = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.ident.s("a", "b")).send()
    assert await h2.result(timeout=10) == [[3, 7], "a", "b"]


async def test_chord_with_empty_header_runs_body_with_empty_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=2)
    h = await chord([], t.ident.s()).send()
    assert await h.result(timeout=10) == []
    h2 = await chord([], t.tsum.s(5)).send()
    assert await h2.result(timeout=10) == 5


async def test_header_failure_fails_chord_and_calls_errback_once(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    header = [
        t.add.s(1, 1),
        t.flaky.s("flaky-runs").set(task_id="the-flaky-one"),
        t.slow.s(5, 1.0).set(task_id="the-slow-one"),
    ]
    body = t.count_body.s("body-runs")
    h = await chord(header, body, on_error=t.errback.s("errors")).send()
    cid = await only_chord_id(app)

    with pytest.raises(ChordError) as ei:
        await h.result(timeout=15)
    err = ei.value
    assert isinstance(err, TaskFailed)
    assert err.task_id == h.id
    assert err.failed_task_id == "the-flaky-one"
    assert "the-flaky-one" in str(err)
    assert "the-flaky-one" in err.exc_message
    assert await h.state() == TaskState.FAILURE
    # max_retries=1: one run and one retry, then the chord fails.
    assert await counter(app, "flaky-runs") == 2
    with pytest.raises(TaskFailed) as header_err:
        await app.handle("the-flaky-one").result(timeout=5)
    assert header_err.value.exc_type == "ValueError"

    # The header still running when the chord failed finishes, and is ignored.
    assert await app.handle("the-slow-one").result(timeout=10) == 5
    await asyncio.sleep(0.3)
    r = app.client.redis
    assert await r.exists(app.client.keys.chord_results(cid)) == 0
    chord_hash = await r.hgetall(app.client.keys.chord(cid))
    assert chord_hash[b"fired"] == b"error"
    assert chord_hash[b"failed_id"] == b"the-flaky-one"
    assert await counter(app, "body-runs") == 0

    # on_error ran exactly once, with the failure's details first.
    await wait_until(lambda: _llen_at_least(app, "errors", 1), timeout=5, what="the errback to run")
    await asyncio.sleep(0.3)
    calls = [json.loads(x) for x in await r.lrange(rkey(app, "errors"), 0, -1)]
    assert len(calls) == 1, calls
    info = calls[0]
    assert info["chord_id"] == cid
    assert info["task_id"] == "the-flaky-one"
    assert info["exc_type"] == "ValueError"
    assert info["exc_message"] == "flaky run 2"


async def _llen_at_least(app: App, name: str, n: int) -> bool:
    return int(await app.client.redis.llen(rkey(app, name))) >= n


async def test_two_failing_headers_call_the_errback_once(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.boom.s().set(task_id="first"), t.add.s(1, 1), t.boom.s().set(task_id="second")],
        t.count_body.s("body"),
        on_error=t.errback.s("errors"),
    ).send()
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id in ("first", "second")
    for hid in ("first", "second"):
        with pytest.raises(TaskFailed):
            await app.handle(hid).result(timeout=5)
    await wait_until(lambda: _llen_at_least(app, "errors", 1), timeout=5, what="the errback")
    await asyncio.sleep(0.3)
    calls = [json.loads(x) for x in await app.client.redis.lrange(rkey(app, "errors"), 0, -1)]
    assert len(calls) == 1, calls
    assert calls[0]["task_id"] == ei.value.failed_task_id
    assert await counter(app, "body") == 0


async def test_header_failure_without_errback_fails_body(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.add.s(1, 1), t.boom.s().set(task_id="boom-1")], t.count_body.s("body")
    ).send()
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id == "boom-1"
    assert "ValueError" in ei.value.exc_message
    assert await counter(app, "body") == 0


async def test_revoked_header_fails_the_chord(app: App, worker: StartWorker, t: Tasks) -> None:
    header = [t.add.s(1, 1), t.add.s(2, 2).set(task_id="revoked-hdr"), t.add.s(3, 3)]
    h = await chord(header, t.count_body.s("body"), on_error=t.errback.s("errors")).send()
    await app.handle("revoked-hdr").revoke()
    await worker(concurrency=4)
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id == "revoked-hdr"
    assert "revoked-hdr" in str(ei.value)
    assert await app.handle("revoked-hdr").state() == TaskState.REVOKED
    with pytest.raises(TaskRevoked):
        await app.handle("revoked-hdr").result(timeout=1)
    await wait_until(lambda: _llen_at_least(app, "errors", 1), timeout=5, what="the errback")
    await asyncio.sleep(0.2)
    calls = [json.loads(x) for x in await app.client.redis.lrange(rkey(app, "errors"), 0, -1)]
    assert len(calls) == 1
    assert calls[0]["task_id"] == "revoked-hdr"
    assert await counter(app, "body") == 0


async def test_chord_state_has_ttl_and_expires_with_the_results(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    r = app.client.redis
    limit = app.settings.result_ttl * 1000
    h = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.tsum.s()).send()
    cid = await only_chord_id(app)
    # Before any header ran: the chord hash exists and expires with the results.
    assert await chord_keys(app) == [app.client.keys.chord(cid)]
    assert 0 < await r.pttl(app.client.keys.chord(cid)) <= limit
    await worker(concurrency=4)
    assert await h.result(timeout=10) == 10
    keys = await chord_keys(app)
    assert keys == [app.client.keys.chord(cid), app.client.keys.chord_results(cid)]
    for key in keys:
        assert 0 < await r.pttl(key) <= limit, f"{key} has no TTL"
    for key in keys:
        await r.delete(key)

    # A short result_ttl on the body: everything the chord stored is gone with it.
    h2 = await chord([t.add.s(1, 2), t.add.s(3, 4)], t.tsum.s().set(result_ttl=3)).send()
    cid2 = await only_chord_id(app)
    assert 0 < await r.pttl(app.client.keys.chord(cid2)) <= 3000
    assert await h2.result(timeout=10) == 10
    for key in await chord_keys(app):
        assert 0 < await r.pttl(key) <= 3000, f"{key} has no TTL"
    await wait_until(lambda: _no_chord_keys(app), timeout=6, what="the chord's keys to expire")


async def _no_chord_keys(app: App) -> bool:
    return not await chord_keys(app)


async def test_thousand_header_chord_fires_body_exactly_once(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=50)
    n = 1000
    h = await chord([t.add.s(i, i) for i in range(n)], t.count_body.s("body")).send()
    assert await h.result(timeout=40) == sum(2 * i for i in range(n))
    await asyncio.sleep(0.3)
    assert await counter(app, "body") == 1
    cid = await only_chord_id(app)
    chord_hash = await app.client.redis.hgetall(app.client.keys.chord(cid))
    assert int(chord_hash[b"done"]) == n
    assert chord_hash[b"fired"] == b"body"


# -- groups ------------------------------------------------------------------------------


async def test_group_handle_results_in_order(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=10)
    n = 6
    sigs = [t.slow.s(i * i, 0.05 * (n - i)).set(task_id=f"g-{i}") for i in range(n)]
    g = await group(sigs).send()
    assert isinstance(g, GroupHandle)
    assert len(g) == n
    assert [h.id for h in g.handles] == [f"g-{i}" for i in range(n)]
    assert all(isinstance(h, TaskHandle) for h in g)
    assert await g.results(timeout=10) == [i * i for i in range(n)]


async def test_group_results_timeout(app: App, t: Tasks) -> None:
    g = await group([t.add.s(1, 1), t.add.s(2, 2)]).send()  # no worker
    with pytest.raises(ResultTimeout):
        await g.results(timeout=0.3)


async def test_group_failure_raises_or_takes_its_place(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    g = await group([t.add.s(1, 1), t.boom.s(), t.add.s(3, 3)]).send()
    with pytest.raises(TaskFailed) as ei:
        await g.results(timeout=10)
    assert ei.value.exc_type == "ValueError"
    assert ei.value.task_id == g.handles[1].id
    res = await g.results(timeout=10, return_exceptions=True)
    assert res[0] == 2
    assert res[2] == 6
    assert isinstance(res[1], TaskFailed)
    assert res[1].exc_type == "ValueError"
    assert res[1].task_id == g.handles[1].id


async def test_group_containing_a_chord_and_a_chain(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=8)
    g = await group(
        [
            chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()),
            chain(t.add.s(1, 2), t.mul.s(10)),
            t.add.s(5, 5),
        ]
    ).send()
    assert await g.results(timeout=10) == [6, 30, 10]


# -- chains ------------------------------------------------------------------------------


async def test_chain_passes_results_and_returns_last_handle(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chain(t.add.s(1, 2), t.add.s(3), t.mul.s(10).set(task_id="last-step")).send()
    assert h.id == "last-step"
    assert await h.result(timeout=10) == 60


async def test_chain_step_countdown_counts_from_the_step_before(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    first = t.slow.s(2, 0.3).set(task_id="step-0")
    h = await chain(first, t.add.s(3).set(countdown=0.5)).send()
    assert await h.result(timeout=10) == 5
    before, last = await app.handle("step-0").info(), await h.info()
    assert before.finished_at is not None and last.started_at is not None
    waited = (last.started_at - before.finished_at).total_seconds()
    assert 0.45 <= waited < 3.0, waited


async def test_chain_stops_at_a_failure(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chain(
        t.add.s(1, 2),
        t.boom.s().set(task_id="failing-step"),
        t.record.s("after-1"),
        t.record.s("after-2").set(task_id="final-step"),
    ).send()
    assert h.id == "final-step"
    with pytest.raises(TaskFailed) as ei:
        await h.result(timeout=10)
    assert ei.value.exc_type == "ValueError"
    assert ei.value.task_id == "final-step"
    # The last task names the step that failed and carries its traceback.
    assert ei.value.traceback is not None and "ValueError" in ei.value.traceback
    assert (await h.info()).failed_task_id == "failing-step"
    with pytest.raises(TaskFailed) as step:
        await app.handle("failing-step").result(timeout=5)
    assert step.value.traceback == ei.value.traceback
    await asyncio.sleep(0.5)
    assert await counter(app, "after-1") == 0
    assert await counter(app, "after-2") == 0


async def test_chain_with_trailing_group_collects_a_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chain(t.add.s(1, 1), group([t.add.s(1), t.add.s(2)])).send()
    assert await h.result(timeout=10) == [3, 4]


# -- nesting -----------------------------------------------------------------------------


async def test_chain_containing_a_chord(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chain(t.add.s(1, 1), chord([t.add.s(1), t.add.s(2)], t.tsum.s()), t.mul.s(10)).send()
    # 1+1=2; header (2+1, 2+2) -> tsum 7; 7*10
    assert await h.result(timeout=10) == 70


async def test_chord_whose_header_holds_chains(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chord(
        [chain(t.add.s(1, 2), t.mul.s(10)), t.add.s(5, 5), chain(t.add.s(3, 4), t.mul.s(100))],
        t.ident.s(),
    ).send()
    assert await h.result(timeout=10) == [30, 10, 700]


async def test_chord_header_chain_failure_fails_the_chord(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [chain(t.add.s(1, 2), t.boom.s().set(task_id="mid"), t.mul.s(10)), t.add.s(5, 5)],
        t.count_body.s("body"),
    ).send()
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id == "mid"
    assert await counter(app, "body") == 0


async def test_group_inside_a_chord_header_gives_a_nested_list(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.add.s(1, 1), group([t.add.s(2, 2), t.add.s(3, 3)]), t.add.s(4, 4)], t.ident.s()
    ).send()
    assert await h.result(timeout=10) == [2, [4, 6], 8]


async def test_failed_group_inside_a_chord_header_fails_the_chord(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.add.s(1, 1), group([t.add.s(2, 2), t.boom.s().set(task_id="in-group")])],
        t.count_body.s("body"),
    ).send()
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert "in-group" in str(ei.value)
    await asyncio.sleep(0.3)
    assert await counter(app, "body") == 0


async def test_chord_inside_a_chord_header(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chord(
        [chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()), t.add.s(10, 10)],
        t.ident.s(),
    ).send()
    assert await h.result(timeout=10) == [6, 20]


async def test_failed_inner_chord_fails_the_outer_chord(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord(
        [chord([t.add.s(1, 1), t.boom.s().set(task_id="inner-boom")], t.tsum.s()), t.add.s(1, 1)],
        t.count_body.s("outer-body"),
        on_error=t.errback.s("errors"),
    ).send()
    with pytest.raises(ChordError):
        await h.result(timeout=10)
    assert await counter(app, "outer-body") == 0
    await wait_until(lambda: _llen_at_least(app, "errors", 1), timeout=5, what="the errback")
    await asyncio.sleep(0.2)
    assert await app.client.redis.llen(rkey(app, "errors")) == 1


# -- every final state of a header settles the chord ---------------------------------------


async def test_scheduled_header_revoked_fails_the_chord_at_once(app: App, t: Tasks) -> None:
    """A header waiting for its countdown is settled by the revoke itself (no worker)."""
    header = [t.add.s(1, 1), t.add.s(2, 2).set(countdown=60, task_id="later")]
    h = await chord(header, t.count_body.s("body")).send()
    assert await app.handle("later").state() == TaskState.SCHEDULED
    await app.handle("later").revoke()
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=5)
    assert ei.value.failed_task_id == "later"


async def test_expired_header_fails_the_chord(app: App, worker: StartWorker, t: Tasks) -> None:
    header = [t.add.s(1, 1), t.add.s(2, 2).set(expires=0.2, task_id="stale")]
    h = await chord(header, t.count_body.s("body")).send()
    await asyncio.sleep(0.4)
    await worker(concurrency=2)
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id == "stale"
    assert await app.handle("stale").state() == TaskState.REVOKED
    assert await counter(app, "body") == 0


async def test_dead_lettered_header_fails_the_chord(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    unknown = Signature("no.such.task", (1,), app=app, options={"task_id": "unknown-hdr"})
    h = await chord([t.add.s(1, 1), unknown], t.count_body.s("body")).send()
    await worker(concurrency=2)
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert ei.value.failed_task_id == "unknown-hdr"
    assert "UnknownTask" in ei.value.exc_message
    assert await counter(app, "body") == 0


async def test_header_that_retries_then_succeeds_counts_once(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    @app.task(autoretry_for=(ValueError,), max_retries=3)
    async def third_time_lucky(x: int) -> int:
        n = await _incr("lucky")
        if n < 3:
            raise ValueError(f"run {n}")
        return x

    await worker(concurrency=4)
    h = await chord(
        [t.add.s(1, 1), third_time_lucky.s(100), t.add.s(2, 2)], t.count_body.s("body")
    ).send()
    assert await h.result(timeout=10) == 106
    assert await counter(app, "lucky") == 3
    await asyncio.sleep(0.3)
    assert await counter(app, "body") == 1


# -- more shapes -------------------------------------------------------------------------


async def test_chord_body_that_is_a_chain(app: App, worker: StartWorker, t: Tasks) -> None:
    await worker(concurrency=4)
    h = await chord(
        [t.add.s(1, 1), t.add.s(2, 2)], chain(t.tsum.s(), t.mul.s(10).set(task_id="end"))
    ).send()
    assert h.id == "end"
    assert await h.result(timeout=10) == 60


async def test_failed_chord_inside_a_chain_fails_the_chains_last_task(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chain(
        t.add.s(1, 1),
        chord([t.add.s(1), t.boom.s().set(task_id="hdr-boom")], t.tsum.s()),
        t.record.s("after").set(task_id="chain-end"),
    ).send()
    assert h.id == "chain-end"
    with pytest.raises(ChordError) as ei:
        await h.result(timeout=10)
    assert "hdr-boom" in ei.value.exc_message
    # The canvas's handle names the failed header, like the body's handle does.
    assert ei.value.failed_task_id == "hdr-boom"
    assert "header task hdr-boom" in str(ei.value)
    await asyncio.sleep(0.3)
    assert await counter(app, "after") == 0


async def test_chord_header_results_keep_their_serialization(
    redis_url: str, namespace: str, worker: StartWorker
) -> None:
    """Compressed results and JSON-serialized results reach the body intact."""
    other = App(redis_url=redis_url, namespace=namespace, compression="zlib", compress_min_size=64)
    try:

        @other.task
        async def big(i: int) -> str:
            return str(i) * 500

        @other.task(serializer="json")
        async def as_json(i: int) -> dict[str, int]:
            return {"i": i}

        @other.task
        async def lengths(values: list[Any]) -> list[Any]:
            return [len(v) if isinstance(v, str) else v for v in values]

        await worker(other, concurrency=4)
        h = await chord([big.s(1), as_json.s(2), big.s(3)], lengths.s()).send()
        assert await h.result(timeout=10) == [500, {"i": 2}, 500]
    finally:
        await other.close()


async def test_header_with_ignore_result_still_feeds_the_body(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord([t.add.s(1, 1).set(ignore_result=True), t.add.s(2, 2)], t.ident.s()).send()
    assert await h.result(timeout=10) == [2, 4]


# -- a group fails as its member did (Celery), wherever it stands --------------------------


async def test_a_group_that_ends_a_chain_fails_with_its_members_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chain(t.add.s(1, 1), group(t.boom.s().set(task_id="member"), t.add.s(1))).send()
    with pytest.raises(TaskFailed) as ei:
        await h.result(timeout=10)
    assert not isinstance(ei.value, ChordError)
    assert (ei.value.exc_type, ei.value.exc_message) == ("ValueError", "boom")
    assert "raise ValueError" in (ei.value.traceback or "")  # the member's own traceback
    assert (await h.info()).exc_type == "ValueError"


async def test_a_group_as_a_chord_body_or_nested_fails_with_its_members_error(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    h = await chord([t.add.s(1, 1)], group(t.boom.s(), t.add.s(1))).send()
    with pytest.raises(TaskFailed) as ei:
        await h.result(timeout=10)
    assert ei.value.exc_type == "ValueError" and not isinstance(ei.value, ChordError)
    g = await group(group(t.boom.s()), t.add.s(2, 2)).send()
    with pytest.raises(TaskFailed) as ei:
        await g.results(timeout=10)
    assert ei.value.exc_type == "ValueError" and not isinstance(ei.value, ChordError)


async def test_a_group_with_a_revoked_member_ends_revoked(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    await worker(concurrency=4)
    member = t.add.s(1).set(task_id="later", countdown=30)
    h = await chain(t.add.s(1, 1), group(member, t.add.s(2))).send()
    later = app.handle("later")
    await wait_until(lambda: _state_is(later, TaskState.SCHEDULED), timeout=5)
    await later.revoke()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=10)


async def test_group_results_raise_the_first_failure_in_member_order(
    app: App, worker: StartWorker, t: Tasks
) -> None:
    @app.task(name="late_boom")
    async def late_boom(msg: str, delay: float) -> None:
        await asyncio.sleep(delay)
        raise ValueError(msg)

    await worker(concurrency=4)
    g = await group(late_boom.s("first", 0.3), t.add.s(1, 1), late_boom.s("second", 0)).send()
    with pytest.raises(TaskFailed) as ei:
        await g.results(timeout=10)
    assert ei.value.exc_message == "first"  # the second failed earlier, but stands later


async def test_a_saved_group_is_found_by_its_id_in_another_app(
    make_app: Callable[..., App], app: App, worker: StartWorker
) -> None:
    """GroupHandle.save() / app.group_handle(id): Celery's GroupResult.save/restore, so
    a web app can send a group in one request and read it in another."""

    @app.task(name="double")
    async def double(x: int) -> int:
        await asyncio.sleep(0.05 * (3 - x))  # members finish out of order
        return 2 * x

    await worker(concurrency=4)
    g = await group(double.s(i) for i in range(3)).send(task_id="report-7")
    await g.save(ttl=60)
    other = make_app()  # another process's App, same namespace; knows no task
    found = await other.group_handle("report-7")
    assert found is not None and found.id == "report-7"
    assert [h.id for h in found.handles] == [h.id for h in g.handles]
    assert await found.results(timeout=10) == [0, 2, 4]
    key = app.client.for_task("report-7").keys.group("report-7")
    assert 0 < await app.client.redis.ttl(key) <= 60
    assert await other.group_handle("never-saved") is None
    with pytest.raises(ValueError, match="holds no task"):
        await (await group([]).send()).save()


async def test_a_saved_group_can_be_revoked_from_another_app(
    make_app: Callable[..., App], app: App, worker: StartWorker
) -> None:
    @app.task(name="nap")
    async def nap() -> None:
        await asyncio.sleep(10)

    await worker(concurrency=1)
    g = await group(nap.s() for _ in range(3)).send()
    await g.save()
    found = await make_app().group_handle(g.id)
    assert found is not None
    await found.revoke(terminate=True)
    results = await g.results(timeout=5, return_exceptions=True)
    assert all(isinstance(r, TaskRevoked) for r in results), results
