"""The Lua scripts: every file loads on the server, and enqueue.lua's dedup rules."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
import redis

from aiotasks import App, TaskState
from aiotasks.contract import done_op
from aiotasks.keys import GROUP
from aiotasks.message import Message
from aiotasks.scripts import LIBRARIES, NAMES, SOURCES, _source
from aiotasks.testing.server import OwnServer

LUA_DIR = resources.files("aiotasks") / "lua"
LUA_FILES = sorted(
    p.name for p in LUA_DIR.iterdir() if p.name.endswith(".lua") and not p.name.startswith("_")
)


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# -- every script loads ----------------------------------------------------------------


def test_sources_are_the_lua_files() -> None:
    assert SOURCES, "no scripts registered"
    for name in SOURCES:
        assert f"{name}.lua" in LUA_FILES, f"SOURCES names {name!r} but there is no {name}.lua"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_registered_script_loads(sync_redis: redis.Redis, name: str) -> None:
    source = SOURCES[name]
    sha = sync_redis.script_load(source)
    assert sha == hashlib.sha1(source.encode()).hexdigest()
    assert sync_redis.script_exists(sha) == [True]


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """A RESP2 map (name, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@pytest.mark.parametrize("sharded_pubsub", [False, True], ids=["publish", "spublish"])
def test_the_function_library_registers_every_script(
    own_server: OwnServer, sharded_pubsub: bool
) -> None:
    lib = LIBRARIES[sharded_pubsub]
    with redis.Redis.from_url(own_server.url) as r:
        assert r.function_load(lib.source) == lib.name.encode()
        [listed] = r.function_list(library=lib.name)
    found = [_pairs(f) for f in _pairs(listed)[b"functions"]]
    functions = {f[b"name"].decode(): f[b"flags"] for f in found}
    assert set(functions) == {lib.function(name) for name in NAMES}
    # Only scripts that grow no memory, or free it, run on a server out of memory.
    assert {n for n, flags in functions.items() if b"allow-oom" in flags} == {
        lib.function(name) for name in ("forget", "purge", "heartbeat")
    }
    assert LIBRARIES[True].name != LIBRARIES[False].name


async def test_a_server_that_lost_the_library_gets_it_again(
    own_server: OwnServer, namespace: str
) -> None:
    """A restart without persistence (here a FUNCTION DELETE) loses the library: the
    next call loads it and goes on, by FCALL."""
    app = App(redis_url=own_server.url, namespace=namespace)

    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        first = await add.send(1, 2)
        scripts = app.client.scripts
        assert scripts.functions is True
        with redis.Redis.from_url(own_server.url) as r:
            r.function_delete(LIBRARIES[False].name)
        second = await add.send(3, 4)
        assert scripts.functions is True
        assert await first.state() == await second.state() == TaskState.PENDING
        with redis.Redis.from_url(own_server.url) as r:
            assert r.function_list(library=LIBRARIES[False].name)
            calls = r.info("commandstats")
        assert "cmdstat_evalsha" not in calls and calls["cmdstat_fcall"]["calls"] >= 3
    finally:
        await app.close()


@pytest.mark.parametrize("filename", LUA_FILES)
def test_every_lua_file_loads_with_the_shared_library(
    sync_redis: redis.Redis, filename: str
) -> None:
    # Every script is loaded the same way: the generated contract, _lib, then the file.
    assert filename.removesuffix(".lua") in SOURCES, f"{filename} is not in the registry"
    assert sync_redis.script_load(_source(filename.removesuffix(".lua")))


@pytest.mark.parametrize("filename", LUA_FILES)
def test_every_lua_file_documents_its_keys_args_and_return(filename: str) -> None:
    text = (LUA_DIR / filename).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    block = "\n".join(header)
    assert header, f"{filename} does not open with a comment block"
    assert header[0].startswith(f"-- {filename.removesuffix('.lua')}:")
    assert "KEYS[1]" in block
    assert "ARGV[1]" in block
    assert "Returns" in block


# -- enqueue.lua dedup ------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def message(task_id: str | None = None, **fields: Any) -> Message:
    return Message(id=task_id or uuid.uuid4().hex, name="scripts.t", args=[1], **fields)


async def enqueue(app: App, mode: str, *messages: Message, ttl: int = 60) -> list[int]:
    tasks = [m.record(ttl).wire() for m in messages]
    result = await app.client.scripts.enqueue(now_ms=now_ms(), mode=mode, tasks=tasks)
    return [int(x) for x in result]


async def stream_ids(app: App, queue: str = "default", priority: int = 5) -> list[str]:
    entries: Any = await app.client.redis.xrange(app.client.keys.stream(queue, priority))
    return [f[b"id"].decode() for _, f in entries]


async def set_state(app: App, task_id: str, state: str) -> None:
    await app.client.redis.hset(app.client.keys.task(task_id), "state", state)


async def test_enqueue_new_id_adds_an_entry_and_a_pending_record(app: App) -> None:
    m = message()
    assert await enqueue(app, "send", m) == [1]
    assert await stream_ids(app) == [m.id]
    h = await app.client.redis.hgetall(app.client.keys.task(m.id))
    assert h[b"state"] == b"PENDING"
    assert h[b"name"] == b"scripts.t"
    assert h[b"queue"] == b"default"
    pttl = await app.client.redis.pttl(app.client.keys.task(m.id))
    assert 0 < pttl <= 60_000
    assert await app.client.redis.sismember(app.client.keys.queues, "default")


async def test_enqueue_due_later_goes_to_the_delayed_set(app: App) -> None:
    m = message(eta=time.time() + 60)
    assert await enqueue(app, "send", m) == [1]
    assert await stream_ids(app) == []
    score = await app.client.redis.zscore(app.client.keys.delayed, m.id)
    assert score == pytest.approx(m.eta * 1000, abs=1)  # type: ignore[operator]
    assert await app.handle(m.id).state() == TaskState.SCHEDULED


@pytest.mark.parametrize("state", ["PENDING", "SCHEDULED", "STARTED"])
async def test_send_mode_skips_a_live_id(app: App, state: str) -> None:
    m = message()
    await set_state(app, m.id, state)
    assert await enqueue(app, "send", m) == [0]
    assert await stream_ids(app) == []
    assert await app.handle(m.id).state() == state


@pytest.mark.parametrize("state", ["SUCCESS", "FAILURE", "REVOKED"])
async def test_send_mode_enqueues_a_finished_id_again(app: App, state: str) -> None:
    m = message()
    await set_state(app, m.id, state)
    assert await enqueue(app, "send", m) == [1]
    assert await stream_ids(app) == [m.id]
    assert await app.handle(m.id).state() == TaskState.PENDING


async def test_send_mode_dedups_a_queued_id_end_to_end(app: App) -> None:
    m = message()
    assert await enqueue(app, "send", m) == [1]
    assert await enqueue(app, "send", m) == [0]
    assert await stream_ids(app) == [m.id]


async def test_send_mode_dedups_within_one_batch(app: App) -> None:
    a, b = message(), message()
    dup = message(a.id)
    assert await enqueue(app, "send", a, dup, b) == [1, 0, 1]
    assert await stream_ids(app) == [a.id, b.id]


@pytest.mark.parametrize(
    "state", ["PENDING", "SCHEDULED", "STARTED", "SUCCESS", "FAILURE", "REVOKED"]
)
async def test_follow_mode_skips_any_existing_id(app: App, state: str) -> None:
    m = message()
    await set_state(app, m.id, state)
    assert await enqueue(app, "follow", m) == [0]
    assert await stream_ids(app) == []
    assert await app.handle(m.id).state() == state


async def test_follow_mode_enqueues_a_new_id_once(app: App) -> None:
    m = message()
    assert await enqueue(app, "follow", m) == [1]
    assert await enqueue(app, "follow", m) == [0]
    assert await stream_ids(app) == [m.id]


async def test_batch_of_mixed_new_and_existing_ids(app: App) -> None:
    fresh, live, done = message(), message(), message()
    await set_state(app, live.id, "STARTED")
    await set_state(app, done.id, "SUCCESS")
    assert await enqueue(app, "send", fresh, live, done) == [1, 0, 1]
    assert await stream_ids(app) == [fresh.id, done.id]


async def test_enqueue_routes_by_queue_and_priority(app: App) -> None:
    urgent = message(queue="mail", priority=9)
    lazy = message(queue="mail", priority=0)
    assert await enqueue(app, "send", urgent, lazy) == [1, 1]
    assert await stream_ids(app, "mail", 9) == [urgent.id]
    assert await stream_ids(app, "mail", 0) == [lazy.id]
    assert await app.client.redis.sismember(app.client.keys.queues, "mail")


# -- release.lua ------------------------------------------------------------------------


async def read_as(app: App, consumer: str) -> tuple[str, bytes]:
    """Read one entry of the default stream as `consumer`: (stream, entry id)."""
    stream = app.client.keys.stream("default", 5)
    r: Any = app.client.redis
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    reply = await r.xreadgroup(GROUP, consumer, {stream: ">"}, count=1)
    return stream, reply[0][1][0][0]


async def release(app: App, stream: str, consumer: str, entry_id: bytes) -> int:
    n = await app.client.scripts.release(
        streams=[stream], consumer=consumer, entries=[{"stream": stream, "entry": entry_id}]
    )
    return int(n)


async def test_release_gives_a_live_entry_back_as_a_new_entry(app: App) -> None:
    m = message()
    await enqueue(app, "send", m)
    stream, entry_id = await read_as(app, "c1")
    await set_state(app, m.id, "STARTED")
    assert await release(app, stream, "c1", entry_id) == 1
    r: Any = app.client.redis
    entries = await r.xrange(stream)
    assert [f[b"id"].decode() for _, f in entries] == [m.id]
    assert entries[0][0] != entry_id
    assert (await r.xpending(stream, GROUP))["pending"] == 0
    h = await r.hgetall(app.client.keys.task(m.id))
    assert h[b"state"] == b"PENDING"
    assert h[b"_e"] == entries[0][0]


async def test_release_leaves_an_entry_another_worker_holds(app: App) -> None:
    m = message()
    await enqueue(app, "send", m)
    stream, entry_id = await read_as(app, "c2")
    assert await release(app, stream, "c1", entry_id) == 0
    r: Any = app.client.redis
    assert [e for e, _ in await r.xrange(stream)] == [entry_id]
    assert (await r.xpending(stream, GROUP))["pending"] == 1


async def test_release_drops_an_entry_whose_task_was_revoked(app: App) -> None:
    m = message()
    await enqueue(app, "send", m)
    stream, entry_id = await read_as(app, "c1")
    await set_state(app, m.id, "REVOKED")
    assert await release(app, stream, "c1", entry_id) == 0
    r: Any = app.client.redis
    assert await r.xrange(stream) == []
    assert (await r.xpending(stream, GROUP))["pending"] == 0
    assert await app.handle(m.id).state() == TaskState.REVOKED


async def test_release_skips_a_stream_that_vanished(app: App) -> None:
    m = message()
    await enqueue(app, "send", m)
    stream, entry_id = await read_as(app, "c1")
    await app.client.redis.delete(stream)  # purged, or the server lost its data
    assert await release(app, stream, "c1", entry_id) == 0


# -- fetch.lua: tips and the wait behind them -----------------------------------------------


async def fetch(app: App, count: int, wait: tuple[int, Any] | None = None) -> dict[bytes, Any]:
    return await app.client.scripts.fetch(
        streams=app.client.keys.streams("default"),
        consumer="c1",
        count=count,
        now_ms=now_ms(),
        worker="w1",
        promote_limit=100,
        default_ttl=60,
        wait=wait,
    )


def entry_fields(entry: list[Any]) -> dict[bytes, bytes]:
    """A fetched entry's fields: fetch.lua returns [stream, entry id, flat fields]."""
    flat = entry[2]
    return dict(zip(flat[::2], flat[1::2], strict=True))


def fetched_ids(res: dict[bytes, Any]) -> list[str]:
    return [entry_fields(e)[b"id"].decode() for e in res[b"entries"]]


async def test_a_fetch_that_reads_every_stream_to_its_end_returns_tips(app: App) -> None:
    """A fetch that drains its streams says how far they went (tips), so the worker's next
    call can be the blocking wait, and that wait starts only what came after the tips:
    never a second start of what this fetch started."""
    streams = app.client.keys.streams("default")
    await app.client.ensure_groups(streams)
    first = [message() for _ in range(5)]
    await enqueue(app, "send", *first)
    part = await fetch(app, count=3)  # not drained: no tips
    assert fetched_ids(part) == [m.id for m in first[:3]]
    assert part.get(b"tips") is None
    rest = await fetch(app, count=10)  # drained, with entries: tips
    assert fetched_ids(rest) == [m.id for m in first[3:]]
    tips = rest[b"tips"]
    newest: Any = await app.client.redis.xrevrange(app.client.keys.stream("default", 5), count=1)
    assert tips[app.client.keys.stream("default", 5).encode()] == newest[0][0]
    assert {tips[s.encode()] for s in streams if not s.endswith(":5")} == {b"0-0"}
    # The wait behind those tips: one new entry, in another priority, is all it starts.
    late = message(priority=9)
    await enqueue(app, "send", late)
    r: Any = app.client.redis
    await r.xreadgroup(GROUP, "c1", {s: ">" for s in streams}, count=10)  # the blocking read
    woken = await fetch(app, count=10, wait=(1000, tips))
    assert fetched_ids(woken) == [late.id]
    pending = await r.xpending(app.client.keys.stream("default", 5), GROUP)
    assert pending["pending"] == 5  # the first five, started once each


async def finish_done(app: App, *entries: list[Any], state: str = "SUCCESS") -> None:
    """One finish call storing a result for each of `entries` (one batch)."""
    fields = {"finished_at": now_ms(), "result": b"\xc0", "ct": "msgpack", "traceback": None}
    ops = [
        done_op(
            entry[0].decode(),
            entry[1],
            entry_fields(entry)[b"id"].decode(),
            state,
            60,
            fields,
        )
        for entry in entries
    ]
    streams = app.client.keys.streams("default")
    await app.client.scripts.finish(streams=streams, now_ms=now_ms(), ops=ops)


# A batch drops what it acked from the stream by one XTRIM below the oldest pending entry
# (below its newest acked one when none is pending) and an XDEL of what it acked above it.


async def test_a_batch_finished_out_of_order_leaves_the_entries_still_pending(app: App) -> None:
    await app.client.ensure_groups(app.client.keys.streams("default"))
    sent = [message() for _ in range(6)]
    await enqueue(app, "send", *sent)
    got = (await fetch(app, count=10))[b"entries"]
    # The first and the fourth still run; the others finish in one batch.
    await finish_done(app, got[1], got[2], got[4], got[5])
    assert await stream_ids(app) == [sent[0].id, sent[3].id]
    pending = await app.client.redis.xpending(app.client.keys.stream("default", 5), GROUP)
    assert pending["pending"] == 2
    await finish_done(app, got[3], got[0])
    assert await stream_ids(app) == []


async def test_a_batch_that_empties_the_pending_list_keeps_what_was_never_delivered(
    app: App,
) -> None:
    await app.client.ensure_groups(app.client.keys.streams("default"))
    sent = [message() for _ in range(5)]
    await enqueue(app, "send", *sent)
    got = (await fetch(app, count=3))[b"entries"]
    await finish_done(app, *reversed(got))
    assert await stream_ids(app) == [m.id for m in sent[3:]]
    assert fetched_ids(await fetch(app, count=10)) == [m.id for m in sent[3:]]


async def test_a_batch_the_group_no_longer_held_is_deleted_entry_by_entry(app: App) -> None:
    """The group was lost and made again (at 0) after the worker read its entries: the
    acks find nothing pending, so nothing is trimmed on their word."""
    streams = app.client.keys.streams("default")
    await app.client.ensure_groups(streams)
    sent = [message() for _ in range(4)]
    await enqueue(app, "send", *sent)
    got = (await fetch(app, count=10))[b"entries"]
    r: Any = app.client.redis
    stream = app.client.keys.stream("default", 5)
    await r.xgroup_destroy(stream, GROUP)
    await app.client.ensure_groups(streams)
    await finish_done(app, got[1], got[2])
    assert await stream_ids(app) == [sent[0].id, sent[3].id]


async def test_a_finish_blanks_the_entry_fields_and_a_raw_resend_of_the_id_runs(app: App) -> None:
    """A plain finish blanks `_e`/`_st` in its HSET (no HDEL): nothing reads a finished task
    as holding a live entry, and the no-script recipe of docs/protocol.md, which writes the
    hash and XADDs without touching `_e`, runs the id again."""
    await app.client.ensure_groups(app.client.keys.streams("default"))
    m = message()
    await enqueue(app, "send", m)
    [entry] = (await fetch(app, count=10))[b"entries"]
    await finish_done(app, entry)
    r: Any = app.client.redis
    key = app.client.keys.task(m.id)
    h = await r.hgetall(key)
    assert h[b"state"] == b"SUCCESS" and h[b"result"] == b"\xc0"
    assert h[b"_e"] == b"" and h[b"_st"] == b""
    assert b"traceback" not in h  # a None field is left out, not stored
    stream = app.client.keys.stream("default", 5)
    assert await r.xrange(stream) == []
    # Sent again by hand, as a producer in another language may.
    await r.hset(key, mapping={"state": "PENDING", "name": m.name, "queue": "default"})
    await r.xadd(stream, {"v": "2", "id": m.id, "ct": "msgpack", "m": entry_fields(entry)[b"m"]})
    assert fetched_ids(await fetch(app, count=10)) == [m.id]
    assert await r.hget(key, "state") == b"STARTED"
