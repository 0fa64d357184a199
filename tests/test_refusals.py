"""Redis that answers but refuses: out of memory (OOM), an ACL user without the key
permission (NOPERM), a read-only replica (READONLY), a server loading its data (LOADING).

`send` raises BrokerRefusedError (an AiotasksError, never a raw redis-py error) and
enqueues nothing; a worker starting against such a server logs one line per try and
retries with backoff, as against an unreachable one, and starts once the cause is gone.
Every test starts the servers it needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import AiotasksError, App, BrokerConnectionError, BrokerRefusedError, Worker, chord
from aiotasks.testing.server import OwnServer
from tests.helpers import count_enqueue_calls, wait_until

ADD = "tests.apps.basic.add"


def add_user(server: OwnServer, name: str, *rules: str) -> str:
    """Create an ACL user (password "pw") with `rules`; its URL."""
    with redis.Redis.from_url(server.url) as r:
        r.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    return server.url.replace("redis://", f"redis://{name}:pw@")


def config(server: OwnServer, **values: Any) -> None:
    with redis.Redis.from_url(server.url) as r:
        for key, value in values.items():
            r.config_set(key.replace("_", "-"), value)


async def namespace_keys(server: OwnServer, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(server.url) as r:
        return sorted(r.scan_iter(match="{" + namespace + "}*"))


def tasks_of(app: App) -> Any:
    @app.task(name=ADD)
    async def add(x: int, y: int) -> int:
        return x + y

    return add


@pytest.fixture
async def make(namespace: str) -> AsyncIterator[Callable[..., App]]:
    """Apps on any URL (closed after the test), each with the `add` task."""
    made: list[App] = []

    def new(url: str, **settings: Any) -> App:
        a = App(redis_url=url, namespace=namespace, **settings)
        tasks_of(a)
        made.append(a)
        return a

    yield new
    for a in made:
        await a.close()


@pytest.fixture
def replica(own_server: OwnServer) -> Iterator[OwnServer]:
    """A read-only replica of `own_server`."""
    with OwnServer(config={"replicaof": f"127.0.0.1 {own_server.port}"}) as server:
        yield server


@pytest.fixture
def loading_server(tmp_path: Path) -> Iterator[OwnServer]:
    """A server that answers LOADING for about 3 s after each (re)start: 3,000 keys in its
    RDB file, loaded at 1 ms per key (Redis's own test knob `key-load-delay`)."""
    data = tmp_path / "data"
    data.mkdir()
    settings = {"dir": str(data), "loading-process-events-interval-bytes": "1024"}
    with OwnServer(config=settings) as server:
        with redis.Redis.from_url(server.url) as r:
            with r.pipeline(transaction=False) as pipe:
                for i in range(3000):
                    pipe.set(f"filler:{i}", "x" * 20)
                pipe.execute()
            r.save()
        server.stop()
        server._config["key-load-delay"] = "1000"
        yield server


def is_loading(server: OwnServer) -> bool:
    with redis.Redis.from_url(server.url) as r:
        return int(r.info("persistence")["loading"]) == 1


# -- send --------------------------------------------------------------------------------


def check_refusal(exc: BaseException, code: str, words: str) -> None:
    assert isinstance(exc, BrokerRefusedError) and isinstance(exc, AiotasksError)
    assert not isinstance(exc, redis.RedisError)
    assert exc.code == code, exc
    assert words in str(exc), str(exc)
    assert isinstance(exc.__cause__, redis.RedisError)  # the redis-py error, for debugging


async def every_send(app: App) -> list[BaseException]:
    """Each way of sending, once: the error each raised (the test fails if one succeeds)."""
    add = app.tasks[ADD]
    attempts = [
        lambda: add.send(1, 2),
        lambda: add.send_many([((1, 2), None), ((3, 4), None)]),
        lambda: add.s(1, 2).send(),
        lambda: app.send_task(ADD, args=(1, 2)),
        lambda: chord([add.s(1, 1), add.s(2, 2)], add.s(0)).send(),
    ]
    errors = []
    for attempt in attempts:
        with pytest.raises(AiotasksError) as err:
            await attempt()
        errors.append(err.value)
    return errors


async def test_send_to_a_server_out_of_memory(
    own_server: OwnServer, namespace: str, make: Callable[..., App]
) -> None:
    app = make(own_server.url)
    config(own_server, maxmemory=1)
    for exc in await every_send(app):
        check_refusal(exc, "OOM", "out of memory")
    config(own_server, maxmemory=0)
    assert await namespace_keys(own_server, namespace) == []  # nothing was enqueued


async def test_send_as_a_user_without_the_key_permission(
    own_server: OwnServer, namespace: str, make: Callable[..., App]
) -> None:
    url = add_user(own_server, "stranger", "~someone-else:*", "&*", "+@all")
    app = make(url)
    for exc in await every_send(app):
        check_refusal(exc, "NOPERM", "no permissions")
        assert "stranger:***@" in str(exc) and ":pw@" not in str(exc)
    assert await namespace_keys(own_server, namespace) == []


async def test_send_to_a_read_only_replica(
    replica: OwnServer, own_server: OwnServer, namespace: str, make: Callable[..., App]
) -> None:
    app = make(replica.url)
    for exc in await every_send(app):
        check_refusal(exc, "READONLY", "read only replica")
    assert await namespace_keys(own_server, namespace) == []


@pytest.mark.parametrize(
    "refusing",
    [{"min_replicas_to_write": 1}, {"maxmemory": 1}],
    ids=["NOREPLICAS", "OOM"],
)
async def test_concurrent_sends_refused_by_the_server_are_not_sent_again_one_by_one(
    own_server: OwnServer, namespace: str, make: Callable[..., App], refusing: dict[str, int]
) -> None:
    """A batch of sends is split only when Redis refuses what a record holds: a refusal
    about the server (its replicas, its memory) refuses each record alike, and sending
    each again alone multiplied the calls and their retries."""
    app = make(own_server.url, retry_policy={"max_retries": 0})
    calls = count_enqueue_calls(app)
    config(own_server, **refusing)
    try:
        out = await asyncio.gather(
            *(app.tasks[ADD].send(i, i) for i in range(5)), return_exceptions=True
        )
    finally:
        config(own_server, min_replicas_to_write=0, maxmemory=0)
    code = "NOREPLICAS" if "min_replicas_to_write" in refusing else "OOM"
    for exc in out:
        assert isinstance(exc, BaseException)
        check_refusal(exc, code, code)
    assert calls == [5], calls
    assert await namespace_keys(own_server, namespace) == []


async def test_send_to_a_loading_server(
    loading_server: OwnServer, make: Callable[..., App]
) -> None:
    app = make(loading_server.url, retry_policy={"max_retries": 1})
    await asyncio.to_thread(loading_server.start)
    assert is_loading(loading_server)
    with pytest.raises(BrokerRefusedError) as err:
        await app.tasks[ADD].send(1, 2)
    check_refusal(err.value, "LOADING", "loading")
    assert err.value.is_transient


# -- worker start ------------------------------------------------------------------------


def start_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "cannot start" in r.getMessage()]


async def refused_then_started(
    w: Worker, caplog: pytest.LogCaptureFixture, words: str, fix: Callable[[], Any]
) -> None:
    """Run `w`: it must retry (two lines naming `words`, no traceback) and not die; after
    `fix()` it must start and run a task."""
    task = asyncio.create_task(w.run())

    async def two_tries() -> bool:
        assert not task.done(), f"the worker stopped: {task.exception()!r}"
        return len(start_lines(caplog)) >= 2

    await wait_until(two_tries, 10, "two start attempts")
    assert not w._started.is_set()
    for record in start_lines(caplog):
        text = record.getMessage()
        assert record.levelno == logging.ERROR and record.exc_info is None
        assert words in text and "retrying in" in text and "\n" not in text, text
    await asyncio.to_thread(fix)
    try:
        await asyncio.wait_for(w.wait_started(), 10)
        assert await (await w.app.tasks[ADD].send(2, 3)).result(timeout=10) == 5
    finally:
        w.stop()
        await asyncio.wait_for(task, 10)


async def test_worker_start_without_the_key_permission_retries(
    own_server: OwnServer, make: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    url = add_user(own_server, "app", "~someone-else:*", "&*", "+@all")
    app = make(url)

    def grant() -> None:
        add_user(own_server, "app", "~*", "&*", "+@all")

    await refused_then_started(app.worker(), caplog, "NOPERM", grant)


async def test_worker_start_on_a_server_out_of_memory_retries(
    own_server: OwnServer, make: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    app = make(own_server.url)
    config(own_server, maxmemory=1)
    await refused_then_started(
        app.worker(), caplog, "out of memory", lambda: config(own_server, maxmemory=0)
    )


async def test_worker_starts_on_a_server_out_of_memory_when_its_groups_exist(
    own_server: OwnServer, make: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    app = make(own_server.url)
    w = app.worker()
    await app.client.ensure_groups(w.streams)  # the groups exist
    config(own_server, maxmemory=1)
    async with w.running():
        assert w._started.is_set()
    assert start_lines(caplog) == []


async def test_worker_start_on_a_replica_retries(
    replica: OwnServer, make: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    app = make(replica.url)

    def promote() -> None:
        with redis.Redis.from_url(replica.url) as r:
            r.replicaof("NO", "ONE")

    await refused_then_started(app.worker(), caplog, "READONLY", promote)


async def test_worker_start_on_a_loading_server_waits(
    loading_server: OwnServer, make: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiotasks")
    app = make(loading_server.url)
    await asyncio.to_thread(loading_server.start)
    assert is_loading(loading_server)
    started = time.monotonic()
    # The fix is time: the load ends by itself.
    await refused_then_started(app.worker(), caplog, "loading", lambda: None)
    assert not is_loading(loading_server)
    assert time.monotonic() - started < 15


# -- `aiotasks run` ----------------------------------------------------------------------


async def test_cli_run_retries_a_refusal_one_line_per_try_then_exits(
    own_server: OwnServer, spawn_worker: Any
) -> None:
    url = add_user(own_server, "app", "~someone-else:*", "&*", "+@all")
    w = spawn_worker("--connect-timeout", "3", url=url)
    code = await asyncio.to_thread(w.wait, 20)
    out = w.output()
    assert code == 1, out
    assert "Traceback" not in out, out
    lines = out.strip().splitlines()
    tries = [line for line in lines if "WARNING" in line and "refused creating" in line]
    assert len(tries) >= 2, out
    assert all("NOPERM" in line and "attempt" in line for line in tries), out
    assert lines[-1].startswith("error: Redis at redis://app:***@") and "NOPERM" in lines[-1]
    assert lines[-1].endswith("(still refused after 3 s)")
    assert ":pw@" not in out


async def test_cli_run_starts_once_the_refusal_is_fixed(
    own_server: OwnServer, spawn_worker: Any, make: Callable[..., App]
) -> None:
    url = add_user(own_server, "app", "~someone-else:*", "&*", "+@all")
    w = spawn_worker("--connect-timeout", "30", url=url)
    await asyncio.to_thread(w.wait_for_output, "refused creating the consumer group", 15)
    add_user(own_server, "app", "~*", "&*", "+@all")
    await asyncio.to_thread(w.wait_for_output, "aiotasks worker", 15)  # the banner
    app = make(own_server.url)
    assert await (await app.tasks[ADD].send(2, 2)).result(timeout=10) == 4
    assert "Traceback" not in w.output()


# -- not Redis at that address ----------------------------------------------------------


async def test_send_to_a_server_that_is_not_redis_says_so(namespace: str) -> None:
    """A typo'd port that hits a web server: BrokerConnectionError naming the likely
    cause, never redis-py's InvalidResponse."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"<html>400 Bad Request</html>\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = App(redis_url=f"redis://127.0.0.1:{port}", namespace=namespace)
    try:
        with pytest.raises(BrokerConnectionError, match="does not speak the Redis protocol"):
            await app.send_task(ADD, args=(1, 2))
    finally:
        await app.close()
        server.close()


async def test_send_with_tls_to_a_plain_server_gives_up_in_seconds(
    redis_url: str, namespace: str
) -> None:
    """A plain server never answers a TLS handshake: each connect gives up after the
    2 s connect timeout (redis-py's pool tries it three times), and the error says why."""
    plain = redis_url.replace("redis://", "rediss://", 1)
    app = App(redis_url=plain, namespace=namespace, retry_policy={"max_retries": 0})
    t0 = time.monotonic()
    try:
        with pytest.raises(BrokerConnectionError, match="never answers a TLS handshake"):
            await app.send_task(ADD, args=(1, 2))
    finally:
        await app.close()
    assert time.monotonic() - t0 < 10


def test_a_failovers_refusals_are_transient_only_behind_sentinel_or_cluster() -> None:
    """READONLY and NOREPLICAS are waited out behind a Sentinel or Cluster URL (a
    failover explains them), also as Redis before 7 wraps them in a script's error;
    against one server they are refusals."""
    from redis.exceptions import ReadOnlyError, ResponseError

    from aiotasks.client import Client
    from aiotasks.config import Settings

    errors = [
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("NOREPLICAS Not enough good replicas to write."),
        ResponseError("ERR Error running script (call to f_1): @user_script:9: -NOREPLICAS x"),
        ResponseError("ERR unknown command"),
    ]
    for url, expected in [
        ("redis://h:6379/0", [False, False, False, False]),
        ("redis+sentinel://h:26379/mymaster", [True, True, True, False]),
        ("redis+cluster://h:7000", [True, True, True, False]),
    ]:
        client = Client(Settings(redis_url=url))
        assert [client.transient(e) for e in errors] == expected, url
        # A worker waits out these and a lost connection alike.
        assert [client.waits_out(e) for e in errors] == expected, url
        assert client.waits_out(redis.ConnectionError("gone")), url
        # The same refusal once send's retry policy gave up on it (progress(), a tick).
        given_up = BrokerRefusedError("refused: NOREPLICAS", code="NOREPLICAS")
        assert client.waits_out(given_up) is expected[1], url
        assert not client.waits_out(BrokerRefusedError("refused: NOPERM", code="NOPERM")), url


def test_a_refusal_inside_a_pipeline_keeps_its_code(own_server: OwnServer) -> None:
    """redis-py puts "Command # 1 (HSET ...) of pipeline caused error: " before a
    pipeline's error reply: its code read as ERR (a worker's heartbeat refused with
    NOREPLICAS during a switchover was not waited out, and logged the command)."""
    from aiotasks.refusals import error_code, refusal

    config(own_server, min_replicas_to_write=1)
    try:
        with redis.Redis.from_url(own_server.url) as r:
            with pytest.raises(redis.ResponseError) as err:
                r.pipeline().hset("k", "secret-field", "v").execute()
    finally:
        config(own_server, min_replicas_to_write=0)
    assert "of pipeline caused error" in str(err.value)  # redis-py's wording, as met
    assert error_code(err.value) == "NOREPLICAS"
    said = str(refusal(own_server.url, err.value, "the heartbeat"))
    assert said.startswith(f"Redis at {own_server.url} refused the heartbeat: NOREPLICAS")
    assert "secret-field" not in said and "Command #" not in said, said


@pytest.mark.parametrize("code", ["OOM", "NOREPLICAS", "READONLY", "NOPERM"])
def test_a_refusal_wrapped_by_a_script_on_redis_6_keeps_its_code(code: str) -> None:
    """Redis before 7 replies to a script's refused command with "ERR Error running
    script (call to f_...): @user_script:1: -OOM ...": the code inside is the code (a
    batch of sends refused so was split, as if a record were at fault)."""
    from redis.exceptions import ResponseError

    from aiotasks.refusals import error_code

    wrapped = ResponseError(
        f"Error running script (call to f_4a7c): @user_script:12: -{code} command not allowed"
    )
    assert error_code(wrapped) == code
    assert error_code(ResponseError("Error running script (call to f_1): boom")) == "ERR"
