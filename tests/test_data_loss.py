"""Data loss is loud: a server that lost its data (restarted without persistence) is
reported by every worker, once, naming the queues, and counted in metrics; waiters of the
lost tasks raise TaskLost instead of waiting forever; a server that would lose data is
named in one WARNING at worker start.

Every test owns its server (`own_server`: no persistence, so a restart comes back empty).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import App, GroupHandle, ResultTimeout, TaskLost, TaskState
from aiotasks.durability import GROUPS_GONE, REGISTRATION_GONE, DataLoss
from aiotasks.metrics import Metrics
from aiotasks.testing.server import OwnServer
from tests.helpers import wait_until

LOST = "LOST DATA"


@pytest.fixture
async def lost_app(own_server: OwnServer, namespace: str) -> AsyncIterator[App]:
    """An App on the test's own server, with a short visibility timeout (heartbeats 1 s)."""
    a = App(redis_url=own_server.url, namespace=namespace, visibility_timeout=3)
    yield a
    await a.close()


def loss_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if LOST in r.getMessage()]


async def restart(server: OwnServer) -> None:
    await asyncio.to_thread(server.restart)


async def wait_reconnected(app: App, count: int = 1) -> None:
    async def reconnected() -> bool:
        return app.client.notifier.reconnects >= count

    await wait_until(reconnected, 10, "the notifier to reconnect")


# -- the worker says so ----------------------------------------------------------------


async def test_a_worker_reports_the_loss_once_naming_its_queues(
    lost_app: App, caplog: pytest.LogCaptureFixture, own_server: OwnServer
) -> None:
    @lost_app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    metrics = Metrics(lost_app)
    caplog.set_level(logging.WARNING, logger="aiotasks")
    w = lost_app.worker(queues=["default", "mail"])
    async with w.running():
        assert await (await add.send(1, 1)).result(timeout=5) == 2
        await restart(own_server)

        async def reported() -> bool:
            return bool(loss_records(caplog))

        await wait_until(reported, 10, "the worker to report the loss")
        await asyncio.sleep(3)  # three more heartbeats and many fetches: no second report
        assert await (await add.send(2, 2)).result(timeout=5) == 4  # and it goes on
    [record] = loss_records(caplog)
    assert record.levelno == logging.ERROR
    text = record.getMessage()
    assert "'default'" in text and "'mail'" in text, text
    assert "persistence" in text and "TaskLost" in text
    assert record.__dict__["queues"] == ["default", "mail"]
    assert w.losses.count == 1
    assert metrics.data_lost.labels("default")._value.get() == 1
    assert metrics.data_lost.labels("mail")._value.get() == 1


async def test_every_worker_reports_the_loss(
    lost_app: App, caplog: pytest.LogCaptureFixture, own_server: OwnServer
) -> None:
    """The first worker back finds the groups gone and recreates them; the others learn
    it from their registration, gone before it could expire."""
    caplog.set_level(logging.WARNING, logger="aiotasks")
    workers = [lost_app.worker(), lost_app.worker()]
    async with workers[0].running(), workers[1].running():
        await restart(own_server)

        async def both() -> bool:
            return all(w.losses.count for w in workers)

        await wait_until(both, 10, "both workers to report the loss")
        await asyncio.sleep(2)
    records = loss_records(caplog)
    assert len(records) == 2, [r.getMessage() for r in records]
    assert {r.__dict__["worker"] for r in records} == {w.name for w in workers}


async def test_one_loss_found_by_the_heartbeat_and_then_by_a_fetch_is_reported_once(
    lost_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """The order a CI run met: the heartbeat finds the registration gone while the groups
    already exist again (a fetch in flight recreated them), then that fetch's reply names
    the lost group. One loss, one report."""
    caplog.set_level(logging.WARNING, logger="aiotasks")
    stream = lost_app.client.keys.stream("default", 0)
    await lost_app.client.ensure_groups([stream])
    losses = DataLoss("w1", lost_app.client, {stream: "default"}, lost_app.hooks, 10.0)
    await losses.found([], REGISTRATION_GONE)
    await losses.found([stream], GROUPS_GONE)
    assert losses.count == 1
    [record] = loss_records(caplog)
    assert record.__dict__["queues"] == ["default"]
    # A queue the last report did not name is news, even within the window.
    other = lost_app.client.keys.stream("mail", 0)
    losses.served[other] = "mail"
    await losses.found([other], GROUPS_GONE)
    assert losses.count == 2
    assert loss_records(caplog)[-1].__dict__["queues"] == ["mail"]
    await losses.found([stream], GROUPS_GONE)  # both named within the window
    assert losses.count == 2


async def test_no_loss_is_reported_when_the_connection_only_drops(
    lost_app: App, caplog: pytest.LogCaptureFixture, own_server: OwnServer
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    w = lost_app.worker()
    async with w.running():
        r = redis.Redis.from_url(own_server.url)
        try:
            r.client_kill_filter(skipme=True, _type="normal")  # every connection but this
        finally:
            r.close()
        await asyncio.sleep(2.5)  # two heartbeats
    assert loss_records(caplog) == []


async def test_an_empty_stream_that_lost_its_group_gets_it_back_while_idle(
    lost_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    """Fetches skip an empty stream, but the idle worker's blocking read names it: a group
    gone from it (XGROUP DESTROY, or a partial loss) is recreated and reported at once,
    instead of every wait failing on it."""

    @lost_app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    caplog.set_level(logging.WARNING, logger="aiotasks")
    w = lost_app.worker(block=0.5)
    async with w.running():
        assert await (await add.send(1, 1)).result(timeout=5) == 2  # idle after this
        r: Any = lost_app.client.redis
        stream = lost_app.client.keys.stream("default", 9)
        assert await r.xlen(stream) == 0 and await r.exists(stream)
        await r.xgroup_destroy(stream, "workers")

        async def regrouped() -> bool:
            # The worker counts the loss once its XGROUP CREATE has answered, which may
            # be after another connection sees the group.
            return len(await r.xinfo_groups(stream)) == 1 and w.losses.count >= 1

        await wait_until(regrouped, 5, "the worker to recreate the group and report it")
        assert w.losses.count == 1
        assert await (await add.options(priority=9).send(2, 2)).result(timeout=5) == 4
    assert len(loss_records(caplog)) == 1


# -- waiters raise TaskLost ------------------------------------------------------------


async def test_waiters_of_lost_tasks_raise_task_lost(lost_app: App, own_server: OwnServer) -> None:
    @lost_app.task(name="add", queue="nobody-serves-this")
    async def add(x: int, y: int) -> int:
        return x + y

    queued = await add.send(1, 2)
    scheduled = await add.options(countdown=60).send(3, 4)
    seen = await add.send(5, 6)
    group = [await add.send(i, i) for i in range(3)]
    others = lost_app.handle(seen.id)  # not sent here: it learns the task exists by reading

    waits = {
        "queued": asyncio.create_task(queued.result(timeout=30)),
        "scheduled": asyncio.create_task(scheduled.result(timeout=30)),
        "handle": asyncio.create_task(others.result(timeout=30)),
        "updates": asyncio.create_task(states(queued)),
        "group": asyncio.create_task(
            GroupHandle(lost_app.client, group).results(timeout=30, return_exceptions=True)
        ),
    }
    await asyncio.sleep(0.3)  # every waiter has read its task and waits
    assert not any(t.done() for t in waits.values())

    t0 = time.monotonic()
    await restart(own_server)
    done, pending = await asyncio.wait(waits.values(), timeout=10)
    assert not pending, "a waiter still waits after the loss"
    assert time.monotonic() - t0 < 10
    for name in ("queued", "scheduled", "handle", "updates"):
        with pytest.raises(TaskLost) as err:
            waits[name].result()
        assert err.value.task_id in (queued.id, scheduled.id, seen.id), name
        assert "lost" in str(err.value)
    results = waits["group"].result()
    assert [type(r) for r in results] == [TaskLost] * 3


async def test_a_wait_begun_after_the_loss_raises_task_lost(
    lost_app: App, own_server: OwnServer
) -> None:
    @lost_app.task(name="add", queue="nobody-serves-this")
    async def add(x: int, y: int) -> int:
        return x + y

    first = await add.send(1, 1)
    with pytest.raises(ResultTimeout):
        await first.result(timeout=0.1)  # the App's result subscription is up
    h = await add.send(1, 2)
    await restart(own_server)
    await wait_reconnected(lost_app)
    t0 = time.monotonic()
    with pytest.raises(TaskLost):
        await h.result(timeout=10)
    assert time.monotonic() - t0 < 2


async def test_an_unknown_task_still_times_out(lost_app: App, own_server: OwnServer) -> None:
    """A task never seen (an id nobody sent yet) is not lost by a restart: it may come."""
    h = lost_app.handle("not-sent-yet")
    waiter = asyncio.create_task(h.result(timeout=3))
    await asyncio.sleep(0.3)
    await restart(own_server)
    with pytest.raises(ResultTimeout):
        await waiter


async def test_a_forgotten_task_times_out_without_a_reconnect(lost_app: App) -> None:
    @lost_app.task(name="add", queue="nobody-serves-this")
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.send(1, 1)
    await h.forget()
    with pytest.raises(ResultTimeout):
        await h.result(timeout=0.3)


# -- a restart that keeps the data is ridden out ----------------------------------------


async def states(h: Any) -> list[TaskState]:
    return [info.state async for info in h.updates()]


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[OwnServer]:
    """A server with AOF on (appendfsync everysec) in a directory that outlives restarts."""
    data = tmp_path / "data"
    data.mkdir()
    config = {"appendonly": "yes", "appendfsync": "everysec", "dir": str(data)}
    with OwnServer(config=config) as server:
        yield server


async def test_waiters_ride_out_a_restart_that_keeps_the_data(
    aof_server: OwnServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    app = App(redis_url=aof_server.url, namespace=namespace, visibility_timeout=3)

    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        w = app.worker()
        async with w.running():
            h = await add.options(countdown=2).send(20, 22)
            waiter = asyncio.create_task(h.result(timeout=20))
            updates = asyncio.create_task(states(h))
            await asyncio.sleep(0.3)
            await restart(aof_server)
            assert await waiter == 42
            seen = await updates
            assert seen[0] == TaskState.SCHEDULED and seen[-1] == TaskState.SUCCESS, seen
            assert app.client.notifier.reconnects >= 1  # it did see the restart
        assert w.losses.count == 0
        assert loss_records(caplog) == []
    finally:
        await app.close()


# -- the startup warning ----------------------------------------------------------------


def unsafe_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "may lose tasks" in r.getMessage()]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, ["keeps nothing on disk"]),
        ({"appendonly": "yes"}, []),
        ({"save": "3600 1"}, []),
        ({"appendonly": "yes", "maxmemory-policy": "allkeys-lru"}, ["allkeys-lru", "any key"]),
        ({"maxmemory-policy": "volatile-ttl"}, ["nothing on disk", "volatile-ttl", "a TTL"]),
    ],
    ids=["no-persistence", "aof", "rdb", "allkeys", "volatile"],
)
async def test_one_warning_at_start_when_the_server_may_lose_tasks(
    own_server: OwnServer,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    config: dict[str, str],
    expected: list[str],
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    with redis.Redis.from_url(own_server.url) as r:
        for key, value in config.items():
            r.config_set(key, value)
    app = App(redis_url=own_server.url, namespace=namespace)
    try:
        async with app.worker().running():
            pass
    finally:
        await app.close()
    warnings = unsafe_warnings(caplog)
    if not expected:
        assert warnings == []
        return
    [text] = warnings
    for part in expected:
        assert part in text, text
    assert "warn_on_unsafe_server=False" in text
    [record] = [r for r in caplog.records if "may lose tasks" in r.getMessage()]
    assert record.levelno == logging.WARNING


async def test_the_warning_can_be_silenced(
    own_server: OwnServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiotasks")
    app = App(redis_url=own_server.url, namespace=namespace, warn_on_unsafe_server=False)
    try:
        async with app.worker().running():
            pass
    finally:
        await app.close()
    assert unsafe_warnings(caplog) == []


async def test_without_config_permission_the_policy_is_read_from_info(
    own_server: OwnServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    with redis.Redis.from_url(own_server.url) as r:
        r.config_set("maxmemory-policy", "allkeys-lfu")
        r.acl_setuser("app", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                      commands=["+@all", "-config"])  # fmt: skip
    url = own_server.url.replace("redis://", "redis://app:pw@")
    app = App(redis_url=url, namespace=namespace)
    try:
        async with app.worker().running():
            pass
    finally:
        await app.close()
    [text] = unsafe_warnings(caplog)
    assert "allkeys-lfu" in text
    # Without CONFIG, whether RDB snapshots are on is unknown: nothing is claimed.
    assert "nothing on disk" not in text
