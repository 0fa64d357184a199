"""Results: values, failures, timeouts, states, info, forget, TTLs and notification latency."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from aiotasks import (
    AiotasksError,
    App,
    ResultTimeout,
    TaskFailed,
    TaskHandle,
    TaskInfo,
    TaskRevoked,
    TaskState,
    Worker,
)
from tests.helpers import wait_until

StartWorker = Callable[..., Awaitable[Worker]]


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture
def client(make_app: Callable[..., App]) -> App:
    """A second App on the test namespace: the sending/waiting side, apart from the worker."""
    return make_app()


# -- values and failures --------------------------------------------------------------


async def test_result_returns_the_value(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> dict[str, int]:
        return {"sum": x + y}

    await worker()
    h = await add.send(2, 3)
    assert await h.result(timeout=5) == {"sum": 5}
    # A second call reads the stored value again.
    assert await h.result(timeout=5) == {"sum": 5}


async def test_timestamps_keep_their_order_when_a_run_takes_under_a_millisecond(
    app: App, worker: StartWorker
) -> None:
    @app.task(name="noop")
    async def noop() -> None:
        return None

    await worker()
    for _ in range(50):  # an idle worker starts and ends each within the send's millisecond
        h = await noop.send()
        await h.result(timeout=10)
        info = await h.info()
        assert info.enqueued_at and info.started_at and info.finished_at
        assert info.enqueued_at <= info.started_at <= info.finished_at, info


async def test_result_without_timeout_waits(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await add.send(2, 3)
    async with asyncio.timeout(5):
        assert await h.result() == 5


async def test_result_of_a_failed_task_raises_task_failed(app: App, worker: StartWorker) -> None:
    def check_input_here(value: int) -> None:
        raise ValueError(f"bad input {value}")

    @app.task
    async def validate(value: int) -> None:
        check_input_here(value)

    await worker()
    h = await validate.send(42)
    with pytest.raises(TaskFailed) as caught:
        await h.result(timeout=5)
    err = caught.value
    assert isinstance(err, AiotasksError)
    assert err.task_id == h.id
    assert err.exc_type == "ValueError"
    assert err.exc_message == "bad input 42"
    assert err.traceback is not None
    assert "check_input_here" in err.traceback
    assert "ValueError: bad input 42" in err.traceback
    assert await h.state() == TaskState.FAILURE
    info = await h.info()
    assert (info.exc_type, info.exc_message) == ("ValueError", "bad input 42")
    assert info.traceback == err.traceback


async def test_failure_of_a_sync_task(app: App, worker: StartWorker) -> None:
    @app.task
    def explode() -> None:
        raise KeyError("missing")

    await worker()
    h = await explode.send()
    with pytest.raises(TaskFailed) as caught:
        await h.result(timeout=5)
    assert caught.value.exc_type == "KeyError"
    assert "explode" in (caught.value.traceback or "")


async def test_result_of_a_revoked_task_raises_task_revoked(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.send(1, 2)
    await h.revoke()
    assert await h.state() == TaskState.REVOKED
    await worker()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)


# -- timeouts and unknown ids --------------------------------------------------------------


async def test_result_timeout_when_no_worker_runs(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.send(1, 2)
    started = time.monotonic()
    with pytest.raises(ResultTimeout) as caught:
        await h.result(timeout=0.3)
    elapsed = time.monotonic() - started
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, AiotasksError)
    assert 0.25 <= elapsed < 2
    # Timing out leaves the task alone.
    assert await h.state() == TaskState.PENDING


async def test_unknown_task_id_reads_as_pending(app: App) -> None:
    h = app.handle(uuid.uuid4().hex)
    assert await h.state() == TaskState.PENDING
    info = await h.info()
    assert info.state == TaskState.PENDING
    assert info.result is None and info.name is None
    with pytest.raises(ResultTimeout):
        await h.result(timeout=0.3)


# -- states and info -----------------------------------------------------------------------


async def test_state_moves_pending_started_success(app: App, worker: StartWorker) -> None:
    gate = asyncio.Event()

    @app.task
    async def gated() -> str:
        await gate.wait()
        return "done"

    h = await gated.send()
    assert await h.state() == TaskState.PENDING
    await worker()

    async def started() -> bool:
        return await h.state() == TaskState.STARTED

    await wait_until(started)
    gate.set()
    assert await h.result(timeout=5) == "done"
    assert await h.state() == TaskState.SUCCESS


async def test_info_fields(app: App, worker: StartWorker) -> None:
    @app.task(name="info.add", queue="numbers")
    async def add(x: int, y: int) -> int:
        return x + y

    w = await worker(queues=["numbers"])
    before = time.time()
    h = await add.send(2, 3)
    assert await h.result(timeout=5) == 5
    after = time.time()
    info = await h.info()
    assert isinstance(info, TaskInfo)
    assert info.id == h.id
    assert info.name == "info.add"
    assert info.state == TaskState.SUCCESS
    assert info.result == 5
    assert info.exc_type is None and info.exc_message is None and info.traceback is None
    assert info.attempts == 1
    assert info.queue == "numbers"
    assert info.worker == w.name
    stamps = [info.enqueued_at, info.started_at, info.finished_at]
    for stamp in stamps:
        assert stamp is not None
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert info.enqueued_at <= info.started_at <= info.finished_at  # type: ignore[operator]
    # The stamps are wall-clock times of this run (ms precision on the wire).
    assert before - 0.01 <= info.enqueued_at.timestamp() <= after + 0.01  # type: ignore[union-attr]
    assert info.finished_at.timestamp() <= after + 0.01  # type: ignore[union-attr]


async def test_info_of_a_queued_task(app: App) -> None:
    @app.task(name="info.queued")
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.send(2, 3)
    info = await h.info()
    assert info.state == TaskState.PENDING
    assert info.name == "info.queued"
    assert info.queue == "default"
    assert info.enqueued_at is not None
    assert info.started_at is None and info.finished_at is None
    assert info.result is None


# -- forget -----------------------------------------------------------------------------


async def test_forget_leaves_an_unfinished_task_alone(app: App, worker: StartWorker) -> None:
    """No result to forget yet: the task still runs, and its waiters still hear of it."""

    @app.task
    async def slow_add(x: int, y: int) -> int:
        await asyncio.sleep(0.5)
        return x + y

    queued = await slow_add.send(1, 1)
    await queued.forget()
    await worker()
    running = await slow_add.send(2, 3)
    await wait_until(lambda: _is_started(running), timeout=5, what="the task to start")
    await running.forget()
    assert await running.result(timeout=5) == 5
    assert await queued.result(timeout=5) == 2


async def _is_started(h: TaskHandle[Any]) -> bool:
    return await h.state() == TaskState.STARTED


async def test_forget_makes_the_task_unknown(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await add.send(2, 3)
    assert await h.result(timeout=5) == 5
    await h.forget()
    assert await h.state() == TaskState.PENDING
    info = await h.info()
    assert info.state == TaskState.PENDING
    assert info.result is None
    assert not await app.client.redis.exists(app.client.keys.task(h.id))
    with pytest.raises(ResultTimeout):
        await h.result(timeout=0.2)


async def test_forget_forgets_a_result_that_came_to_the_handle(
    app: App, worker: StartWorker
) -> None:
    """Once the App has waited for a result, its later sends' final states come to their
    handles unasked (the reply channel): forget() forgets that one too."""

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    assert await (await add.send(0, 0)).result(timeout=5) == 0  # the reply channel is live
    h = await add.send(0, 10)
    await wait_until(lambda: _is_final(h), timeout=5, what="the task to finish")
    await h.forget()
    with pytest.raises(ResultTimeout):
        await h.result(timeout=0.3)
    assert await h.state() == TaskState.PENDING


async def _is_final(h: TaskHandle[Any]) -> bool:
    return (await h.state()).is_final


# -- result TTL --------------------------------------------------------------------------


async def test_task_result_ttl_sets_the_hash_ttl(app: App, worker: StartWorker) -> None:
    @app.task(result_ttl=100)
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await add.send(2, 3)
    assert await h.result(timeout=5) == 5
    pttl = await app.client.redis.pttl(app.client.keys.task(h.id))
    assert 0 < pttl <= 100_000


async def test_send_option_result_ttl_wins(app: App, worker: StartWorker) -> None:
    @app.task(result_ttl=100)
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await add.apply_async((2, 3), result_ttl=7)
    assert await h.result(timeout=5) == 5
    pttl = await app.client.redis.pttl(app.client.keys.task(h.id))
    assert 0 < pttl <= 7_000


async def test_app_result_ttl_is_the_default(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    short = make_app(result_ttl=30)

    @short.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker(short)
    h = await add.send(2, 3)
    assert await h.result(timeout=5) == 5
    pttl = await short.client.redis.pttl(short.client.keys.task(h.id))
    assert 0 < pttl <= 30_000
    failing = await short.send_task("no.such.task")
    with pytest.raises(TaskFailed):
        await failing.result(timeout=5)
    pttl = await short.client.redis.pttl(short.client.keys.task(failing.id))
    assert 0 < pttl <= 30_000


async def test_failed_task_hash_has_a_ttl(app: App, worker: StartWorker) -> None:
    @app.task(result_ttl=50)
    async def boom() -> None:
        raise RuntimeError("boom")

    await worker()
    h = await boom.send()
    with pytest.raises(TaskFailed):
        await h.result(timeout=5)
    pttl = await app.client.redis.pttl(app.client.keys.task(h.id))
    assert 0 < pttl <= 50_000


# -- woken by notification, not by polling -----------------------------------------------


@pytest.mark.parametrize("sender", ["waiter", "other"])
async def test_result_is_seen_soon_after_it_lands(
    client: App, app: App, worker: StartWorker, sender: str
) -> None:
    async def slow() -> str:
        await asyncio.sleep(0.5)
        return "late"

    on_worker = app.task(name="slow")(slow)
    on_client = client.task(name="slow")(slow)
    await worker()
    sent = await (on_client if sender == "waiter" else on_worker).send()
    h = client.handle(sent.id)
    began = time.monotonic()
    assert await h.result(timeout=5) == "late"
    seen = time.time()
    assert time.monotonic() - began >= 0.45
    info = await h.info()
    assert info.finished_at is not None
    # finished_at is stamped before the commit; the waiter wakes on the notification.
    latency = seen - info.finished_at.timestamp()
    assert latency < 0.05, f"result seen {latency * 1000:.0f} ms after it landed"


async def test_many_waiters_share_one_subscription(
    make_app: Callable[..., App], redis_url: str, namespace: str, app: App, worker: StartWorker
) -> None:
    n, max_connections = 1000, 8
    name = f"aiotasks-test-{namespace}"
    client = make_app(with_query(redis_url, client_name=name), max_connections=max_connections)

    async def ident(i: int) -> int:
        return i

    remote = app.task(name="ident")(ident)
    local = client.task(name="ident")(ident)

    async def my_connections() -> list[dict[str, Any]]:
        return [c for c in await app.client.redis.client_list() if c.get("name") == name]

    waiters: list[asyncio.Future[int]] = []
    try:
        # Half sent by the waiting App itself, half by another App.
        own = await local.send_many([((i,), None) for i in range(n // 2)])
        other = await remote.send_many([((i,), None) for i in range(n // 2, n)])
        waiters = [
            asyncio.ensure_future(client.handle(h.id).result(timeout=30)) for h in own + other
        ]

        async def all_idle() -> bool:
            conns = await my_connections()
            return bool(conns) and all(int(c["idle"]) >= 2 for c in conns)

        # Waiting costs no traffic: every connection of the waiting App goes quiet for
        # over a second (Redis counts idle in whole seconds, so 2 means more than 1 s);
        # a waiter that polled at any shorter interval would keep one busy.
        await wait_until(all_idle, timeout=10)
        assert not any(w.done() for w in waiters)
        # All of them listen on one pub/sub connection, not one each.
        subscribed = [c for c in await my_connections() if int(c["sub"]) or int(c["psub"])]
        assert len(subscribed) == 1

        await worker(concurrency=200)
        async with asyncio.timeout(30):
            results = await asyncio.gather(*waiters)
        assert results == list(range(n))
        # The pool never grew past its limit; the subscription has one connection of its
        # own (outside the pool, so that it sees a lost connection and re-reads).
        assert 1 <= len(await my_connections()) <= max_connections + 1
    finally:
        for w in waiters:
            w.cancel()


async def test_results_of_one_batch_reach_their_sender_in_one_message(
    app: App, worker: StartWorker
) -> None:
    """A worker's batch of finals for one sender is one PUBLISH on its reply channel; results
    holding newlines and arbitrary bytes arrive intact, each to its own waiter."""

    @app.task(serializer="msgpack")
    async def blob(i: int) -> bytes:
        return b"line\n" + bytes([i % 256]) * (i % 7) + b"\n\x00end"

    notifier = app.client.notifier
    await notifier.ensure_reply()
    seen: list[bytes] = []
    original = notifier._reply

    def recording(data: bytes) -> None:
        seen.append(data)
        original(data)

    notifier._reply = recording  # type: ignore[method-assign]
    handles = await blob.send_many([((i,), None) for i in range(200)])
    waiters = [asyncio.ensure_future(h.result(timeout=30)) for h in handles]
    await worker(concurrency=50)
    results = await asyncio.gather(*waiters)
    assert results == [b"line\n" + bytes([i % 256]) * (i % 7) + b"\n\x00end" for i in range(200)]
    batches = [d for d in seen if d.startswith(b"\n")]
    assert batches, "a batch of finals for one sender must arrive as one message"
    assert len(seen) < 200


async def test_a_task_nobody_watches_costs_no_publish_on_its_channel(
    app: App, worker: StartWorker
) -> None:
    """STARTED and the final state go to a task's own channel only once someone watches it
    (handle.updates(), or a handle of another App): a raw subscriber that did not mark the
    task hears nothing, a marked one hears both."""

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    redis = app.client.redis
    pubsub = redis.pubsub()
    unwatched = await double.send(1)
    watched = await double.send(2)
    await pubsub.subscribe(app.client.keys.done_channel(unwatched.id))
    await pubsub.subscribe(app.client.keys.done_channel(watched.id))
    await app.client.scripts.watch(task_id=watched.id, ttl=60)
    try:
        await worker()
        assert await unwatched.result(timeout=10) == 2
        assert await watched.result(timeout=10) == 4
        heard: dict[str, list[bytes]] = {unwatched.id: [], watched.id: []}
        deadline = asyncio.get_running_loop().time() + 5
        quiet_since = None
        # Read until the watched task's two messages are in and nothing more came for 0.5 s.
        while asyncio.get_running_loop().time() < deadline:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            now = asyncio.get_running_loop().time()
            if msg is not None:
                heard[msg["channel"].decode().rsplit(":", 1)[1]].append(msg["data"])
                quiet_since = None
            elif len(heard[watched.id]) >= 2:
                quiet_since = quiet_since or now
                if now - quiet_since >= 0.5:
                    break
        assert heard[watched.id] == [b"STARTED", b"SUCCESS"]
        assert heard[unwatched.id] == []
    finally:
        await pubsub.aclose()


# -- the mailbox of a fresh handle ------------------------------------------------------


def count_reads(a: App, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids whose hash the App reads from here on (a spy on our own code; Redis is real)."""
    reads: list[str] = []
    original = a.client.task_hash

    async def task_hash(task_id: str) -> dict[bytes, bytes]:
        reads.append(task_id)
        return await original(task_id)

    monkeypatch.setattr(a.client, "task_hash", task_hash)
    return reads


async def test_a_fresh_handles_result_comes_without_reading_the_task(
    app: App, worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent while the reply channel is subscribed, a task's success (with its value) lands
    in its handle's mailbox: result() reads nothing, even when called long after the
    task finished. A failure is read, for its error."""

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    @app.task
    async def boom() -> None:
        raise ValueError("no")

    await worker()
    assert await (await double.send(0)).result(timeout=10) == 0  # subscribes the channel
    reads = count_reads(app, monkeypatch)
    handles = [await double.send(i) for i in range(1, 6)]
    other = app.handle(handles[-1].id)  # a handle made from an id has no mailbox

    async def all_done() -> bool:
        return all([await h.state() is TaskState.SUCCESS for h in handles])

    await wait_until(all_done, timeout=10)  # finished before anyone waits
    assert [await h.result(timeout=5) for h in handles] == [2, 4, 6, 8, 10]
    assert reads == []
    assert await other.result(timeout=5) == 10  # read: it was not sent from this handle
    assert reads == [other.id]
    failing = await boom.send()
    with pytest.raises(TaskFailed, match="ValueError"):
        await failing.result(timeout=10)
    assert reads[1:] == [failing.id]


async def test_a_fresh_handle_reads_its_task_after_the_notifier_reconnects(
    own_server: Any, namespace: str
) -> None:
    """A final state published while the notifier is away is lost to it: the reconnect
    tells every mailbox, and its handle reads the task instead of waiting forever."""
    import redis

    a = App(redis_url=own_server.url, namespace=namespace)
    release = asyncio.Event()

    @a.task
    async def held(x: int) -> int:
        await release.wait()
        return x

    w = a.worker(concurrency=4)
    running = asyncio.create_task(w.run())
    raw = redis.Redis.from_url(own_server.url)
    try:
        release.set()
        assert await (await held.send(0)).result(timeout=10) == 0  # subscribes the channel
        release.clear()
        handles = [await held.send(x) for x in (1, 2, 3)]

        async def running_all() -> bool:
            return all([await h.state() is TaskState.STARTED for h in handles])

        await wait_until(running_all, timeout=10)
        reconnects = a.client.notifier.reconnects
        raw.client_kill_filter(_type="pubsub")  # the notifier's connection drops...
        release.set()  # ...and the results are published before it reconnects (50 ms on)
        assert [await h.result(timeout=10) for h in handles] == [1, 2, 3]
        assert a.client.notifier.reconnects > reconnects
    finally:
        raw.close()
        w.stop()
        await running
        await a.close()


async def test_a_second_send_of_a_live_id_leaves_the_first_handle_its_result(
    app: App, worker: StartWorker
) -> None:
    """Two sends of one id while it is live: the second is kept out (dedup), and both
    handles, and two waiters on one handle, get the one result."""
    gate = asyncio.Event()

    @app.task
    async def gated(x: int) -> int:
        await gate.wait()
        return x

    await worker()
    gate.set()
    assert await (await gated.send(0)).result(timeout=10) == 0  # subscribes the channel
    gate.clear()
    first = await gated.options(task_id="same-id").send(7)
    second = await gated.options(task_id="same-id").send(8)  # live: kept out
    waits = [first.result(timeout=10), first.result(timeout=10), second.result(timeout=10)]
    gate.set()
    assert await asyncio.gather(*waits) == [7, 7, 7]


async def test_a_handle_outliving_its_apps_connection_reads_its_result(
    app: App, worker: StartWorker, make_app: Callable[..., App]
) -> None:
    """A handle whose App was closed after the send (the next use opens a new connection
    and notifier) gets its result by reading: its mailbox's notifier is gone."""
    gate = asyncio.Event()

    @app.task(name="gated")
    async def gated(x: int) -> int:
        await gate.wait()
        return x

    sender = make_app()
    await worker()
    gate.set()
    assert await (await sender.send_task("gated", args=(0,))).result(timeout=10) == 0
    gate.clear()
    h = await sender.send_task("gated", args=(5,))
    await sender.close()
    gate.set()  # its result is published while nobody of the sender listens
    assert await h.result(timeout=10) == 5
