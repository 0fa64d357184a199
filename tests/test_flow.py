"""Flow control with real worker processes: per-key concurrency limits, run-time
schedules, paused queues, and per-key rate limits."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, Signature, TaskState, Worker
from tests.helpers import wait_consuming

Spawn = Callable[..., Any]
StartWorker = Callable[..., Awaitable[Worker]]


def sig(app: App, name: str, *args: Any) -> Signature:
    return Signature(f"tests.apps.flow.{name}", args, app=app)


def key(app: App, name: str) -> str:
    return f"{app.client.keys.prefix}test:{name}"


def recording_job(app: App) -> tuple[Any, list[str]]:
    """A task that records each run's tag (in this process) and returns it."""
    ran: list[str] = []

    @app.task(name="job")
    async def job(tag: str) -> str:
        ran.append(tag)
        return tag

    return job, ran


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.slow
async def test_concurrency_limit_per_key_across_workers(app: App, spawn_worker: Spawn) -> None:
    workers = [spawn_worker("--concurrency", "20", module="flow") for _ in range(3)]
    await wait_consuming(app, *workers)
    t0 = time.monotonic()
    handles = [await sig(app, "limited", i % 5, i).send() for i in range(50)]
    waiting = [await h.state() for h in handles]
    results = [await h.result(timeout=60) for h in handles]
    elapsed = time.monotonic() - t0
    assert results == list(range(50))
    raw = await app.client.redis.lrange(key(app, "spans"), 0, -1)
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    pids = set()
    for line in raw:
        customer, start, end, pid = line.decode().split()
        spans[int(customer)].append((float(start), float(end)))
        pids.add(pid)
    assert sorted(len(v) for v in spans.values()) == [10] * 5
    assert all(max_overlap(v) <= 2 for v in spans.values()), dict(spans)
    assert max(max_overlap(v) for v in spans.values()) == 2  # the limit was used
    # 10 runs of 0.3 s per key, 2 at a time: about 1.5 s, not 10 x 0.3 s.
    assert elapsed < 6.0, elapsed
    assert TaskState.SCHEDULED in waiting or TaskState.PENDING in waiting
    assert len(pids) >= 2  # the limit held across processes


@pytest.mark.slow
async def test_a_killed_holder_does_not_block_its_key(app: App, spawn_worker: Spawn) -> None:
    workers = [spawn_worker("--concurrency", "5", module="flow") for _ in range(2)]
    await wait_consuming(app, *workers)
    first = await sig(app, "hog", 7, 0).send()
    await asyncio.sleep(0.3)  # the first takes the slot, then its worker dies
    rest = [await sig(app, "hog", 7, i).send() for i in range(1, 4)]
    t0 = time.monotonic()
    assert [await h.result(timeout=20) for h in [first, *rest]] == [0, 1, 2, 3]
    # Freed once its lease (the visibility timeout, 1 s) ended: seconds, not forever.
    assert time.monotonic() - t0 < 10
    runs = await app.client.redis.lrange(key(app, "hog-runs"), 0, -1)
    assert len(runs) == 4
    assert sum(1 for w in workers if w.proc.poll() is not None) == 1


@pytest.mark.slow
async def test_a_redelivered_task_that_waits_for_its_slot_keeps_its_attempt_count(
    app: App, spawn_worker: Spawn
) -> None:
    """A task whose worker died, reclaimed while another run holds its key's only slot,
    waits for the slot and goes back to its stream as a new entry: it ran as attempt 1
    again, and its deliveries never reached max_deliveries (a task that kills its worker
    each time would have run for ever)."""
    first = spawn_worker(module="flow")
    await wait_consuming(app, first)
    stuck = await sig(app, "once_stuck", 7, "stuck", 0).send()
    runs = key(app, "stuck-runs")
    async with asyncio.timeout(10):
        while not await app.client.redis.llen(runs):
            await asyncio.sleep(0.05)
    first.kill()
    # A run of the same key on another queue takes the slot once the dead run's lease
    # ends, and holds it while the stuck task is reclaimed.
    other = spawn_worker("--queues", "other", module="flow")
    holder = await sig(app, "once_stuck", 7, "holder", 4).set(queue="other").send()
    async with asyncio.timeout(20):
        while await holder.state() is not TaskState.STARTED:
            await asyncio.sleep(0.05)
    second = spawn_worker(module="flow")
    async with asyncio.timeout(15):  # reclaimed, it waits for the slot the holder has
        while await stuck.state() is not TaskState.SCHEDULED:
            await asyncio.sleep(0.02)
    assert await holder.result(timeout=20) == 1
    assert await stuck.result(timeout=20) == 2
    assert (await stuck.info()).attempts == 2
    ran = [r.decode() for r in await app.client.redis.lrange(runs, 0, -1)]
    assert ran == ["stuck:1", "holder:1", "stuck:2"], ran
    assert "reclaimed entry" in second.output(), second.output()
    other.kill()


@pytest.mark.slow
async def test_a_schedule_added_at_run_time_fires_once_per_tick(
    app: App, spawn_worker: Spawn
) -> None:
    workers = [spawn_worker(module="flow") for _ in range(3)]
    await wait_consuming(app, *workers)
    ticks = key(app, "ticks:rt")
    await app.schedules.add("rt", sig(app, "tick", "rt"), every=1)
    assert [s.name for s in await app.schedules.list()] == ["rt"]
    await asyncio.sleep(4.2)
    fired = [float(x) for x in await app.client.redis.lrange(ticks, 0, -1)]
    assert 3 <= len(fired) <= 5, fired
    seconds = [int(f) for f in fired]
    assert len(set(seconds)) == len(seconds), "a tick fired twice"

    await app.schedules.pause("rt")
    await asyncio.sleep(1.5)  # taken up within a second
    paused_at = await app.client.redis.llen(ticks)
    await asyncio.sleep(2.5)
    assert await app.client.redis.llen(ticks) == paused_at
    assert (await app.schedules.get("rt")).paused

    await app.schedules.resume("rt")
    await asyncio.sleep(2.5)
    assert await app.client.redis.llen(ticks) > paused_at
    await app.schedules.remove("rt")
    assert await app.schedules.list() == []


async def test_a_paused_queue_is_not_consumed_and_loses_nothing(
    app: App, worker: StartWorker
) -> None:
    job, ran = recording_job(app)
    await app.queues.pause("a")
    await worker(queues=["a", "b"])
    await asyncio.sleep(1.2)  # the worker reads the paused set within a second
    ha = [await job.options(queue="a").send(f"a{i}") for i in range(3)]
    hb = await job.options(queue="b").send("b")
    assert await hb.result(timeout=5) == "b"
    await asyncio.sleep(1.0)
    assert ran == ["b"]
    assert [await h.state() for h in ha] == [TaskState.PENDING] * 3
    assert await app.queues.paused() == {"a"}
    await app.queues.resume("a")
    assert [await h.result(timeout=5) for h in ha] == ["a0", "a1", "a2"]


@pytest.mark.parametrize("name", ["", " ", "a,b", " a"])
async def test_pausing_a_name_no_worker_could_take_from_is_refused(app: App, name: str) -> None:
    with pytest.raises(ValueError, match="is not a queue name"):
        await app.queues.pause(name)
    assert await app.queues.paused() == set()


async def test_a_worker_started_after_the_pause_takes_nothing_from_it(
    app: App, worker: StartWorker
) -> None:
    job, ran = recording_job(app)
    await app.queues.pause("a")
    held = await job.options(queue="a").send("held")
    await worker(queues=["a", "b"])  # its very first fetch already leaves "a" alone
    hb = await job.options(queue="b").send("b")
    assert await hb.result(timeout=5) == "b"
    await asyncio.sleep(0.5)
    assert ran == ["b"]
    assert await held.state() == TaskState.PENDING
    await app.queues.resume("a")
    assert await held.result(timeout=5) == "held"


async def test_a_pause_takes_effect_at_once_for_a_running_worker(
    app: App, worker: StartWorker
) -> None:
    """pause() then send() straight away: the idle worker, blocked reading the queue,
    runs nothing of it (a task its read was already taking goes back, unrun)."""
    job, ran = recording_job(app)
    await worker(queues=["a"])
    warm = await job.options(queue="a").send("warm")
    assert await warm.result(timeout=5) == "warm"
    for round_ in range(3):
        await app.queues.pause("a")
        held = [await job.options(queue="a").send(f"{round_}-{i}") for i in range(3)]
        await asyncio.sleep(0.5)
        # (One the read was taking goes back to the end of its queue: order may change.)
        assert sorted(ran) == sorted(
            ["warm"] + [f"{r}-{i}" for r in range(round_) for i in range(3)]
        )
        assert {await h.state() for h in held} == {TaskState.PENDING}
        await app.queues.resume("a")
        assert [await h.result(timeout=5) for h in held] == [f"{round_}-{i}" for i in range(3)]


async def test_rate_limit_per_key(app: App, worker: StartWorker) -> None:
    starts: dict[int, list[float]] = defaultdict(list)

    @app.task(rate_limit="2/s", rate_key="customer")
    async def call(customer: int) -> None:
        starts[customer].append(time.monotonic())

    await worker(concurrency=10)
    handles = [await call.send(c) for c in (1, 2) for _ in range(3)]
    for h in handles:
        await h.result(timeout=10)
    for c in (1, 2):
        gaps = [b - a for a, b in zip(starts[c], starts[c][1:], strict=False)]
        assert all(g >= 0.4 for g in gaps), gaps  # 2/s per customer
    # The two customers do not share a limit: both started at once.
    assert abs(starts[1][0] - starts[2][0]) < 0.3


def test_flow_options_are_checked_when_declared(app: App) -> None:
    with pytest.raises(ValueError, match="concurrency_key"):

        @app.task(concurrency_key="x")
        async def no_limit(x: int) -> None: ...

    with pytest.raises(ValueError, match="no such argument"):

        @app.task(concurrency_limit=1, concurrency_key="nope")
        async def wrong_arg(x: int) -> None: ...

    with pytest.raises(ValueError, match="concurrency_limit"):

        @app.task(concurrency_limit=0)
        async def zero(x: int) -> None: ...


@pytest.mark.slow
async def test_debounce_runs_once_with_the_last_arguments(app: App, spawn_worker: Spawn) -> None:
    workers = [spawn_worker(module="flow") for _ in range(2)]
    await wait_consuming(app, *workers)

    # The sender declares the task as the workers do: debounce is applied when sending.
    @app.task(name="tests.apps.flow.reindex", debounce=1.0, debounce_key="doc_id")
    async def reindex(doc_id: int, version: int) -> int:
        raise AssertionError("runs on the worker processes only")

    handles = []
    for version in range(20):
        handles.append(await reindex.send(42, version))
        await asyncio.sleep(0.04)
    other = await reindex.send(7, 100)  # another document: its own window
    assert [await h.result(timeout=10) for h in handles] == [19] * 20
    assert await other.result(timeout=10) == 100
    await asyncio.sleep(1.5)
    runs = await app.client.redis.lrange(key(app, "reindex:42"), 0, -1)
    assert runs == [b"19"]
    assert [await h.state() for h in handles] == [TaskState.SUCCESS] * 20


async def test_a_debounced_task_is_refused_where_a_later_send_would_strand_a_canvas(
    app: App,
) -> None:
    """Superseded, a debounced send never runs: a chain, chord or callback waiting on it
    would never go on. So it goes on its own or as a plain group member; elsewhere, and
    with a countdown or eta (its debounce is its delay), the send is refused, nothing sent."""
    from aiotasks import chain, chord, group

    @app.task(debounce=1.0, debounce_key="doc_id")
    async def reindex(doc_id: int) -> int:
        return doc_id

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    refused = [
        chain(add.s(1, 1), reindex.s()),
        chain(reindex.s(1), add.s(1)),
        chord([reindex.s(1)], add.s(1)),
        chord([add.s(1, 1)], reindex.s()),
        group(reindex.s(1), chain(add.s(1, 1), reindex.s())),
        reindex.s(1).set(link=add.s(1)),
        add.s(1, 1).set(link=reindex.s()),
    ]
    for canvas in refused:
        with pytest.raises(ValueError, match="is debounced"):
            await canvas.send()
    with pytest.raises(ValueError, match="is debounced"):
        await group(reindex.s(1), reindex.s(2)).send(link=add.s(1))
    for options in ({"countdown": 5}, {"eta": time.time() + 5}):
        with pytest.raises(ValueError, match="countdown and eta do not apply"):
            await reindex.options(**options).send(1)
    assert [k async for k in app.client.redis.scan_iter(f"{app.client.keys.prefix}q:*")] == []
    assert await app.client.redis.zcard(app.client.keys.delayed) == 0
    # A schedule of it with a countdown would fail on every tick: refused when added.
    with pytest.raises(ValueError, match="countdown does not apply"):
        await app.schedules.add("deb", reindex.s(1).set(countdown=2), every=60)
    # On its own, and as plain group members, it is sent (and debounced).
    await reindex.send(3)
    await group(reindex.s(4), reindex.s(5)).send()
    assert await app.client.redis.zcard(app.client.keys.delayed) == 3


async def test_cli_schedules_queues_and_status(app: App) -> None:
    import json
    import subprocess
    import sys

    base = ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aiotasks", *args, *base],
            capture_output=True,
            text=True,
            timeout=30,
        )

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(cli, *args)
        assert done.returncode == 0, done.stderr
        return done

    await run("schedules", "add", "nightly", "reports.build", "--cron", "0 3 * * *",
              "--args", '["eu"]')  # fmt: skip
    await run("schedules", "pause", "nightly")
    listed = json.loads((await run("schedules", "list", "--json")).stdout)
    assert listed[0]["name"] == "nightly" and listed[0]["paused"] is True
    assert listed[0]["args"] == ["eu"] and listed[0]["cron"] == "0 3 * * *"
    await app.send_task("nobody.runs.this", queue="mail")
    await run("queues", "pause", "mail")
    status = json.loads((await run("status", "--json")).stdout)
    (mail,) = [q for q in status["queues"] if q["name"] == "mail"]
    assert mail["paused"] is True
    assert [(p["name"], p["paused"]) for p in status["periodic"]] == [("nightly", True)]
    table = (await run("status")).stdout
    assert "paused" in table
    await run("queues", "resume", "mail")
    # A worker keeps each schedule's next run (as one does once it has fired it).
    await app.client.redis.hset(app.client.keys.periodic, "nightly", 4102444800000)
    await run("schedules", "remove", "nightly")
    assert await app.queues.paused() == set()
    assert await app.schedules.list() == []
    assert json.loads((await run("status", "--json")).stdout)["periodic"] == []
    missing = await asyncio.to_thread(cli, "schedules", "pause", "nope")
    assert missing.returncode == 1 and missing.stderr.startswith("error: no schedule named")


async def test_a_schedule_never_fires_a_tick_due_before_it_was_added(app: App) -> None:
    """A worker takes a new schedule up within a second and may fire a tick up to a
    second late (GRACE), but never one that fell due before the schedule existed; the
    same after a resume."""
    from aiotasks.control import Schedules
    from aiotasks.schedule import Scheduler

    while not 0.05 < time.time() % 1 < 0.15:  # just after a tick: the one GRACE reaches
        await asyncio.sleep(0.01)  # back to is that tick, due before the schedule exists
    info = await app.schedules.add("early", sig(app, "tick", "early"), every=1)
    scheduler = Scheduler(app, "w", Schedules(app))
    await asyncio.sleep(0.3)  # taken up later, as a worker would
    assert scheduler._load(await Schedules(app).active())
    assert scheduler._next["early"] > info.since
    await app.schedules.pause("early")
    await asyncio.sleep(0.3)
    await app.schedules.resume("early")
    resumed = await app.schedules.get("early")
    assert resumed.since >= info.since + 300
    assert scheduler._load(await Schedules(app).active())
    assert scheduler._next["early"] > resumed.since


async def test_a_schedule_keeps_its_signatures_send_options(app: App) -> None:
    from aiotasks import chain
    from aiotasks.control import Schedules
    from aiotasks.schedule import Scheduler

    @app.task(name="report")
    async def report(region: str) -> str:
        return region

    info = await app.schedules.add(
        "opts", report.s("eu").set(queue="mail", priority=7, expires=60), every=3600
    )
    assert (info.queue, info.options) == ("mail", {"priority": 7, "expires": 60})
    stored = await app.schedules.get("opts")
    assert (stored.queue, stored.options) == ("mail", {"priority": 7, "expires": 60})
    # queue= given to add() wins over the signature's.
    assert (
        await app.schedules.add("q", report.s("eu").set(queue="x"), every=60, queue="y")
    ).queue == "y"
    # A tick's send carries them: queue "mail", priority 7.
    await Scheduler(app, "w", Schedules(app))._fire(stored.periodic(), 1_000)
    handle = app.handle("periodic:opts:1000")
    assert (await handle.info()).queue == "mail"
    assert await app.client.redis.xlen(app.client.keys.stream("mail", 7)) == 1

    with pytest.raises(TypeError, match="one task"):
        await app.schedules.add("c", chain(report.s("a"), report.s("b")), every=60)  # type: ignore[arg-type]
    # Arguments that do not fit a task this process knows, as send() refuses them.
    with pytest.raises(TypeError, match="report: missing a required argument: 'region'"):
        await app.schedules.add("noargs", report.s(), every=60)
    assert "noargs" not in [i.name for i in await app.schedules.list()]
    with pytest.raises(ValueError, match="task_id"):
        await app.schedules.add("t", report.s("a").set(task_id="fixed"), every=60)


async def test_schedule_specs_read_across_versions(app: App) -> None:
    """A spec without send options is written as 0.2.0 wrote it (its workers still read
    it), and a key a later version adds does not hide a schedule from this one."""
    import msgpack  # type: ignore[import-untyped]

    from aiotasks.control import _info, _spec

    info = await app.schedules.add("plain", sig(app, "tick", "p"), every=60)
    stored = await app.client.redis.hget(app.client.keys.schedules, "plain")
    assert "options" not in msgpack.unpackb(stored)
    later = msgpack.unpackb(_spec(info))
    later["added_by_a_later_version"] = 1
    assert _info(msgpack.packb(later)) == info


def test_a_worker_refuses_a_queue_name_no_worker_could_read(app: App) -> None:
    for bad in ("a,b", " a", ""):
        with pytest.raises(ValueError, match="is not a queue name"):
            app.worker(queues=[bad])
