"""Periodic tasks: schedules, once-per-tick firing across worker processes, no catch-up burst."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from aiotasks import App, current_task
from aiotasks.schedule import GRACE, Periodic
from tests.apps.periodic import COUNTER, LOG


def _periodic(app: App, **schedule: Any) -> Periodic:
    @app.periodic(name=f"job-{len(app.periodic_tasks)}", **schedule)
    @app.task
    async def job() -> None:
        pass

    periodic = app.periodic_tasks[-1]
    assert isinstance(periodic, Periodic)
    return periodic


# -- schedules ----------------------------------------------------------------------------


def test_cron_next_run_is_next_minute(app: App) -> None:
    p = _periodic(app, cron="* * * * *")
    after = datetime(2024, 5, 1, 12, 0, 30, 250_000, tzinfo=UTC)
    nxt = p.next_run(after)
    assert nxt == datetime(2024, 5, 1, 12, 1, tzinfo=UTC)
    assert nxt.utcoffset() == timedelta(0)
    # Strictly after: a tick exactly at `after` is not the next one.
    assert p.next_run(nxt) == datetime(2024, 5, 1, 12, 2, tzinfo=UTC)
    # Cron times are UTC whatever zone `after` is in; naive means UTC.
    plus2 = timezone(timedelta(hours=2))
    assert p.next_run(datetime(2024, 5, 1, 14, 0, 30, tzinfo=plus2)) == nxt
    assert p.next_run(datetime(2024, 5, 1, 12, 0, 30)) == nxt


def test_every_ticks_are_aligned_to_the_epoch(app: App) -> None:
    p = _periodic(app, every=7)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    after = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
    nxt = p.next_run(after)
    assert nxt > after and nxt - after <= timedelta(seconds=7)
    assert (nxt - epoch) % timedelta(seconds=7) == timedelta(0)
    assert p.next_run(nxt) - nxt == timedelta(seconds=7)
    # A timedelta works like its seconds; a fractional period stays exact.
    assert _periodic(app, every=timedelta(minutes=1)).every == 60.0
    half = _periodic(app, every=0.5)
    assert half.next_run(datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)) == datetime(
        2024, 5, 1, 12, 0, 1, tzinfo=UTC
    )


def test_periodic_defaults(app: App) -> None:
    @app.periodic(every=60, args=(1,), kwargs={"b": 2})
    @app.task(queue="cron")
    async def cleanup(a: int, b: int) -> None:
        pass

    p = app.periodic_tasks[-1]
    assert (p.task, p.name, p.every, p.cron) == (cleanup.name, cleanup.name, 60.0, None)
    assert (p.args, p.kwargs, p.queue) == ((1,), {"b": 2}, None)


@pytest.mark.parametrize("cron", ["not a cron", "61 * * * *", "* * *"])
def test_invalid_cron_fails_at_decoration(app: App, cron: str) -> None:
    with pytest.raises(ValueError, match="invalid cron expression") as exc_info:
        _periodic(app, cron=cron)
    assert repr(cron) in str(exc_info.value)
    assert app.periodic_tasks == []


@pytest.mark.parametrize(
    "schedule",
    [{}, {"cron": "* * * * *", "every": 5}, {"every": 0}, {"every": -1}, {"every": timedelta()}],
)
def test_bad_schedule_fails_at_decoration(app: App, schedule: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _periodic(app, **schedule)
    assert app.periodic_tasks == []


@pytest.mark.parametrize(
    ("task", "name", "message"),
    [("", None, "the task name is empty"), (" ", "s", "the task name is empty"),
     ("ops.add", "", "the schedule name is empty"), ("ops.add", " ", "the schedule name is")],
)  # fmt: skip
def test_an_empty_task_or_schedule_name_is_refused(
    task: str, name: str | None, message: str
) -> None:
    """A schedule of a nameless task would be dead-lettered on every tick."""
    with pytest.raises(ValueError, match=message):
        Periodic.make(task, every=5, name=name)


def test_periodic_goes_above_task(app: App) -> None:
    async def plain() -> None:
        pass

    with pytest.raises(TypeError, match="above @app.task"):
        app.periodic(every=1)(plain)  # type: ignore[arg-type]


# -- firing in process ----------------------------------------------------------------------


async def test_every_fires_on_worker(app: App, worker: Any) -> None:
    fired: asyncio.Queue[tuple[str, float]] = asyncio.Queue()

    @app.periodic(every=1, name="tick")
    @app.task
    async def tick() -> None:
        fired.put_nowait((current_task().id, time.time()))

    await worker()
    async with asyncio.timeout(5):
        runs = [await fired.get(), await fired.get()]
    ticks = []
    for task_id, started in runs:
        prefix, name, tick_ms = task_id.split(":")
        assert (prefix, name) == ("periodic", "tick")
        ticks.append(int(tick_ms))
        assert int(tick_ms) % 1000 == 0
        # Fired at its tick, not before; a worker that starts just after a tick fires it
        # while it is less than GRACE late (see "Missed ticks"), so the body may run up to
        # GRACE after it, plus the delivery.
        assert 0 <= started - int(tick_ms) / 1000 < GRACE + 0.5
    assert ticks[1] - ticks[0] == 1000
    # Each periodic's next run is published for `aiotasks status`, just after the tick is
    # sent: the tick's body can run before that write lands, so wait for it (bounded).
    redis = app.client.redis

    async def next_ms() -> int:
        return int(_text(await redis.hget(app.client.keys.prefix + "periodic", "tick")))

    async def moved_past_second_tick() -> bool:
        return await next_ms() > ticks[1]

    await _wait_until(moved_past_second_tick, 2.0, "the next run to be published")
    assert (await next_ms()) % 1000 == 0


# -- several worker processes ---------------------------------------------------------------


async def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


async def _fired(app: App) -> list[tuple[int, int]]:
    """The (tick_ms, started_ms) of every run so far, in run order."""
    raw = await app.client.redis.lrange(app.client.keys.prefix + LOG, 0, -1)
    return [(int(t), int(s)) for t, s in (_text(r).split() for r in raw)]


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


async def _count(app: App) -> int:
    return int(await app.client.redis.get(app.client.keys.prefix + COUNTER) or 0)


@pytest.mark.slow
async def test_two_worker_processes_fire_each_tick_once(app: App, spawn_worker: Any) -> None:
    workers = [spawn_worker(module="periodic"), spawn_worker(module="periodic")]
    redis = app.client.redis

    async def both_up() -> bool:
        return int(await redis.zcard(app.client.keys.workers)) == 2

    await _wait_until(both_up, 20, "both workers to register")
    start = await _count(app)
    await asyncio.sleep(5.0)
    fires = await _count(app) - start
    for w in workers:
        w.signal(signal.SIGTERM)
    assert 4 <= fires <= 6, fires

    fired = await _fired(app)
    ticks = [t for t, _ in fired]
    assert len(ticks) == len(set(ticks)), f"a tick ran twice: {sorted(ticks)}"
    assert len(ticks) == await _count(app)
    assert sorted(ticks) == list(range(min(ticks), max(ticks) + 1000, 1000)), "a tick was skipped"
    # Every tick was claimed by one of the two processes, and the claim names it.
    owners = {_text(await redis.get(app.client.keys.periodic_tick("beat", t))) for t in ticks}
    assert owners and all(o.split("-")[-2] in {str(w.pid) for w in workers} for o in owners)
    # A worker may fire the tick due within GRACE before it started; later ticks are prompt.
    jitter = [s - t for t, s in sorted(fired)]
    assert all(0 <= j < GRACE * 1000 + 500 for j in jitter), jitter
    assert all(j < 500 for j in jitter[1:]), jitter
    for w in workers:
        assert w.wait(15) == 0, w.output()


async def _claims(app: App) -> set[int]:
    """Ticks of "beat" claimed so far: each claim is one fire (a send) by some worker."""
    pattern = app.client.keys.periodic_tick("beat", 0)[:-1] + "*"
    return {int(k.rsplit(b":", 1)[1]) async for k in app.client.redis.scan_iter(match=pattern)}


@pytest.mark.slow
async def test_restart_does_not_fire_missed_ticks(app: App, spawn_worker: Any) -> None:
    first = spawn_worker(module="periodic")

    async def has_fired() -> bool:
        return await _count(app) >= 1

    await _wait_until(has_fired, 20, "the first worker to fire")
    first.signal(signal.SIGTERM)
    assert first.wait(15) == 0, first.output()
    claimed = await _claims(app)
    assert claimed

    await asyncio.sleep(3.0)  # no worker: ticks fall due and nobody fires them
    status_key = app.client.keys.prefix + "periodic"
    await app.client.redis.delete(status_key)
    restarted_at = time.time()
    second = spawn_worker(module="periodic")

    async def scheduling() -> bool:
        return bool(await app.client.redis.exists(status_key))

    await _wait_until(scheduling, 20, "the restarted worker's scheduler")
    await asyncio.sleep(1.0)
    burst = await _claims(app) - claimed
    # One tick per second since the restart (plus the one within GRACE), never the ticks
    # that fell due while no worker ran: those would all fire at once.
    assert min(burst, default=restarted_at * 1000) >= (restarted_at - GRACE) * 1000, burst
    assert len(burst) <= int(time.time() - restarted_at) + 2, sorted(burst)

    async def fires_again() -> bool:
        return len(await _claims(app) - claimed) >= 2

    await _wait_until(fires_again, 5, "the restarted worker to fire")
    runs = await _count(app)

    async def runs_again() -> bool:
        return await _count(app) > runs

    await _wait_until(runs_again, 5, "the restarted worker to run a fired tick")
    second.signal(signal.SIGTERM)
    fired_after = await _claims(app) - claimed
    # Only ticks due within GRACE of the restart, or later, ever fire: the gap stays empty.
    assert min(fired_after) >= (restarted_at - GRACE) * 1000, (max(claimed), restarted_at)
    assert min(fired_after) - max(claimed) >= 3000, "ticks missed while down were fired"
    assert second.wait(15) == 0, second.output()


async def test_a_refusing_server_pauses_the_ticks_not_the_worker(
    own_server: Any, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary refusing writes (NOREPLICAS: min-replicas-to-write with no replica in
    sync, as after a failover; or an ACL) made the scheduler's error end the worker. The
    worker stays: its ticks wait, and fire again once writes are accepted, as tasks do."""
    import redis as sync_redis

    from aiotasks import TaskState

    app = App(redis_url=own_server.url, namespace=namespace, warn_on_unsafe_server=False)
    fired: list[str] = []

    @app.periodic(every=1, name="tick")
    @app.task
    async def tick() -> None:
        fired.append(current_task().id)

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    admin = sync_redis.Redis.from_url(own_server.url)
    try:
        async with app.worker().running():
            async with asyncio.timeout(5):
                while not fired:
                    await asyncio.sleep(0.05)
            admin.config_set("min-replicas-to-write", 1)
            await asyncio.sleep(3)  # past a tick, a schedule write and several fetches
            admin.config_set("min-replicas-to-write", 0)
            h = await add.send(1, 2)
            assert await h.result(timeout=10) == 3
            before = len(fired)
            async with asyncio.timeout(5):
                while len(fired) == before:
                    await asyncio.sleep(0.05)
            assert await h.state() is TaskState.SUCCESS
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
        await app.close()
    refusals = [r.getMessage() for r in caplog.records if "NOREPLICAS" in r.getMessage()]
    assert any("periodic scheduler" in m or "periodic tick" in m for m in refusals), refusals
