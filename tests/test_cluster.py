"""Redis Cluster and Sentinel: a real 3-master cluster with replicas, and a primary with a
replica under one Sentinel, all started by these tests on loopback (skipped, by name,
when the server binary has no cluster mode).

Every feature runs through a node that does not own the namespace's keys; the drills
kill a worker, a master and a Sentinel-managed primary while tasks flow, and count what
ends SUCCESS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import App, TaskRevoked, TaskState, chain, chord
from aiotasks.admin import Admin
from aiotasks.testing.cluster import OwnCluster, OwnSentinel, supports_cluster
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not supports_cluster(), reason="the redis-server binary has no cluster mode"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[OwnCluster]:
    with OwnCluster(masters=3, replicas=1) as c:
        yield c


def ns() -> str:
    return f"cl-{uuid.uuid4().hex[:8]}"


def url_avoiding(cluster: OwnCluster, namespace: str) -> str:
    """A cluster URL whose first node does not serve the namespace's slot."""
    owner = cluster.master_of("{" + namespace + "}:x")
    others = [s for s in cluster.servers if s is not owner and s.is_running()]
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in [*others, owner])


def keys_left(cluster: OwnCluster, namespace: str) -> dict[int, int]:
    return cluster.keys_per_master("{" + namespace + "}*")


def delete_namespace(cluster: OwnCluster, namespace: str) -> None:
    for s in cluster.servers:
        if not s.is_running():
            continue
        with cluster.client(s) as c:
            if c.info("replication").get("role") != "master":
                continue
            keys = list(c.scan_iter(match="{" + namespace + "}*", count=1000))
            for k in keys:
                c.delete(k)


@pytest.fixture
async def capp(cluster: OwnCluster) -> AsyncIterator[App]:
    namespace = ns()
    app = App(redis_url=url_avoiding(cluster, namespace), namespace=namespace)
    async with app:
        yield app
    delete_namespace(cluster, namespace)
    assert sum(keys_left(cluster, namespace).values()) == 0


async def test_every_feature_through_a_node_that_does_not_own_the_keys(
    cluster: OwnCluster, capp: App
) -> None:
    app = capp
    owner = cluster.master_of("{" + app.settings.namespace + "}:x")
    assert f"127.0.0.1:{owner.port}" not in app.settings.redis_url.split(",")[0]

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue="sums")
    async def tsum(xs: list[int]) -> int:
        return sum(xs)

    @app.task
    async def slow_progress() -> str:
        from aiotasks import current_task

        await current_task().progress(step=1)
        await asyncio.sleep(0.2)
        return "done"

    w = app.worker(queues=["default", "sums"], concurrency=8)
    run = asyncio.create_task(w.run())
    try:
        h = await add.send(2, 3)
        assert await h.result(timeout=15) == 5
        # Concurrent sends (one batched script call), results to each sender.
        hs = await asyncio.gather(*(add.send(i, i) for i in range(40)))
        assert [await x.result(timeout=15) for x in hs] == [2 * i for i in range(40)]
        # Progress and states, watched from a handle.
        p = await slow_progress.send()
        seen = [info async for info in p.updates()]
        assert seen[-1].state is TaskState.SUCCESS
        assert any(i.progress == {"step": 1} for i in seen)
        # A chord whose body runs on another queue, and a chain.
        c = await chord([add.s(i, i) for i in range(10)], tsum.s()).send()
        assert await c.result(timeout=15) == 90
        ch = await chain(add.s(1, 1), add.s(10), add.s(100)).send()
        assert await ch.result(timeout=15) == 112
        # Revoke a scheduled task: it never runs.
        later = await add.options(countdown=30).send(1, 1)
        await later.revoke()
        with pytest.raises(TaskRevoked):
            await later.result(timeout=5)
        # A handle from another App (another node first in its URL) reads the result.
        other = App(redis_url=cluster.url, namespace=app.settings.namespace)
        async with other:
            h2 = await add.send(20, 22)
            assert await other.handle(h2.id).result(timeout=15) == 42
    finally:
        w.stop()
        await run
    # Dead letters: an unknown task name is dead-lettered once, then dropped.
    admin = Admin(app)
    ghost = await app.send_task("no.such.task")
    w = app.worker(concurrency=4)
    run = asyncio.create_task(w.run())
    try:
        with pytest.raises(Exception, match="UnknownTask|no.such.task"):
            await ghost.result(timeout=15)
    finally:
        w.stop()
        await run
    dead = await admin.dead_letters("default")
    assert [d.task_id for d in dead] == [ghost.id]
    assert await admin.drop_dead("default") == 1
    # Status and purge.
    for i in range(5):
        await add.send(i, 1)
    status = await admin.status()
    default = next(q for q in status.queues if q.name == "default")
    assert default.waiting == 5
    assert await admin.purge("default") == 5


def spawn(url: str, namespace: str, log: Path, vt: str = "2") -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AIOTASKS_REDIS_URL": url,
        "AIOTASKS_TEST_NAMESPACE": namespace,
        "AIOTASKS_TEST_VT": vt,
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "aiotasks", "run", "tests.apps.basic:app", "--concurrency", "16"]
    return subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def drain(app: App, n: int, seconds: float, timeout: float) -> tuple[list[Any], int]:
    """Send `n` sleep tasks (one at a time, as a web app would) while the drill happens;
    the handles, and how many sends raised."""
    handles, failed = [], 0
    for _ in range(n):
        try:
            handles.append(await app.send_task("tests.apps.basic.sleep", args=(seconds,)))
        except Exception:
            failed += 1
        await asyncio.sleep(timeout / n)
    return handles, failed


@pytest.mark.slow
async def test_a_sigkilled_worker_loses_nothing_on_a_cluster(
    cluster: OwnCluster, capp: App, tmp_path: Path
) -> None:
    app, namespace = capp, capp.settings.namespace
    first = spawn(app.settings.redis_url, namespace, tmp_path / "w1.log")
    try:
        handles = [await app.send_task("tests.apps.basic.sleep", args=(0.2,)) for _ in range(60)]
        await wait_until(lambda: _started(app, handles), timeout=20)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = spawn(app.settings.redis_url, namespace, tmp_path / "w2.log")
        try:
            results = [await h.result(timeout=60) for h in handles]
            assert results == [0.2] * 60
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()


async def _started(app: App, handles: list[Any]) -> bool:
    states = [await h.state() for h in handles[:5]]
    return any(s is not TaskState.PENDING for s in states)


@pytest.mark.slow
async def test_killing_the_namespaces_master_loses_nothing(
    tmp_path: Path,
) -> None:
    """A cluster of its own: the master that owns the namespace is SIGKILLed while tasks
    are sent and run; its replica takes over, no worker exits, no send raises, and every
    accepted task ends SUCCESS."""
    with OwnCluster(masters=3, replicas=1) as own:
        namespace = ns()
        app = App(redis_url=url_avoiding(own, namespace), namespace=namespace)
        async with app:
            workers = [
                spawn(app.settings.redis_url, namespace, tmp_path / f"w{i}.log") for i in range(2)
            ]
            try:
                sending = asyncio.create_task(drain(app, 200, 0.01, timeout=8))
                await asyncio.sleep(2)
                owner = own.master_of("{" + namespace + "}:x")
                own.kill(owner)
                handles, failed = await sending
                assert failed == 0
                assert own.master_of("{" + namespace + "}:x") is not owner
                results = [await h.result(timeout=90) for h in handles]
                assert results == [0.01] * len(handles)
                assert all(w.poll() is None for w in workers), "a worker exited"
            finally:
                for w in workers:
                    if w.poll() is None:
                        w.send_signal(signal.SIGTERM)
                for w in workers:
                    try:
                        w.wait(30)
                    except subprocess.TimeoutExpired:
                        w.kill()
            logs = "".join((tmp_path / f"w{i}.log").read_text(errors="replace") for i in range(2))
            assert "Traceback" not in logs, logs[-3000:]


@pytest.mark.slow
async def test_a_sentinel_failover_loses_nothing(tmp_path: Path) -> None:
    with OwnSentinel() as s:
        namespace = ns()
        app = App(redis_url=s.url, namespace=namespace)
        async with app:
            worker = spawn(s.url, namespace, tmp_path / "w.log")
            try:
                sending = asyncio.create_task(drain(app, 150, 0.01, timeout=6))
                await asyncio.sleep(1.5)
                first = s.primary_port()
                s.kill_primary()
                handles, failed = await sending
                assert failed == 0
                assert s.primary_port() != first, "no failover happened during the sends"
                results = [await h.result(timeout=90) for h in handles]
                assert results == [0.01] * len(handles)
                assert worker.poll() is None, "the worker exited"
            finally:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            log = (tmp_path / "w.log").read_text(errors="replace")
            assert "Traceback" not in log, log[-3000:]


def test_the_cluster_helper_spreads_slots_over_three_masters(cluster: OwnCluster) -> None:
    owners = {cluster.master_of("{" + ns() + "}:x").port for _ in range(60)}
    assert len(owners) == 3
    with redis.Redis(port=cluster.masters[0].port) as c:
        assert b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")


async def test_a_dead_first_node_in_the_url_does_not_stop_results(cluster: OwnCluster) -> None:
    """The URL's first node is down: commands go to the others, and the result notifier
    subscribes on a node that answers instead of waiting on the dead one forever."""
    namespace = ns()
    dead = "127.0.0.1:1"  # nothing listens there
    url = "redis+cluster://" + ",".join([dead, *(f"127.0.0.1:{s.port}" for s in cluster.servers)])
    app = App(redis_url=url, namespace=namespace)

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        async with app:
            other = App(redis_url=url, namespace=namespace)
            async with other:
                # Both wait before any worker runs: only a notification can wake them.
                h = await add.send(40, 2)
                h2 = await add.send(1, 2)
                mine = asyncio.ensure_future(h.result(timeout=20))
                # A handle of another App waits on the task's own channel (watch mark).
                theirs = asyncio.ensure_future(other.handle(h2.id).result(timeout=20))
                await asyncio.sleep(1.0)
                assert not mine.done() and not theirs.done()
                w = app.worker(concurrency=4)
                run = asyncio.create_task(w.run())
                try:
                    assert await mine == 42
                    assert await theirs == 3
                finally:
                    w.stop()
                    await run
    finally:
        delete_namespace(cluster, namespace)
