"""A namespace spread over several shards (App(shards=N)), on one server.

Every task lives in the shard its id hashes to; what must meet in one atomic script
call (a chord, a chain, a task and its callbacks, a concurrency key's slots) shares one
shard. These tests check that each feature works across shards and that nothing needs
a second look at shard 0. test_cluster.py runs the same on a real cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from aiotasks import (
    App,
    ConfigurationError,
    TaskRevoked,
    TaskState,
    chain,
    chord,
    current_task,
    group,
)
from aiotasks.admin import Admin
from aiotasks.cli import cli
from aiotasks.index import TaskIndex
from aiotasks.keys import Keys, shard_of, shard_tag
from aiotasks.worker import Worker
from tests.helpers import wait_until

SHARDS = 3
StartWorker = Callable[..., Awaitable[Worker]]


def prefixes(namespace: str) -> list[str]:
    return [Keys(namespace, k, SHARDS).prefix for k in range(SHARDS)]


async def task_keys_per_shard(app: App) -> Counter[int]:
    """How many task hashes each shard holds."""
    counts: Counter[int] = Counter()
    for k, prefix in enumerate(prefixes(app.settings.namespace)):
        async for _ in app.client.redis.scan_iter(match=prefix + "t:*", count=1000):
            counts[k] += 1
    return counts


@pytest.fixture
def sapp(make_app: Callable[..., App]) -> App:
    a = make_app(shards=SHARDS)

    @a.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @a.task(name="tsum", queue="sums")
    async def tsum(xs: list[int]) -> int:
        return sum(xs)

    return a


def test_the_shard_tags_split_the_slots_evenly() -> None:
    from redis.crc import key_slot

    for namespace in ("aiotasks", "orders", "x"):
        tags = [shard_tag(namespace, k, SHARDS) for k in range(SHARDS)]
        assert tags[0] == namespace  # one shard keeps the classic layout
        ranges = sorted(key_slot(t.encode()) * SHARDS // 16384 for t in tags)
        assert ranges == [0, 1, 2], tags
    assert Keys("ns").prefix == Keys("ns", 0, 5).prefix == "{ns}:"


def test_shards_must_be_a_whole_number_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (0, -1, 65, "two", 2.5):
        with pytest.raises(ValueError, match="shards must be a whole number"):
            App(shards=bad)  # type: ignore[arg-type]
    monkeypatch.setenv("AIOTASKS_SHARDS", "4")
    assert App().settings.shards == 4
    assert App(shards=2).settings.shards == 2
    monkeypatch.setenv("AIOTASKS_SHARDS", "many")
    with pytest.raises(ValueError, match=r"^\$AIOTASKS_SHARDS must be a whole number"):
        App()  # naming where the value came from


async def test_one_queue_spreads_over_every_shard_and_every_task_ends(
    sapp: App, worker: StartWorker
) -> None:
    add = sapp.tasks["add"]
    handles = [await add.send(i, 1) for i in range(60)]
    handles += await add.send_many([((i, 2), None) for i in range(60)])
    handles.append(await sapp.send_task(add.name, args=(5, 5)))
    per_shard = await task_keys_per_shard(sapp)
    assert sorted(per_shard) == [0, 1, 2]
    assert min(per_shard.values()) >= 121 * 0.2, per_shard
    keys = prefixes(sapp.settings.namespace)
    for h in handles:  # each task's hash is under its own shard's prefix
        assert await sapp.client.redis.exists(f"{keys[shard_of(h.id, SHARDS)]}t:{h.id}")
    await worker(sapp, concurrency=8)
    results = [await h.result(timeout=20) for h in handles]
    assert results == [i + 1 for i in range(60)] + [i + 2 for i in range(60)] + [10]


async def test_canvases_keep_their_ids_in_one_shard_and_run(sapp: App, worker: StartWorker) -> None:
    add, tsum = sapp.tasks["add"], sapp.tasks["tsum"]
    await worker(sapp, queues=["default", "sums"], concurrency=8)
    for _ in range(4):  # random shards: several canvases land in several of them
        c = await chord([add.s(i, i) for i in range(6)], tsum.s()).send()
        assert await c.result(timeout=20) == 30
        ch = await chain(add.s(1, 1), add.s(10), add.s(100)).send()
        assert await ch.result(timeout=20) == 112
        linked = await add.s(2, 2).set(link=add.s(1)).send()
        assert await linked.result(timeout=20) == 4
    # A group's members with ids of their own go to their own shards.
    ids = [f"member-{i}" for i in range(9)]
    assert len({shard_of(i, SHARDS) for i in ids}) > 1
    g = await group([add.s(i, i).set(task_id=tid) for i, tid in enumerate(ids)]).send()
    assert [h.id for h in g.handles] == ids
    assert await g.results(timeout=20) == [2 * i for i in range(9)]
    # The final task's own id picks the canvas's shard.
    final = await chain(add.s(1, 2), add.s(3)).send(task_id="chain-final")
    assert final.id == "chain-final" and await final.result(timeout=20) == 6


async def test_replace_draws_the_replacement_in_the_replaced_tasks_shard(
    sapp: App, worker: StartWorker
) -> None:
    add = sapp.tasks["add"]

    @sapp.task(name="fan")
    async def fan(x: int) -> Any:
        raise current_task().replace(chain(add.s(x, 1), add.s(10)))

    @sapp.task(name="spread")
    async def spread(n: int) -> Any:
        raise current_task().replace(group(add.s(i, i) for i in range(n)))

    await worker(sapp, concurrency=8)
    handles = [await fan.send(i) for i in range(9)]
    assert len({shard_of(h.id, SHARDS) for h in handles}) > 1
    assert [await h.result(timeout=20) for h in handles] == [i + 11 for i in range(9)]
    g = [await spread.send(4) for _ in range(6)]
    assert [await h.result(timeout=20) for h in g] == [[0, 2, 4, 6]] * 6


async def test_a_chord_whose_given_ids_are_in_different_shards_is_refused(sapp: App) -> None:
    add, tsum = sapp.tasks["add"], sapp.tasks["tsum"]
    ids = ["h-0", "h-1", "h-2", "h-3", "h-4"]
    assert len({shard_of(i, SHARDS) for i in ids}) > 1
    with pytest.raises(ValueError, match="in one shard"):
        await chord([add.s(1, 1).set(task_id=i) for i in ids], tsum.s()).send()
    assert sum((await task_keys_per_shard(sapp)).values()) == 0  # nothing was enqueued


async def test_a_concurrency_limit_holds_across_shards(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    a = make_app(shards=SHARDS)
    running: Counter[int] = Counter()
    peak: Counter[int] = Counter()

    @a.task(concurrency_limit=2, concurrency_key="customer")
    async def limited(customer: int, i: int) -> int:
        running[customer] += 1
        peak[customer] = max(peak[customer], running[customer])
        await asyncio.sleep(0.05)
        running[customer] -= 1
        return i

    handles = [await limited.send(i % 3, i) for i in range(30)]
    # A group's plain members go to their keys' shards too.
    g = await group(limited.s(i % 3, i) for i in range(30, 45)).send()
    handles += g.handles
    # Each customer's tasks are in the shard of its key, whatever their random ids.
    for i, h in enumerate(handles):
        assert shard_of(h.id, SHARDS) == shard_of(f"{limited.name}:{i % 3}", SHARDS)
    for _ in range(2):
        await worker(a, concurrency=20)
    assert [await h.result(timeout=30) for h in handles] == list(range(45))
    assert max(peak.values()) == 2, peak
    # An id of its own must be in its key's shard; a canvas cannot hold it.
    key_shard = shard_of(f"{limited.name}:0", SHARDS)
    other = next(f"id-{n}" for n in range(99) if shard_of(f"id-{n}", SHARDS) != key_shard)
    with pytest.raises(ValueError, match="not in the shard"):
        await limited.options(task_id=other).send(0, 99)
    with pytest.raises(ValueError, match="concurrency limit or debounce"):
        await chain(limited.s(0, 1), limited.s(2)).send()


async def test_debounce_across_shards(make_app: Callable[..., App], worker: StartWorker) -> None:
    a = make_app(shards=SHARDS)
    ran: list[str] = []

    @a.task(debounce=0.3, debounce_key="user")
    async def refresh(user: str, n: int) -> int:
        ran.append(f"{user}:{n}")
        return n

    hs = [await refresh.send(u, n) for n in range(3) for u in ("ann", "bob", "cy")]
    await worker(a, concurrency=4)
    assert [await h.result(timeout=10) for h in hs[-3:]] == [2, 2, 2]
    await asyncio.sleep(0.5)
    assert sorted(ran) == ["ann:2", "bob:2", "cy:2"]


async def test_one_worker_runs_every_shard_under_one_concurrency_limit(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    a = make_app(shards=SHARDS)
    running = 0
    peak = 0

    @a.task
    async def nap(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return i

    handles = await nap.send_many([((i,), None) for i in range(90)])
    assert len({shard_of(h.id, SHARDS) for h in handles}) == SHARDS
    await worker(a, concurrency=4)
    assert [await h.result(timeout=30) for h in handles] == list(range(90))
    assert peak == 4


async def test_waiting_on_an_idle_worker_wakes_for_every_shard(
    sapp: App, worker: StartWorker
) -> None:
    """Idle, a worker waits on every shard at once: a task in any shard starts at once."""
    add = sapp.tasks["add"]
    await worker(sapp, concurrency=4, block=2.0)
    await asyncio.sleep(0.3)  # every lane is in its blocking wait now
    seen: set[int] = set()
    sends = 0
    # Ids are random, so send until every shard has had one (three in each's
    # expectation; 200 leaves a chance of about 1e-35 to miss one).
    while seen != {0, 1, 2} and sends < 200:
        h = await add.send(sends, 0)
        seen.add(shard_of(h.id, SHARDS))
        t0 = asyncio.get_running_loop().time()
        assert await h.result(timeout=5) == sends
        assert asyncio.get_running_loop().time() - t0 < 1.0
        sends += 1
    assert seen == {0, 1, 2}


async def test_admin_status_purge_dead_letters_and_revoke_see_every_shard(
    sapp: App, worker: StartWorker
) -> None:
    add = sapp.tasks["add"]
    admin = Admin(sapp)
    handles = [await add.send(i, 1) for i in range(30)]
    later = [await add.options(countdown=60).send(i, 1) for i in range(6)]
    assert len({shard_of(h.id, SHARDS) for h in handles}) == SHARDS
    status = await admin.status()
    default = next(q for q in status.queues if q.name == "default")
    assert (default.waiting, default.scheduled) == (30, 6)
    info = await admin.inspect(handles[-1].id)
    assert info.state is TaskState.PENDING
    assert (await admin.arguments(handles[-1].id)).args == [29, 1]  # type: ignore[union-attr]
    assert await admin.revoke(later[0].id) is TaskState.SCHEDULED
    with pytest.raises(TaskRevoked):
        await later[0].result(timeout=2)
    assert await admin.purge("default") == 35
    # Dead letters from every shard: unknown names, listed and requeued together.
    ghosts = [await sapp.send_task("no.such.task") for _ in range(9)]
    assert len({shard_of(h.id, SHARDS) for h in ghosts}) > 1
    w = await worker(sapp, concurrency=4)
    for g in ghosts:
        with pytest.raises(Exception, match="UnknownTask|no.such.task"):
            await g.result(timeout=10)
    dead = await admin.dead_letters("default")
    assert sorted(d.task_id or "" for d in dead) == sorted(g.id for g in ghosts)
    w.stop()
    await asyncio.sleep(0.3)  # its fetch loop ends within `block`
    assert await admin.requeue_dead("default") == 9
    assert (await admin.queue_status("default")).waiting == 9
    assert await admin.purge("default") == 9


async def test_the_task_index_and_feed_merge_every_shard(sapp: App, worker: StartWorker) -> None:
    add = sapp.tasks["add"]
    index = TaskIndex(sapp.client)
    after = await index.last_id()
    await worker(sapp, concurrency=8)
    followed: list[Any] = []

    async def follow() -> None:
        async for event in index.follow(after=after, block_ms=200):
            followed.append(event)

    for shard in sapp.client.shards:  # each shard keeps its share of the caps
        caps = await shard.redis.hmget(shard.keys.meta, ["index_cap", "events_cap"])
        assert caps == [b"3334", b"334"]
    reader = asyncio.create_task(follow())
    handles = [await add.send(i, i) for i in range(30)]
    assert [await h.result(timeout=20) for h in handles] == [2 * i for i in range(30)]
    ids = {h.id for h in handles}

    async def all_followed() -> bool:
        return ids <= {e.task_id for e in followed if e.state == "SUCCESS"}

    await wait_until(all_followed, timeout=10)
    reader.cancel()
    recent = await index.recent(state="SUCCESS", limit=100)
    assert {i.id for i in recent} >= ids
    # Newest first over every shard, by the index's own scores (commit times).
    scores = []
    for info in recent:
        shard = sapp.client.for_task(info.id)
        scores.append(await shard.redis.zscore(shard.keys.index_done, info.id))
    assert scores == sorted(scores, reverse=True)
    assert len({shard_of(i.id, SHARDS) for i in recent}) == SHARDS
    events = await index.events(after=after)
    assert ids <= {e.task_id for e in events if e.state == "SUCCESS"}


async def test_a_feed_cursor_holds_each_shards_own_position(sapp: App) -> None:
    """Each shard's feed has ids of its own (on a Cluster, its own clock): a single id
    as the cursor would skip a shard's entry older than another shard's newest one."""
    index = TaskIndex(sapp.client)
    a, b, c = (cast(Any, s.redis) for s in sapp.client.shards)
    ka, kb, kc = (s.keys.events for s in sapp.client.shards)
    await a.xadd(ka, {"t": 1, "e": "SUCCESS\ta1"}, id="5000-0")
    await b.xadd(kb, {"t": 1, "e": "SUCCESS\tb1"}, id="1000-0")
    cursor = await index.last_id()
    assert cursor == "5000-0,1000-0,0-0"
    # Written after the cursor was taken, with ids below shard a's newest.
    await b.xadd(kb, {"t": 1, "e": "SUCCESS\tb2"}, id="2000-0")
    await c.xadd(kc, {"t": 1, "e": "SUCCESS\tc1"}, id="3000-0")
    missed = await index.events(after=cursor)
    assert [e.task_id for e in missed] == ["b2", "c1"]
    assert missed[-1].cursor == "5000-0,2000-0,3000-0"
    # A follower resumes from an event's cursor: what came after, nothing twice.
    await a.xadd(ka, {"t": 1, "e": "SUCCESS\ta2"}, id="6000-0")
    await c.xadd(kc, {"t": 1, "e": "SUCCESS\tc2"}, id="4000-0")
    seen: list[str | None] = []
    async for event in index.follow(after=missed[-1].cursor or "", block_ms=100):
        seen.append(event.task_id)
        if len(seen) == 2:
            break
    assert sorted(seen, key=str) == ["a2", "c2"]
    # A plain entry id still means the same position on every shard.
    assert [e.task_id for e in await index.events(after="2500-0")] == ["c1", "c2", "a1", "a2"]


async def test_a_cursor_from_following_new_events_only_resumes_every_shard(sapp: App) -> None:
    """follow() from "$" (new only): its events' cursors name each shard's entry id, not
    "$", so a resume misses nothing a quiet shard wrote meanwhile."""
    index = TaskIndex(sapp.client)
    a, b, _ = (cast(Any, s.redis) for s in sapp.client.shards)
    ka, kb, _ = (s.keys.events for s in sapp.client.shards)
    followed: list[Any] = []

    async def follow() -> None:
        async for event in index.follow(block_ms=100):
            followed.append(event)
            return

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)  # it reads, from each shard's newest entry
    await a.xadd(ka, {"t": 1, "e": "SUCCESS\ta1"})
    await asyncio.wait_for(reader, 5)
    cursor = followed[0].cursor or ""
    assert "$" not in cursor
    await b.xadd(kb, {"t": 1, "e": "SUCCESS\tb1"})  # while nobody follows
    assert [e.task_id for e in await index.events(after=cursor)] == ["b1"]
    async for event in index.follow(after=cursor, block_ms=100):
        assert event.task_id == "b1"
        break


async def test_a_worker_with_another_shard_count_refuses_to_start(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    await worker(make_app(shards=SHARDS), concurrency=2)
    with pytest.raises(ConfigurationError, match="spread over 3 shard"):
        await make_app(shards=2).worker().prepare()


async def test_the_cli_reads_the_namespaces_shard_count(
    sapp: App, worker: StartWorker, redis_url: str
) -> None:
    add = sapp.tasks["add"]
    await worker(sapp, concurrency=2)  # records the count
    ns = sapp.settings.namespace
    handles = [await add.options(queue="parked").send(i, 1) for i in range(12)]
    assert len({shard_of(h.id, SHARDS) for h in handles}) > 1
    # A bare CLI (no --app, no $AIOTASKS_SHARDS) finds the tasks of every shard.
    conn = ["--redis-url", redis_url, "--namespace", ns]
    run = await asyncio.to_thread(CliRunner().invoke, cli, ["status", *conn, "--json"])
    assert run.exit_code == 0, run.output
    parked = next(q for q in json.loads(run.stdout)["queues"] if q["name"] == "parked")
    assert parked["waiting"] == 12, run.stdout
    run = await asyncio.to_thread(CliRunner().invoke, cli, ["purge", "parked", *conn, "--yes"])
    assert run.exit_code == 0 and "12" in run.output, run.output
    assert [await h.state() for h in handles] == [TaskState.REVOKED] * 12


async def test_a_sigkilled_worker_loses_nothing_across_shards(
    make_app: Callable[..., App], spawn_worker: Callable[..., Any]
) -> None:
    a = make_app(shards=SHARDS, visibility_timeout=2)
    env = {"AIOTASKS_SHARDS": str(SHARDS), "AIOTASKS_TEST_VT": "2"}
    first = spawn_worker("--concurrency", "20", env=env)
    handles = [await a.send_task("tests.apps.basic.sleep", args=(0.5,)) for _ in range(30)]
    assert len({shard_of(h.id, SHARDS) for h in handles}) == SHARDS

    async def started() -> bool:
        states = [await h.state() for h in handles]
        return states.count(TaskState.STARTED) >= 10

    await wait_until(started, timeout=15)
    os.kill(first.pid, signal.SIGKILL)
    spawn_worker("--concurrency", "20", env=env)
    assert [await h.result(timeout=60) for h in handles] == [0.5] * 30


def ids_in_shards(prefix: str) -> list[str]:
    """One id per shard, in shard order."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < SHARDS:
        found.setdefault(shard_of(f"{prefix}-{n}", SHARDS), f"{prefix}-{n}")
        n += 1
    return [found[k] for k in range(SHARDS)]


async def test_an_id_set_on_a_signature_picks_its_canvass_shard(
    sapp: App, worker: StartWorker
) -> None:
    add = sapp.tasks["add"]
    await worker(sapp, concurrency=8)
    for k, given in enumerate(ids_in_shards("linked")):
        h = await add.s(k, k).set(task_id=given, link=add.s(100)).send()
        assert h.id == given and await h.result(timeout=20) == 2 * k
    for k, given in enumerate(ids_in_shards("last")):
        h = await chain(add.s(k, 1), add.s(10).set(task_id=given)).send()
        assert h.id == given and await h.result(timeout=20) == k + 11


async def test_a_replacement_naming_an_id_of_another_shard_fails_its_task(
    sapp: App, worker: StartWorker
) -> None:
    add = sapp.tasks["add"]

    @sapp.task(name="swap")
    async def swap(other: str) -> Any:
        raise current_task().replace(add.s(1, 1).set(task_id=other))

    await worker(sapp, concurrency=4)
    ids = ids_in_shards("replaced")
    h = await swap.options(task_id=ids[0]).send(ids[1])
    with pytest.raises(Exception, match="outside its shard"):
        await h.result(timeout=10)
    assert await sapp.handle(ids[1]).state() is TaskState.PENDING  # never enqueued


async def test_aiotasks_web_shows_the_tasks_of_every_shard(
    sapp: App, worker: StartWorker, redis_url: str
) -> None:
    import httpx

    from tests.test_dashboard import aiotasks, free_port, once_up

    await worker(sapp, concurrency=2)  # records the shard count
    handles = [await sapp.tasks["add"].send(k, k) for k in range(9)]
    assert len({shard_of(h.id, SHARDS) for h in handles}) > 1
    assert [await h.result(timeout=10) for h in handles] == [2 * k for k in range(9)]
    port, ns = free_port(), sapp.settings.namespace
    proc = aiotasks("web", "--redis-url", redis_url, "--namespace", ns, "--port", str(port))
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            page = await once_up(client, f"http://127.0.0.1:{port}/tasks")
            assert all(h.id in page.text for h in handles), page.text
            for h in handles:
                detail = await client.get(f"http://127.0.0.1:{port}/tasks/{h.id}")
                assert detail.status_code == 200 and "SUCCESS" in detail.text
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


async def test_a_sender_with_another_shard_count_is_refused(
    sapp: App, make_app: Callable[..., App], worker: StartWorker
) -> None:
    await worker(sapp, concurrency=2)
    other = make_app(shards=2)

    @other.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ConfigurationError, match="spread over 3 shard"):
        await add.send(1, 2)
    with pytest.raises(ConfigurationError):
        await chain(add.s(1, 2), add.s(3)).send()
    with pytest.raises(ValueError, match="cannot contain '#'"):
        App(namespace="a#b", shards=2)
