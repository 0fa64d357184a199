"""Graceful shutdown of a real worker process: SIGTERM/SIGINT, the shutdown timeout, and a
second signal. Nothing is lost: what does not finish is redelivered."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from aiotasks import App, TaskState
from aiotasks.cancel import cancel_and_wait
from aiotasks.cli.run import CLOSE_TIMEOUT
from aiotasks.testing.server import OwnServer
from aiotasks.worker import STORE_GRACE, UNREGISTER_TIMEOUT
from tests.helpers import ReadAhead, pid_of, runs_key, wait_consuming, wait_state, wait_until

Spawn = Callable[..., Any]

SLEEP = "tests.apps.basic.sleep"
ADD = "tests.apps.basic.add"
STAGED_SLEEP = "tests.apps.reliability.staged_sleep"
M = "reliability"  # the worker app module: basic.py's tasks plus staged_sleep


async def wait_exit(proc: Any, timeout: float) -> tuple[int, float]:
    """Wait (without blocking the loop) for a worker process to exit: (code, seconds)."""
    t0 = time.monotonic()
    try:
        code = await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit in {timeout} s; its log:\n{proc.output()}") from None
    return code, time.monotonic() - t0


async def wait_first_step(app: App, key: str) -> None:
    """Wait until staged_sleep's body has counted its run: STARTED is recorded just
    before the body begins, and these tests need the body itself under way."""

    async def counted() -> bool:
        return int(await app.client.redis.get(key) or 0) >= 1

    await wait_until(counted, 10, "the task body to begin")


async def pending_entries(app: App, queue: str = "default") -> int:
    r = app.client.redis
    total = 0
    for stream in app.client.keys.streams(queue):
        if await r.exists(stream):
            total += int((await r.xpending(stream, "workers"))["pending"])
    return total


async def test_sigterm_lets_the_running_task_finish_and_exits_0(
    app: App, spawn_worker: Spawn
) -> None:
    w = spawn_worker(module=M)
    await wait_consuming(app, w)
    h = await app.send_task(SLEEP, args=(2,))
    await wait_state(h, TaskState.STARTED)
    w.signal(signal.SIGTERM)
    code, took = await wait_exit(w, 10)
    assert code == 0, w.output()
    # The result was stored before the process went away.
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.result == 2
    assert info.attempts == 1
    assert 1.0 <= took < 4.0, took
    assert await pending_entries(app) == 0
    assert "Traceback" not in w.output()


async def test_sigterm_on_an_idle_worker_exits_0_and_unregisters(
    app: App, spawn_worker: Spawn
) -> None:
    w = spawn_worker(module=M)
    await wait_consuming(app, w)
    names = await app.client.redis.zrange(app.client.keys.workers, 0, -1)
    (name,) = [n.decode() for n in names if pid_of(n.decode()) == w.pid]
    w.signal(signal.SIGTERM)
    code, took = await wait_exit(w, 10)
    assert code == 0, w.output()
    assert took < 2.0
    assert not await app.client.redis.exists(app.client.keys.worker(name)), w.output()


async def test_a_worker_stopped_between_prepare_and_run_unregisters(app: App) -> None:
    """`aiotasks run` prepares (registers), prints its banner, then runs: a SIGTERM in
    between used to leave the registration to expire."""
    w = app.worker()
    await w.prepare()
    key = app.client.keys.worker(w.name)
    assert await app.client.redis.exists(key)
    w.stop()
    await asyncio.wait_for(w.run(), 5)
    assert not await app.client.redis.exists(key)


async def test_shutdown_timeout_leaves_the_unfinished_task_to_be_redelivered(
    app: App, spawn_worker: Spawn
) -> None:
    w1 = spawn_worker("--shutdown-timeout", "1", module=M)
    await wait_consuming(app, w1)
    key = runs_key(app)
    # The first run takes 10 s; a redelivered run takes 0.2 s.
    h = await app.send_task(STAGED_SLEEP, args=(key, 10.0, 0.2))
    await wait_first_step(app, key)
    w1.signal(signal.SIGTERM)
    code, took = await wait_exit(w1, 10)
    assert code == 0, w1.output()
    assert 0.9 <= took < 4.0, took
    # Not finished, not lost: still held as a pending entry, waiting for redelivery.
    assert await h.state() == TaskState.STARTED
    assert await pending_entries(app) == 1
    assert "redelivered" in w1.output()

    w2 = spawn_worker(module=M)
    assert await h.result(timeout=20) == 2
    info = await h.info()
    assert info.state == TaskState.SUCCESS
    assert info.attempts == 2
    assert pid_of(info.worker) == w2.pid
    assert int(await app.client.redis.get(key)) == 2
    assert await pending_entries(app) == 0


async def test_sigterm_stops_fetching_queued_tasks_stay_for_others(
    app: App, spawn_worker: Spawn
) -> None:
    w1 = spawn_worker("--concurrency", "1", module=M)
    await wait_consuming(app, w1)
    key = runs_key(app)
    running = await app.send_task(STAGED_SLEEP, args=(key, 1.5, 0.0))
    await wait_first_step(app, key)
    queued = [await app.send_task(ADD, args=(i, i)) for i in range(3)]
    w1.signal(signal.SIGTERM)
    code, _ = await wait_exit(w1, 10)
    assert code == 0, w1.output()
    assert (await running.info()).state == TaskState.SUCCESS
    # A stopping worker takes nothing new: the queued tasks wait, untouched, for others.
    assert [await h.state() for h in queued] == [TaskState.PENDING] * 3
    assert await pending_entries(app) == 0

    spawn_worker(module=M)
    assert [await h.result(timeout=15) for h in queued] == [0, 2, 4]
    assert [(await h.info()).attempts for h in queued] == [1, 1, 1]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGINT),
    ],
    ids=["term-term", "int-int", "term-int"],
)
async def test_second_signal_exits_at_once_and_the_task_is_redelivered(
    app: App, spawn_worker: Spawn, first: signal.Signals, second: signal.Signals
) -> None:
    w1 = spawn_worker(module=M)  # default --shutdown-timeout 30
    await wait_consuming(app, w1)
    key = runs_key(app)
    h = await app.send_task(STAGED_SLEEP, args=(key, 30.0, 0.2))
    await wait_first_step(app, key)
    w1.signal(first)
    await asyncio.to_thread(w1.wait_for_output, "stopping", 5)
    assert w1.proc.poll() is None  # the first signal waits for the task
    w1.signal(second)
    code, took = await wait_exit(w1, 5)
    assert took < 2.0, took
    assert code != 0  # forced: not a clean exit
    assert await h.state() == TaskState.STARTED

    w2 = spawn_worker(module=M)
    assert await h.result(timeout=20) == 2
    info = await h.info()
    assert info.attempts == 2
    assert pid_of(info.worker) == w2.pid


async def test_a_stop_gives_entries_read_ahead_back_to_the_queue(app: App) -> None:
    """A read-ahead entry (fetched beyond the free slots) never began: on stop it goes
    back to its stream at once, PENDING, instead of waiting out the visibility timeout."""
    gate = ReadAhead(app)
    w = app.worker(concurrency=1, shutdown_timeout=5)
    running = asyncio.create_task(w.run())
    await w.wait_started()
    first, held, ahead = await gate.send()
    entry_before = await app.client.redis.hget(app.client.keys.task(ahead.id), "_e")

    w.stop()
    await asyncio.sleep(0.2)
    gate.unblock.set()
    await asyncio.wait_for(running, 10)

    assert await first.result(timeout=1) == "first"
    assert await held.state() == TaskState.SUCCESS
    assert "ahead" not in gate.runs
    assert await ahead.state() == TaskState.PENDING
    entry_after = await app.client.redis.hget(app.client.keys.task(ahead.id), "_e")
    assert entry_after != entry_before  # given back as a new entry, not left pending
    assert await pending_entries(app) == 0

    w2 = app.worker(concurrency=1)
    again = asyncio.create_task(w2.run())
    assert await ahead.result(timeout=10) == "ahead"
    w2.stop()
    await asyncio.wait_for(again, 10)
    assert gate.runs.count("ahead") == 1


async def test_a_def_task_past_the_shutdown_timeout_does_not_hold_the_exit(
    app: App, spawn_worker: Spawn
) -> None:
    """The interpreter joins a thread still running a `def` body before it exits: the
    worker leaves it (its entry is redelivered) and exits on time."""
    w = spawn_worker("--shutdown-timeout", "1")
    await wait_consuming(app, w)
    h = await app.send_task("tests.apps.basic.blocking_sleep", args=(30,))
    await wait_state(h, TaskState.STARTED)
    w.signal(signal.SIGTERM)
    code, took = await wait_exit(w, 15)
    assert code == 0, w.output()
    assert took < 5.0, took
    assert "abandoned task(s) still running" in w.output()
    assert await pending_entries(app) == 1  # redelivered after the visibility timeout


async def test_sigterm_with_redis_gone_exits_after_the_shutdown_timeout(
    own_server: OwnServer, spawn_worker: Spawn, namespace: str
) -> None:
    """Outcomes that Redis cannot take are retried while the worker runs; a stop gives
    them shutdown_timeout plus a grace, then exits (they are redelivered)."""
    async with App(redis_url=own_server.url, namespace=namespace) as client:
        w = spawn_worker("--shutdown-timeout", "1", url=own_server.url)
        await wait_consuming(client, w)
        await client.send_task(SLEEP, args=(0.5,))
        await asyncio.sleep(0.2)
        own_server.kill()  # the run ends with nowhere to store its result
        await asyncio.to_thread(w.wait_for_output, "lost Redis", 10)
        await asyncio.sleep(0.6)
        w.signal(signal.SIGTERM)
        code, took = await wait_exit(w, 20)
    assert code == 0, w.output()
    assert took < 1.0 + STORE_GRACE + UNREGISTER_TIMEOUT + 2.0, took
    assert "will be redelivered" in w.output()
    assert "Traceback" not in w.output()


async def test_sigterm_with_redis_hung_exits_in_bounded_time(
    own_server: OwnServer, spawn_worker: Spawn, namespace: str
) -> None:
    """A server that accepts nothing and answers nothing (SIGSTOP: a hung host, a
    partition) holds no stop longer than the shutdown timeout and its graces."""
    async with App(redis_url=own_server.url, namespace=namespace) as client:
        w = spawn_worker("--shutdown-timeout", "1", url=own_server.url)
        await wait_consuming(client, w)

    async def consuming() -> Any:
        return w

    _, took = await sigterm_while_hung(own_server, consuming, 0.5)
    assert took < 1.0 + 1.0 + STORE_GRACE + UNREGISTER_TIMEOUT + 3.0, took


async def sigterm_while_hung(
    own_server: OwnServer, start: Callable[[], Awaitable[Any]], settle: float
) -> tuple[Any, float]:
    """Pause the server, `start()` a worker (or take the one it returns), SIGTERM it
    `settle` s later; resume the server whatever happens. The worker exits 0 without a
    traceback; (the worker, seconds to its exit)."""
    own_server.pause()
    try:
        w = await start()
        await asyncio.sleep(settle)
        w.signal(signal.SIGTERM)
        code, took = await wait_exit(w, 30)
    finally:
        own_server.resume()
    assert code == 0, w.output()
    assert "Traceback" not in w.output()
    return w, took


def established_to(port: int) -> int:
    """TCP connections established to a loopback port (any process): /proc/net/tcp."""
    rows = [ln.split() for ln in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[2] == f"0100007F:{port:04X}" and row[3] == "01")


async def test_sigterm_while_connecting_to_a_hung_server_exits_at_once(
    own_server: OwnServer, spawn_worker: Spawn
) -> None:
    """A server hung before the worker could prepare (each try of redis-py's lasts its
    socket timeout and retries, 30 s and more) does not hold a SIGTERM: exit 0."""
    port = int(own_server.url.rsplit(":", 1)[1].split("/")[0])

    async def connecting() -> Any:
        w = spawn_worker("--shutdown-timeout", "1", url=own_server.url)

        async def connected() -> bool:
            assert w.proc.poll() is None, w.output()
            return established_to(port) > 0  # its signal handlers are set before

        await wait_until(connected, 20, "the worker to connect")
        return w

    w, took = await sigterm_while_hung(own_server, connecting, 0.3)
    assert took < 4.0, (took, w.output())


async def test_a_prepared_worker_stopped_on_a_hung_server_does_not_wait_to_unregister(
    own_server: OwnServer, namespace: str
) -> None:
    """prepare() registered the worker, then the server hung and a stop came before run():
    run() leaves the registry within UNREGISTER_TIMEOUT, not redis-py's retries."""
    async with App(redis_url=own_server.url, namespace=namespace) as app:
        w = app.worker(shutdown_timeout=1)
        await w.prepare()
        own_server.pause()
        try:
            w.stop()
            t0 = time.monotonic()
            await asyncio.wait_for(w.run(), 30)
            took = time.monotonic() - t0
        finally:
            own_server.resume()
    assert UNREGISTER_TIMEOUT - 0.5 < took < UNREGISTER_TIMEOUT + 1.5, took


class HangingProxy:
    """A loopback proxy to a server that passes everything until a client sends `at`,
    then nothing more, either way, on any connection (old or new): a server that hangs
    at a chosen command."""

    def __init__(self, host: str, port: int, at: bytes) -> None:
        self.target = (host, port)
        self.at = at
        self.hung = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await cancel_and_wait(self._tasks)
        for w in self._writers:
            w.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.append(cast(asyncio.Task[None], asyncio.current_task()))
        self._writers.append(client_w)
        if self.hung.is_set():
            await asyncio.Future()  # the connection is accepted; nothing answers
        server_r, server_w = await asyncio.open_connection(*self.target)
        self._writers.append(server_w)

        async def down() -> None:
            while (data := await server_r.read(65536)) and not self.hung.is_set():
                client_w.write(data)
            await asyncio.Future()

        self._tasks.append(asyncio.create_task(down()))
        while data := await client_r.read(65536):
            if self.at in data:
                self.hung.set()
            if self.hung.is_set():
                await asyncio.Future()
            server_w.write(data)


async def test_sigterm_while_aiotasks_run_prepares_on_a_server_that_hung_exits_in_time(
    own_server: OwnServer, spawn_worker: Spawn
) -> None:
    """The server hangs while `aiotasks run` still prepares, after the worker registered
    (at its JOINED event): the try is given up, the unregister and the close are bounded
    (redis-py's socket timeout and retries held this stop 30 s and more)."""
    host, port = own_server.url.split("//", 1)[1].split("/")[0].rsplit(":", 1)
    proxy = HangingProxy(host, int(port), b"JOINED")
    async with proxy as url:
        w = spawn_worker("--shutdown-timeout", "1", url=url)

        async def hung() -> bool:
            assert w.proc.poll() is None, w.output()
            return proxy.hung.is_set()

        await wait_until(hung, 20, "the worker's JOINED event")
        await asyncio.sleep(0.3)
        w.signal(signal.SIGTERM)
        code, took = await wait_exit(w, 30)
    assert code == 0, w.output()
    assert took < UNREGISTER_TIMEOUT + CLOSE_TIMEOUT + 3.0, (took, w.output())
    assert "Traceback" not in w.output()
