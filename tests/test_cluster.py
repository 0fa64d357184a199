"""Redis Cluster and Sentinel: a real 3-master cluster with replicas, and a primary with a
replica under one Sentinel, all started by these tests on loopback (skipped, by name,
when the server binary has no cluster mode).

Every feature runs through a node that does not own the namespace's keys; the drills
kill a worker, a master and a Sentinel-managed primary while tasks flow, and count what
ends SUCCESS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from aiotasks import App, TaskRevoked, TaskState, chain, chord
from aiotasks.admin import Admin
from aiotasks.keys import Keys, namespace_pattern
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
    return cluster.keys_per_master(namespace_pattern(namespace))


def delete_namespace(cluster: OwnCluster, namespace: str) -> None:
    for s in cluster.servers:
        if not s.is_running():
            continue
        with cluster.client(s) as c:
            if c.info("replication").get("role") != "master":
                continue
            keys = list(c.scan_iter(match=namespace_pattern(namespace), count=1000))
            for k in keys:
                c.delete(k)


@pytest.fixture(params=[1, 3], ids=["1-shard", "3-shards"])
async def capp(cluster: OwnCluster, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    namespace = ns()
    url = url_avoiding(cluster, namespace)
    app = App(redis_url=url, namespace=namespace, shards=request.param)
    async with app:
        yield app
    delete_namespace(cluster, namespace)
    assert sum(keys_left(cluster, namespace).values()) == 0


async def test_every_feature_through_a_node_that_does_not_own_the_keys(
    cluster: OwnCluster, capp: App
) -> None:
    app = capp
    shards = app.settings.shards
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
        other = App(redis_url=cluster.url, namespace=app.settings.namespace, shards=shards)
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
    if shards > 1:  # the tasks of one queue are on every master
        held = keys_left(cluster, app.settings.namespace)
        assert len([n for n in held.values() if n]) == 3, held
    # Status and purge.
    for i in range(5):
        await add.send(i, 1)
    status = await admin.status()
    default = next(q for q in status.queues if q.name == "default")
    assert default.waiting == 5
    assert await admin.purge("default") == 5


@pytest.mark.slow
async def test_three_shards_spread_one_queue_over_every_master(
    cluster: OwnCluster, tmp_path: Path
) -> None:
    namespace = ns()
    app = App(redis_url=url_avoiding(cluster, namespace), namespace=namespace, shards=3)
    try:
        async with app:
            handles = [await app.send_task("tests.apps.basic.add", args=(i, 1)) for i in range(300)]
            held = keys_left(cluster, namespace)
            total = sum(held.values())
            assert len(held) == 3 and all(n >= 0.2 * total for n in held.values()), held
            worker = spawn(app.settings.redis_url, namespace, tmp_path / "w.log", shards=3)
            try:
                results = [await h.result(timeout=60) for h in handles]
            finally:
                stop_workers([worker])
            assert results == [i + 1 for i in range(300)]
    finally:
        delete_namespace(cluster, namespace)
    assert sum(keys_left(cluster, namespace).values()) == 0


def spawn(
    url: str, namespace: str, log: Path, vt: str = "2", shards: int = 1
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AIOTASKS_SHARDS": str(shards),
        "AIOTASKS_TEST_RUNS": str(log.parent / "runs"),
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
    app, namespace, shards = capp, capp.settings.namespace, capp.settings.shards
    first = spawn(app.settings.redis_url, namespace, tmp_path / "w1.log", shards=shards)
    try:
        handles = [await app.send_task("tests.apps.basic.sleep", args=(0.2,)) for _ in range(60)]
        await wait_until(lambda: _started(app, handles), timeout=20)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = spawn(app.settings.redis_url, namespace, tmp_path / "w2.log", shards=shards)
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
@pytest.mark.parametrize("shards", [1, 3], ids=["1-shard", "3-shards"])
async def test_killing_the_namespaces_master_loses_nothing(tmp_path: Path, shards: int) -> None:
    """A cluster of its own: the master that owns the namespace (with 3 shards: its last
    shard) is SIGKILLed while tasks are sent and run; its replica takes over, no worker
    exits, no send raises, and every accepted task ends SUCCESS."""
    with OwnCluster(masters=3, replicas=1) as own:
        namespace = ns()
        app = App(redis_url=url_avoiding(own, namespace), namespace=namespace, shards=shards)
        victim = Keys(namespace, shards - 1, shards).prefix + "x"
        async with app:
            workers = [
                spawn(app.settings.redis_url, namespace, tmp_path / f"w{i}.log", shards=shards)
                for i in range(2)
            ]
            try:
                sending = asyncio.create_task(drain(app, 200, 0.01, timeout=8))
                await asyncio.sleep(2)
                owner = own.master_of(victim)
                own.kill(owner)
                handles, failed = await sending
                assert failed == 0
                assert own.master_of(victim) is not owner
                results = [await h.result(timeout=90) for h in handles]
                assert results == [0.01] * len(handles)
                assert all(w.poll() is None for w in workers), "a worker exited"
            finally:
                stop_workers(workers)
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


@pytest.mark.slow
async def test_a_sentinel_switchover_moves_every_connection_to_the_new_primary() -> None:
    """SENTINEL FAILOVER leaves the old primary writable until the Sentinel makes it a
    replica, some ten seconds later, and its resync then drops what it took meanwhile.
    Once the Sentinel names the new primary, sends and the worker go there within a
    second (PrimaryWatch); what they wrote survives the old one's demotion."""
    with OwnSentinel() as s:
        namespace = ns()
        # Two Apps, as a web process and a worker process have: each has its own pool.
        app = App(redis_url=s.url, namespace=namespace)
        producer = App(redis_url=s.url, namespace=namespace)
        async with app, producer:

            @app.task(name="echo")
            async def run_echo(x: int) -> int:
                return x

            w = app.worker(concurrency=8)
            run = asyncio.create_task(w.run())
            try:
                assert await (await producer.send_task("echo", args=(0,))).result(timeout=10) == 0
                old = s.primary_port()
                new = await asyncio.to_thread(s.switchover)
                await asyncio.sleep(1.5)  # three checks of the watch
                assert s.role(old) == "master", "the old primary was demoted already"
                handles = [await producer.send_task("echo", args=(i,)) for i in range(1, 21)]
                with redis.Redis(port=new) as c:
                    stored = sum(c.exists(producer.client.keys.task(h.id)) for h in handles)
                assert stored == 20, f"{20 - stored} sends went to the old primary"
                assert [await h.result(timeout=10) for h in handles] == list(range(1, 21))

                def demoted() -> bool:
                    with redis.Redis(port=old) as c:
                        info = c.info("replication")
                    return info["role"] == "slave" and info["master_link_status"] == "up"

                await wait_until(lambda: asyncio.to_thread(demoted), 60, "the demotion")
                assert [await h.state() for h in handles] == [TaskState.SUCCESS] * 20
            finally:
                w.stop()
                await run


@pytest.mark.slow
async def test_a_switchover_drops_connections_in_use_when_new_ones_found_it_first() -> None:
    """redis-py moves the pool's idea of the primary when it opens a connection, closing
    only idle ones: a connection in use then (here a blocking read) must still be
    dropped by the watch, which looks at each connection's own address."""
    with OwnSentinel() as s:
        app = App(redis_url=s.url, namespace=ns())
        try:
            r: Any = app.client.redis
            await r.ping()
            watch = app.client._connect().watch
            assert watch is not None and watch._task is not None
            watch._task.cancel()  # the test runs its checks, in the order the race needs
            blocked = asyncio.create_task(r.xread({"{x}:nothing": "$"}, block=30_000))
            await asyncio.sleep(0.3)
            new = await asyncio.to_thread(s.switchover)

            # What a new connection does first: it moves master_address to the new primary
            # (once the Sentinel's own list says so, a moment after it names it) and
            # closes only the idle connections.
            async def moved() -> bool:
                return (await r.connection_pool.get_master_address())[1] == new

            await wait_until(moved, 10, "the Sentinel to list the new primary")
            assert not blocked.done()
            await watch.check()
            done, _ = await asyncio.wait([blocked], timeout=3)
            assert done, "the connection in use stayed on the old primary"
            with pytest.raises(redis.exceptions.ConnectionError):
                blocked.result()
        finally:
            await app.close()


@pytest.mark.slow
async def test_a_worker_waits_out_noreplicas_behind_sentinel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With min-replicas-to-write, a primary whose replica lags refuses writes
    (NOREPLICAS) until it catches up: behind a Sentinel URL the worker stores the result
    once it can, as through a lost connection, not an InternalError FAILURE; and says so
    as of a lost connection, once (not an ERROR line per fetch and heartbeat)."""
    caplog.set_level(logging.DEBUG, logger="aiotasks")
    with OwnSentinel() as s:
        with redis.Redis(port=s.primary.port) as c:
            c.config_set("min-replicas-to-write", 1)
            c.config_set("min-replicas-max-lag", 1)
            # Start only once the primary takes writes: a replica not yet acked within
            # the lag refuses the worker's start too (a second, rightly logged, line).
            deadline = time.monotonic() + 15
            while True:
                try:
                    c.set("{x}:probe", 1)
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "the primary never took writes"
                    time.sleep(0.1)
        app = App(redis_url=s.url, namespace=ns())
        async with app:

            @app.task(name="nap")
            async def nap() -> int:
                await asyncio.sleep(3.5)  # past the replica's lag of 1 s
                return 1

            w = app.worker()
            run = asyncio.create_task(w.run())
            try:
                h = await nap.send()

                async def started() -> bool:
                    return await h.state() is TaskState.STARTED

                await wait_until(started, 10, "the task to start")
                s.replica.pause()
                try:
                    await asyncio.sleep(6)  # the body ends meanwhile; its result is refused
                    with redis.Redis(port=s.primary.port) as c:
                        with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
                            c.set("{x}:probe", 1)
                finally:
                    s.replica.resume()
                assert await h.result(timeout=30) == 1
            finally:
                w.stop()
                await run
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    refused = [m for m in errors if "NOREPLICAS" in m]
    assert len(refused) == 1 and "lost Redis" in refused[0], errors
    assert any("is back after" in r.getMessage() for r in caplog.records), errors


async def test_notifications_stay_on_the_shard_that_owns_the_namespace(
    cluster: OwnCluster, capp: App
) -> None:
    """Scripts SPUBLISH and notifiers SSUBSCRIBE on the slot's owner: a master without the
    namespace's keys hears nothing of it (a classic PUBLISH would reach every master)."""
    app, namespace = capp, capp.settings.namespace
    owner = cluster.master_of("{" + namespace + "}:x")
    others = [m for m in cluster.masters if m is not owner and m.is_running()]
    heard: list[Any] = []
    listeners = []
    for m in others:
        r = redis.asyncio.Redis(port=m.port)
        p = r.pubsub()
        await p.psubscribe("{" + namespace + "}*")
        listeners.append((r, p))

    @app.task
    async def step() -> int:
        from aiotasks import current_task

        await current_task().progress(at=1)
        return 1

    w = app.worker(concurrency=8)
    run = asyncio.create_task(w.run())
    try:
        hs = await asyncio.gather(*(step.send() for _ in range(20)))
        assert [await h.result(timeout=15) for h in hs] == [1] * 20
        watched = await step.send()
        assert [i.state async for i in watched.updates()][-1] is TaskState.SUCCESS
        with cluster.client(owner) as c:
            channels = c.execute_command("PUBSUB", "SHARDCHANNELS", "{" + namespace + "}*")
        assert any(b"reply:" in ch for ch in channels), channels
    finally:
        w.stop()
        await run
        for r, p in listeners:
            while (msg := await p.get_message(timeout=0.2)) is not None:
                if msg["type"] == "pmessage":
                    heard.append(msg)
            await p.aclose()
            await r.aclose()
    assert heard == []


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


def namespace_in_slot(slot: int) -> str:
    """A fresh namespace whose hash tag lands in `slot`."""
    from redis.crc import key_slot

    while True:
        name = f"rs-{uuid.uuid4().hex[:8]}"
        if key_slot(("{" + name + "}").encode()) == slot:
            return name


def node_id(own: OwnCluster, server: Any) -> str:
    with own.client(server) as c:
        return str(c.execute_command("CLUSTER", "MYID").decode())


async def reshard_one_slot(own: OwnCluster, source: Any, target: Any) -> str:
    """`redis-cli --cluster reshard` of the source's lowest slot; its output."""
    proc = await asyncio.create_subprocess_exec(
        *("redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}"),
        *("--cluster-from", node_id(own, source), "--cluster-to", node_id(own, target)),
        # Few keys per MIGRATE: the slot stays open while tasks flow.
        *("--cluster-slots", "1", "--cluster-pipeline", "1", "--cluster-yes"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "BUSYKEY" not in text and "[ERR]" not in text, text[-3000:]
    return text


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()


class Traffic:
    """Three coroutines sending plain tasks one at a time, and one sending chords whose
    body records its runs: a chord's send waits out a slot move, plain sends keep
    arriving while keys are half moved."""

    def __init__(self, app: App) -> None:
        self.add = app.task(name="tests.apps.basic.add")(_add)
        self.sleep = app.task(name="tests.apps.basic.sleep")(_sleep)
        self.tally = app.task(name="tests.apps.basic.tally")(_tally)
        self.handles: list[Any] = []
        self.chords: list[tuple[str, Any]] = []
        self.sent_at: list[float] = []
        self._stop = asyncio.Event()
        self._running: Any = None

    def start(self) -> None:
        self._running = asyncio.gather(self._chords(), *(self._plain() for _ in range(3)))

    async def stop(self) -> None:
        self._stop.set()
        await self._running

    async def _plain(self) -> None:
        while not self._stop.is_set():
            self.handles.append(await self.sleep.send(0.001))
            self.sent_at.append(time.monotonic())
            await asyncio.sleep(0.002)

    async def _chords(self) -> None:
        while not self._stop.is_set():
            key = uuid.uuid4().hex
            c = chord([self.add.s(j, j) for j in range(4)], self.tally.s(key))
            self.chords.append((key, await c.send()))
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_resharding_a_busy_namespace_slot_loses_nothing(tmp_path: Path) -> None:
    """`redis-cli --cluster reshard` moves the namespace's slot to another master while
    two workers run tasks and senders send tasks and chords: no BUSYKEY, every task ends
    SUCCESS, every chord body runs once, no send raises, no worker exits."""
    with OwnCluster(masters=3, replicas=0) as own:
        source, target = own.masters[1], own.masters[2]
        with own.client(source) as c:
            slots = c.execute_command("CLUSTER", "SLOTS")
        # reshard moves the source's lowest slots first: put the namespace in that one.
        first = min(lo for lo, _hi, primary, *_ in slots if int(primary[1]) == source.port)
        namespace = namespace_in_slot(first)
        assert own.master_of("{" + namespace + "}:x") is source
        app = App(redis_url=own.url, namespace=namespace)
        traffic = Traffic(app)
        async with app:
            # A backlog, so the slot holds thousands of keys while it moves.
            backlog = await asyncio.gather(*(traffic.sleep.send(0.001) for _ in range(4000)))
            workers = [spawn(own.url, namespace, tmp_path / f"w{i}.log") for i in range(2)]
            try:
                traffic.start()
                await asyncio.sleep(1.0)
                # A wait subscribed before the move, whose notification comes after it.
                slow = await traffic.sleep.send(3.0)
                waiting = asyncio.ensure_future(slow.result(timeout=30))
                await asyncio.sleep(0.1)
                t0 = time.monotonic()
                await reshard_one_slot(own, source, target)
                t1 = time.monotonic()
                await asyncio.sleep(1.0)
                await traffic.stop()
                assert own.master_of("{" + namespace + "}:x") is target
                # The result subscription followed the slot to its new owner.
                assert not waiting.done()
                assert await waiting == 3.0
                assert len(traffic.handles) > 100 and len(traffic.chords) > 10
                assert any(t0 < t < t1 for t in traffic.sent_at), "no send while the slot moved"
                for h in [*backlog, *traffic.handles]:
                    assert await h.result(timeout=60) == 0.001
                for _key, h in traffic.chords:
                    assert await h.result(timeout=60) == 12
                runs = (tmp_path / "runs").read_text().split()
                assert sorted(runs) == sorted(key for key, _h in traffic.chords)
                assert all(w.poll() is None for w in workers), "a worker exited"
            finally:
                stop_workers(workers)
        logs = "".join((tmp_path / f"w{i}.log").read_text(errors="replace") for i in range(2))
        assert "Traceback" not in logs, logs[-3000:]


async def _add(x: int, y: int) -> int:
    return x + y


async def _sleep(seconds: float) -> float:
    return seconds


async def _tally(results: list[int], key: str) -> int:
    return sum(results)
