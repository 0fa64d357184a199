"""Redis going away: workers ride out a server restart, clients fail in bounded time.

Every test owns its server (`own_server`); a restart brings it back EMPTY (no persistence),
as a server that lost its memory would.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from redis.asyncio.connection import Connection, parse_url

from aiotasks import AiotasksError, App, BrokerConnectionError, TaskLost, TaskState
from aiotasks.testing.server import OwnServer
from tests.helpers import pid_of, wait_consuming, wait_until

Spawn = Callable[..., Any]

ADD = "tests.apps.basic.add"
SLEEP = "tests.apps.basic.sleep"


@pytest.fixture
async def client(own_server: OwnServer, namespace: str) -> AsyncIterator[App]:
    """An App on the test's own server."""
    a = App(redis_url=own_server.url, namespace=namespace)
    yield a
    await a.close()


async def restart(server: OwnServer) -> None:
    await asyncio.to_thread(server.restart)


def marker_exists(server: OwnServer) -> bool:
    """Whether the marker key set before a restart survived it (it must not: no persistence).

    The worker may already have recreated its streams by the time we look, so the marker,
    not the key count, tells whether the server came back empty.
    """
    r = redis.Redis.from_url(server.url)
    try:
        return bool(r.exists("restart-marker"))
    finally:
        r.close()


def set_marker(server: OwnServer) -> None:
    r = redis.Redis.from_url(server.url)
    try:
        r.set("restart-marker", "1")
    finally:
        r.close()


#: What a worker says when Redis goes away: from its fetch loop, its heartbeat or its commits.
LOST_REDIS = ("lost Redis", "cannot reach Redis")


def lost_redis_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(s in line for s in LOST_REDIS)]


async def test_idle_worker_survives_a_server_restart(
    own_server: OwnServer, client: App, spawn_worker: Spawn
) -> None:
    w = spawn_worker(url=own_server.url)
    await wait_consuming(client, w)
    assert await (await client.send_task(ADD, args=(1, 2))).result(timeout=10) == 3

    set_marker(own_server)
    await restart(own_server)
    assert not marker_exists(own_server)  # it came back empty
    await asyncio.to_thread(w.wait_for_output, "lost Redis", 10)

    h = await client.send_task(ADD, args=(2, 3))
    assert await h.result(timeout=15) == 5
    assert w.proc.poll() is None  # the same process went on
    info = await h.info()
    assert info.worker is not None and pid_of(info.worker) == w.pid
    out = w.output()
    assert "Traceback" not in out, out
    # One line when it went, one when it came back, whichever loops noticed it.
    assert len(lost_redis_lines(out)) == 1, out
    assert out.count("is back after") == 1, out


async def test_busy_worker_survives_a_server_restart(
    own_server: OwnServer, client: App, spawn_worker: Spawn
) -> None:
    w = spawn_worker("--concurrency", "4", url=own_server.url)
    await wait_consuming(client, w)
    before = [await client.send_task(SLEEP, args=(0.5,)) for _ in range(12)]

    async def some_started() -> bool:
        return any([await h.state() == TaskState.STARTED for h in before])

    await wait_until(some_started, 10, "a task to start")
    await restart(own_server)  # queued, running and finished tasks are all forgotten

    after = [await client.send_task(ADD, args=(i, 1)) for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(h.result(timeout=30) for h in after)), timeout=35
    )
    assert results == [i + 1 for i in range(20)]
    assert w.proc.poll() is None
    assert all([pid_of((await h.info()).worker or "") == w.pid for h in after])
    out = w.output()
    assert "Traceback" not in out, out
    # One line when it went, one when it came back, whichever loops noticed it.
    assert len(lost_redis_lines(out)) == 1, out
    assert out.count("is back after") == 1, out


async def test_send_to_a_stopped_server_raises_after_the_retry_policy(
    own_server: OwnServer, client: App, namespace: str
) -> None:
    assert await client.send_task(ADD, args=(1, 1))  # connected and working
    await asyncio.to_thread(own_server.stop)

    t0 = time.monotonic()
    with pytest.raises(BrokerConnectionError) as err:
        await client.send_task(ADD, args=(1, 2))
    assert time.monotonic() - t0 < 5.0
    assert isinstance(err.value, AiotasksError)
    assert isinstance(err.value, ConnectionError)

    t0 = time.monotonic()
    with pytest.raises(BrokerConnectionError):
        await client.send_task(
            ADD,
            args=(1, 2),
            retry_policy={"max_retries": 2, "interval_start": 0.3, "interval_max": 1.0},
        )
    took = time.monotonic() - t0
    assert 0.6 <= took < 3.0, took  # it did wait between tries, and then gave up

    fast = App(redis_url=own_server.url, namespace=namespace, retry_policy={"max_retries": 0})
    try:
        t0 = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            await fast.send_task(ADD, args=(1, 2))
        assert time.monotonic() - t0 < 1.0
    finally:
        await fast.close()

    # The same client works again once the server is back.
    await asyncio.to_thread(own_server.start)
    h = await client.send_task(ADD, args=(2, 2))
    assert await h.state() == TaskState.PENDING
    assert await client.client.redis.exists(client.client.keys.task(h.id))


async def test_result_waiter_of_a_task_lost_in_a_restart_raises_task_lost(
    own_server: OwnServer, client: App, spawn_worker: Spawn
) -> None:
    """A restart without persistence loses the task: its waiter is told so at the
    reconnect (TaskLost), not left waiting. (A restart that keeps the data is ridden out:
    test_data_loss.py.)"""
    w = spawn_worker(url=own_server.url)
    await wait_consuming(client, w)
    # Scheduled far ahead, so the worker leaves it alone before the restart.
    h = await client.send_task(ADD, args=(20, 22), countdown=60)
    waiter = asyncio.create_task(h.result(timeout=30))
    r = client.client.redis
    control = client.client.keys.control_channel.encode()

    async def waiter_subscribed() -> bool:
        channels = await r.pubsub_channels(client.client.keys.prefix + "*")
        return any(c != control for c in channels)

    await wait_until(waiter_subscribed, 5, "the result waiter to subscribe")
    assert not waiter.done()

    await restart(own_server)  # the task is gone with the data
    with pytest.raises(TaskLost):
        await asyncio.wait_for(waiter, timeout=10)
    # Sent again under the same id, it runs.
    again = await client.send_task(ADD, args=(20, 22), task_id=h.id)
    assert again.id == h.id
    assert await again.result(timeout=20) == 42
    assert w.proc.poll() is None


async def test_a_watcher_marks_its_task_again_after_a_reconnect(
    own_server: OwnServer, client: App
) -> None:
    """A failover can promote a replica that never got a waiter's watch mark (`_w`): after
    its reconnect, the notifier marks every watched task again, so the worker still
    publishes the task's final state and the waiter is woken."""

    @client.task
    async def double(x: int) -> int:
        return 2 * x

    h = await double.send(21)
    seen: list[TaskState] = []

    async def follow() -> None:
        async for info in client.handle(h.id).updates():
            seen.append(info.state)

    follower = asyncio.ensure_future(follow())
    key = client.client.keys.task(h.id)
    raw = redis.Redis.from_url(own_server.url)
    try:
        await wait_until(lambda: asyncio.to_thread(raw.hexists, key, "_w"), timeout=5)
        reconnects = client.client.notifier.reconnects
        raw.hdel(key, "_w")  # the mark lost, as on a replica that never received it
        raw.client_kill_filter(_type="pubsub")  # the notifier's connection drops
        await wait_until(
            lambda: asyncio.sleep(0, client.client.notifier.reconnects > reconnects), timeout=10
        )
        await wait_until(lambda: asyncio.to_thread(raw.hexists, key, "_w"), timeout=5)
    finally:
        raw.close()
    w = client.worker(concurrency=4)
    running = asyncio.create_task(w.run())
    try:
        # Woken by the published final state: updates() does not poll.
        await asyncio.wait_for(follower, timeout=10)
    finally:
        w.stop()
        await running
    assert seen[-1] is TaskState.SUCCESS
    assert await h.result(timeout=1) == 42


async def test_a_connection_torn_down_under_a_command_is_a_lost_connection(app: App) -> None:
    """A pooled connection whose transport is gone but not yet noticed (another coroutine
    closed it between redis-py's "connected?" check and the write, as a cluster's topology
    refresh does) fails that write with AttributeError inside asyncio; aiotasks' clients
    report it as a lost connection, so the send is retried and succeeds."""

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await add.send(0, 0)  # the pool now holds a connected connection
    pool = app.client.redis.connection_pool
    torn = [c for c in pool._available_connections if c.is_connected]  # type: ignore[attr-defined]
    assert torn, "no idle connected connection to tear down"
    for c in torn:
        c._writer = _TornWriter()
    h = await add.send(1, 2)
    assert await h.state() is TaskState.PENDING


class _TornWriter:
    """An asyncio StreamWriter whose transport a disconnect has just cleared."""

    _transport: Any = None

    def writelines(self, data: Any) -> None:
        self._transport.writelines(data)  # AttributeError on None, as asyncio raises

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


async def test_a_broken_connections_error_is_not_left_for_asyncio_to_print(
    redis_url: str,
) -> None:
    """A connection reset under a command raises a ConnectionError, and the same error,
    which asyncio's stream keeps in a future of its own, is marked seen: collected before
    its stream, that future would print "Future exception was never retrieved" and a
    traceback (a CLI after its one error line, a worker in its log)."""
    from aiotasks.transport import guarded

    target = parse_url(redis_url)

    async def reset_at_ping(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A proxy to the test server (which answers the connection's handshake) that
        # resets the client's connection when a PING comes.
        server_r, server_w = await asyncio.open_connection(target["host"], target["port"])

        async def down() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)

        relay = asyncio.create_task(down())
        while data := await client_r.read(65536):
            if b"PING" in data:
                sock = client_w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client_w.transport.abort()  # with a zero linger: a reset, not an end
                break
            server_w.write(data)
        relay.cancel()
        server_w.close()

    proxy = await asyncio.start_server(reset_at_ping, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    options = {k: v for k, v in target.items() if k not in ("host", "port")}
    conn = guarded(Connection)(host="127.0.0.1", port=port, **options)
    try:
        await conn.connect()
        # Held, so that its own collection does not mark the future seen, as in a cycle
        # (a TLS connection's) the collector may free the future first.
        protocol = conn._writer._protocol  # type: ignore[union-attr]
        closed = protocol._closed
        await conn.send_command("PING")
        with pytest.raises(redis.ConnectionError):
            await conn.read_response()
        assert closed.done()  # connection_lost() set it as it woke the read
        closed.__del__()  # what collecting it first does: report it unless it was seen
        assert reported == []
        del protocol
        assert isinstance(closed.exception(), ConnectionResetError)
    finally:
        loop.set_exception_handler(None)
        await conn.disconnect()
        proxy.close()
        await proxy.wait_closed()


def test_a_command_is_packed_as_redis_py_packs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiotasks' connections pack commands with hiredis directly, skipping redis-py's
    encoding of each argument: the bytes on the wire are the same, and what redis-py
    refuses, it still refuses."""
    import hiredis

    from aiotasks import transport
    from aiotasks.transport import guarded

    packed_directly: list[tuple[Any, ...]] = []

    def pack_and_count(args: tuple[Any, ...]) -> bytes:
        out = hiredis.pack_command(args)
        packed_directly.append(args)
        return out

    monkeypatch.setattr(transport, "hiredis", SimpleNamespace(pack_command=pack_and_count))

    ours, theirs = guarded(Connection)(), Connection()
    for args in [
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 1000, "STREAMS", "s", ">"),
        ("FCALL", "f", 2, "{p}:", "{p}:guard", 1796590350946, "send", b"\x91\x89\xa1v"),
        ("SET", "é", 2.5, 1e20, -0.0, float("inf"), 2**70, -3),
        ("SET", "k", bytearray(b"ba")),  # redis-py's way: hiredis takes no bytearray
        ("SET", "k", memoryview(b"abcdef")[::2]),  # a chunk of its own, strides and all
        ("SET", "k", memoryview(b"m" * 10_000)),
        ("CLIENT SETINFO", "LIB-NAME", "x"),  # names that redis-py splits or strips
        ("GET\t", "k"),
        ("GET\n", "k"),
        ("", "GET", "k"),
        (b"GET", "k"),
    ]:
        assert ours.pack_command(*args) == theirs.pack_command(*args), args
    assert [a[0] for a in packed_directly] == ["XREADGROUP", "FCALL", "SET"]
    for bad in [("SET", "k", True), ("SET", "k", None), ("SET", "\udc80", "v")]:
        with pytest.raises(Exception) as refused:
            theirs.pack_command(*bad)
        with pytest.raises(type(refused.value)):
            ours.pack_command(*bad)


def test_only_a_torn_transport_reads_as_a_lost_connection() -> None:
    """A bug elsewhere (an attribute missing on a real object) is not retried as one."""
    from aiotasks.transport import _torn

    def error_of(f: Any) -> BaseException:
        try:
            f()
        except Exception as exc:
            return exc
        raise AssertionError("no error")

    assert _torn(error_of(lambda: _TornWriter().writelines([b"x"])))
    nothing: Any = None
    assert _torn(error_of(lambda: nothing()))
    closed = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
    assert _torn(RuntimeError(closed))  # uvloop's closed transport
    assert not _torn(RuntimeError("Event loop is closed"))
    assert not _torn(error_of(lambda: object().writelines))  # type: ignore[attr-defined]
    assert not _torn(error_of(lambda: len(1)))  # type: ignore[arg-type]


async def test_an_outage_of_seconds_is_one_line_when_it_starts_and_one_when_it_ends(
    own_server: OwnServer, client: App, spawn_worker: Spawn
) -> None:
    """Fetching, the heartbeat, storing results, the scheduler and the result listener
    all retry through an outage; together they say so once (it was 75 lines for 30 s)."""
    w = spawn_worker("--concurrency", "4", url=own_server.url)
    await wait_consuming(client, w)
    [await client.send_task(SLEEP, args=(0.3,)) for _ in range(4)]
    await asyncio.sleep(0.1)
    await asyncio.to_thread(own_server.stop)
    await asyncio.sleep(6)  # past a heartbeat and several fetch and store retries
    await asyncio.to_thread(own_server.start)
    await asyncio.to_thread(w.wait_for_output, "is back after", 20)
    h = await client.send_task(ADD, args=(2, 3))
    assert await h.result(timeout=15) == 5
    out = w.output()
    assert len(lost_redis_lines(out)) == 1, out
    assert out.count("is back after") == 1, out


async def test_every_watched_task_is_marked_again_before_its_waiters_hear_of_the_reconnect(
    own_server: OwnServer, client: App
) -> None:
    """Hundreds of watchers: the notifier marks their tasks again many at a time, and
    only then tells the waiters it reconnected (they re-read, and rely on the mark for
    what comes after). Cancelled as they re-read, every watcher then ends."""

    @client.task(queue="nobody-works-this")
    async def idle(x: int) -> int:
        return x

    n = 300
    handles = await idle.send_many([((i,), None) for i in range(n)])

    async def follow(task_id: str) -> None:
        async for _ in client.handle(task_id).updates():
            pass

    followers = [asyncio.ensure_future(follow(h.id)) for h in handles]
    keys = [client.client.keys.task(h.id) for h in handles]
    raw = redis.Redis.from_url(own_server.url)

    def marked() -> int:
        with raw.pipeline(transaction=False) as p:
            for key in keys:
                p.hexists(key, "_w")
            return sum(map(bool, p.execute()))

    try:
        await wait_until(lambda: asyncio.to_thread(lambda: marked() == n), timeout=10)
        notifier = client.client.notifier
        reconnects = notifier.reconnects
        with raw.pipeline(transaction=False) as p:
            for key in keys:
                p.hdel(key, "_w")  # every mark lost, as on a replica that never got them
            p.execute()
        raw.client_kill_filter(_type="pubsub")
        await wait_until(lambda: asyncio.sleep(0, notifier.reconnects > reconnects), timeout=10)
        # Read at once: the marks were back before the reconnect was announced.
        assert await asyncio.to_thread(marked) == n
    finally:
        raw.close()
        for f in followers:
            f.cancel()
        _, pending = await asyncio.wait(followers, timeout=10)
    assert not pending, f"{len(pending)} cancelled watchers still watch"


def test_an_outage_ends_when_a_loop_gets_through_or_every_refused_one_has(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A primary refusing writes (NOREPLICAS after a failover) lets reads through: the
    fetch getting through must not end an outage the store loop is still in, or the log
    flaps between 'lost' and 'back' once per retry."""
    from aiotasks.outage import Outage

    caplog.set_level(logging.DEBUG, logger="aiotasks")
    outage = Outage("worker w", "redis://h:6379/0")
    refused = redis.ResponseError("NOREPLICAS Not enough good replicas to write.")
    outage.failed("storing 3 result(s)", refused, 0.1, loop="store")
    for _ in range(3):
        outage.ok("fetch")
        outage.failed("heartbeat", refused)
        outage.ok("heartbeat")
        outage.failed("storing 3 result(s)", refused, 0.2, loop="store")
    assert outage.since is not None
    outage.ok("store")
    assert outage.since is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert "lost Redis" in lines[0] and "storing 3 result(s): NOREPLICAS" in lines[0]
    assert "is back after" in lines[1]

    # A loop that failed and tried no more (a shard's heartbeat beats only while that
    # shard runs tasks) holds the outage open only FORGET seconds, not for good.
    from aiotasks.outage import FORGET

    outage.failed("heartbeat", refused)
    outage.ok("fetch")
    assert outage.since is not None
    outage._refused["heartbeat"] -= FORGET + 1  # its refusal, that long ago
    outage.ok("fetch")
    assert outage.since is None

    # A lost connection is over once any loop gets through: the heartbeat, which beats
    # every visibility_timeout / 3, must not hold the 'back' line that long.
    outage.failed("heartbeat", redis.ConnectionError("gone"))
    outage.failed("fetch", redis.ConnectionError("gone"), 0.1)
    outage.ok("fetch")
    assert outage.since is None

    # A write that gets through shows the refusal is over for every loop (Redis refuses
    # writes, not loops): the heartbeat refused meanwhile, which beats again only
    # visibility_timeout / 3 later, must not hold the 'back' line until then (CI saw the
    # Sentinel NOREPLICAS drill end with no 'back' line at all).
    outage.failed("fetch", refused, 0.1)
    outage.failed("heartbeat", refused)
    outage.ok("periodic scheduler")  # a read: proves nothing
    assert outage.since is not None
    outage.ok("store", wrote=True)
    assert outage.since is None
