"""Poison messages go to the dead-letter stream, fail their task, and never stop the worker.

Unknown task names, undecodable payloads, entries with no fields we know, and a task that
kills its worker on every delivery (dead-lettered after max_deliveries instead of looping).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from aiotasks import App, TaskFailed, TaskState, UnknownTask
from aiotasks.admin import Admin
from tests.helpers import wait_consuming, wait_until

Spawn = Callable[..., Any]

ADD = "tests.apps.basic.add"
SUICIDE = "tests.apps.basic.suicide"


async def dead_letters(app: App, queue: str = "default") -> list[dict[bytes, bytes]]:
    entries = await app.client.redis.xrange(app.client.keys.dead(queue))
    return [fields for _, fields in entries]


async def wait_dead_letters(app: App, n: int, timeout: float = 10) -> list[dict[bytes, bytes]]:
    async def enough() -> bool:
        return len(await dead_letters(app)) >= n

    await wait_until(enough, timeout, f"{n} dead letter(s)")
    return await dead_letters(app)


async def queue_is_empty(app: App, queue: str = "default") -> bool:
    """No entry left on the queue's streams, and none pending."""
    r = app.client.redis
    for stream in app.client.keys.streams(queue):
        if await r.xlen(stream):
            return False
        if await r.exists(stream) and (await r.xpending(stream, "workers"))["pending"]:
            return False
    return True


async def worker_goes_on(app: App, proc: Any) -> None:
    """The worker is alive and still runs tasks."""
    assert proc.proc.poll() is None, proc.output()
    assert await (await app.send_task(ADD, args=(40, 2))).result(timeout=10) == 42
    assert proc.proc.poll() is None, proc.output()


async def test_unknown_task_is_dead_lettered_and_fails(app: App, spawn_worker: Spawn) -> None:
    w = spawn_worker()
    await wait_consuming(app, w)
    h = await app.send_task("no.such.task", args=(1,))
    with pytest.raises(UnknownTask) as err:
        await h.result(timeout=10)
    assert isinstance(err.value, TaskFailed) and isinstance(err.value, LookupError)
    assert err.value.exc_type == "UnknownTask"
    assert "no.such.task" in err.value.exc_message
    info = await h.info()
    assert info.state == TaskState.FAILURE
    assert info.exc_type == "UnknownTask"

    (dead,) = await wait_dead_letters(app, 1)
    assert dead[b"id"].decode() == h.id
    assert b"UnknownTask" in dead[b"reason"]
    assert b"m" in dead  # the original message is kept for inspection or replay
    assert await queue_is_empty(app)
    await asyncio.to_thread(w.wait_for_output, "no.such.task", 5)  # logged, naming it
    await worker_goes_on(app, w)


@pytest.mark.parametrize(
    ("ct", "payload"),
    [
        ("msgpack", b"\xc1garbage"),  # 0xc1 is never valid msgpack
        ("msgpack", b"\x2a"),  # valid msgpack (42), but not a task message
        ("json", b"{not json"),
        ("pickle", b"\x80\x04K*."),  # a content type the worker does not speak
    ],
    ids=["bad-msgpack", "not-a-message", "bad-json", "unknown-ct"],
)
async def test_undecodable_entry_is_dead_lettered_and_fails(
    app: App, spawn_worker: Spawn, ct: str, payload: bytes
) -> None:
    w = spawn_worker()
    await wait_consuming(app, w)
    task_id = uuid.uuid4().hex
    stream = app.client.keys.stream("default", 5)
    await app.client.redis.xadd(stream, {"id": task_id, "ct": ct, "m": payload})

    h = app.handle(task_id)
    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=10)
    assert err.value.exc_type == "DecodeError"
    assert (await h.info()).state == TaskState.FAILURE

    (dead,) = await wait_dead_letters(app, 1)
    assert dead[b"id"].decode() == task_id
    assert dead[b"m"] == payload
    assert dead[b"ct"].decode() == ct
    assert b"DecodeError" in dead[b"reason"]
    assert await queue_is_empty(app)
    await worker_goes_on(app, w)


async def test_entry_without_known_fields_is_dead_lettered(app: App, spawn_worker: Spawn) -> None:
    w = spawn_worker()
    await wait_consuming(app, w)
    stream = app.client.keys.stream("default", 5)
    await app.client.redis.xadd(stream, {"foo": "bar"})

    (dead,) = await wait_dead_letters(app, 1)
    assert dead[b"foo"] == b"bar"
    assert dead.get(b"reason")
    assert await queue_is_empty(app)
    await worker_goes_on(app, w)
    assert len(await dead_letters(app)) == 1


async def suicide_with_earlier_deliveries(app: App, earlier: int) -> str:
    """`suicide` on its stream as a new entry whose run was delivered `earlier` times
    before (`dl`: as finish.lua writes it for a task that waited for its slot)."""
    import msgpack  # type: ignore[import-untyped]

    task_id = uuid.uuid4().hex
    payload = msgpack.packb({"name": SUICIDE, "args": [], "kwargs": {}})
    r: Any = app.client.redis
    async with r.pipeline(transaction=True) as pipe:
        tkey = app.client.keys.task(task_id)
        pipe.hset(tkey, mapping={"state": "PENDING", "name": SUICIDE, "queue": "default"})
        pipe.expire(tkey, 300)
        fields = {"v": 2, "id": task_id, "ct": "msgpack", "m": payload, "dl": earlier}
        pipe.xadd(app.client.keys.stream("default", 5), fields)
        await pipe.execute()
    return task_id


@pytest.mark.parametrize("earlier", [0, 2], ids=["fresh", "delivered-twice-before"])
async def test_task_that_kills_every_worker_is_dead_lettered_after_max_deliveries(
    app: App, spawn_worker: Spawn, earlier: int
) -> None:
    """`suicide` SIGKILLs whichever worker runs it. Workers restarted in a loop (as a
    supervisor would) see it redelivered max_deliveries times, then dead-lettered. The
    deliveries of a run's earlier entries (a wait for a concurrency slot made it a new
    entry) count: they were lost, and such a task looped for ever."""
    if earlier:
        h = app.handle(await suicide_with_earlier_deliveries(app, earlier))
    else:
        h = await app.send_task(SUICIDE)
    max_deliveries = 3
    died: list[int] = []
    last = None
    for _ in range(8):
        last = spawn_worker("--max-deliveries", str(max_deliveries))

        async def settled(proc: Any = last) -> bool:
            return proc.proc.poll() is not None or (await h.state()).is_final

        await wait_until(settled, 15, "the worker to die or the task to settle")
        if last.proc.poll() is not None:
            assert last.proc.returncode == -9, last.output()
            died.append(last.pid)
            continue
        break
    assert last is not None
    assert len(died) == max_deliveries - earlier, f"{len(died)} workers died"

    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=5)
    assert err.value.exc_type == "MaxDeliveriesExceeded"
    info = await h.info()
    assert info.state == TaskState.FAILURE
    assert info.exc_type == "MaxDeliveriesExceeded"

    (dead,) = await dead_letters(app)
    assert dead[b"id"].decode() == h.id
    assert b"max_deliveries=3" in dead[b"reason"]
    assert b"delivered 4 times" in dead[b"reason"], dead[b"reason"]
    assert await queue_is_empty(app)
    await worker_goes_on(app, last)


async def test_a_task_that_kills_its_worker_takes_none_of_its_batch_mates_along(
    app: App, spawn_worker: Spawn
) -> None:
    """The tasks running beside a process killer died with it, twice, and reached
    max_deliveries with it (dead-lettered, never run). From its third delivery a
    reclaimed entry runs alone on an idle worker: only the killer is dead-lettered."""
    sup = spawn_worker("--concurrency", "8", "--processes", "2")
    await asyncio.sleep(1.5)  # both children up (the supervisor restarts the killed ones)
    killer, *mates = await asyncio.gather(
        app.send_task("tests.apps.basic.slow_suicide", args=(0.2,)),
        *(app.send_task("tests.apps.basic.sleep", args=(0.5,)) for _ in range(20)),
    )
    results = await asyncio.gather(*(h.result(timeout=60) for h in mates))
    assert results == [0.5] * 20
    with pytest.raises(TaskFailed) as err:
        await killer.result(timeout=30)
    assert err.value.exc_type == "MaxDeliveriesExceeded"
    assert [d[b"id"].decode() for d in await wait_dead_letters(app, 1)] == [killer.id]
    assert "runs alone" in sup.output()


async def test_requeueing_every_letter_takes_each_once_while_a_worker_runs(
    app: App, spawn_worker: Spawn
) -> None:
    """`requeue_dead(queue)` (`aiotasks dead-letters requeue QUEUE`) takes the letters
    there when it starts: a running worker dead-letters the requeued tasks again at once,
    and the command took those too, each letter many times over (3,800 for 300)."""
    w = spawn_worker()
    await wait_consuming(app, w)
    for _ in range(250):  # more than one batch of the requeue's reads
        await app.send_task("no.such.task")
    await wait_dead_letters(app, 250, timeout=20)
    assert await Admin(app).requeue_dead("default") == 250
    await wait_dead_letters(app, 250, timeout=20)  # dead-lettered again, once each
    await asyncio.sleep(0.5)
    assert len(await dead_letters(app)) == 250
    await worker_goes_on(app, w)
