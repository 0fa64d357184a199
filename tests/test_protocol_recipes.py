"""docs/protocol.md, followed step by step with raw Redis commands, against a real worker.

Nothing here uses aiotasks' encoder or client to produce: payloads and records are
built with the msgpack library as a producer in another language would, the scripts
are read from the package's lua/ folder as the document says, and results are read
with SUBSCRIBE + HGETALL. Only the worker is aiotasks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis

import aiotasks
from aiotasks import App, Worker

StartWorker = Callable[..., Awaitable[Worker]]
LUA = Path(aiotasks.__file__).parent / "lua"
FINAL = {b"SUCCESS", b"FAILURE", b"REVOKED"}


def pack(value: Any) -> bytes:
    """msgpack with str for every string, as the scripts' decoder wants (section 5)."""
    return msgpack.packb(value, use_bin_type=False)  # type: ignore[no-any-return]


def payload(name: str, args: list[Any], **extra: Any) -> bytes:
    return msgpack.packb({"name": name, "args": args, "kwargs": {}, **extra})  # type: ignore[no-any-return]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class Producer:
    """What docs/protocol.md tells a producer to do, with raw commands."""

    def __init__(self, r: aioredis.Redis, namespace: str) -> None:
        self.r = r
        self.P = "{" + namespace + "}:"
        self.G = self.P + "guard"  # protocol.md: KEYS[2], a key no one writes
        self.sha: dict[str, str] = {}

    async def load(self, name: str) -> str:
        if name not in self.sha:
            parts = ("_contract.lua", "_lib.lua", f"{name}.lua")
            source = "\n".join((LUA / p).read_text() for p in parts)
            self.sha[name] = await self.r.execute_command("SCRIPT", "LOAD", source)
        return self.sha[name]

    def record(self, task_id: str, name: str, args: list[Any], **extra: Any) -> dict[str, Any]:
        m = extra.pop("m", None) or payload(name, args)
        return {
            "v": 2,
            "id": task_id,
            "name": name,
            "queue": "default",
            "priority": 5,
            "m": m,
            "ct": "msgpack",
            "ttl": 86400,
            **extra,
        }

    async def enqueue(self, *records: dict[str, Any]) -> list[int]:
        sha = await self.load("enqueue")
        return await self.r.execute_command(  # type: ignore[no-any-return]
            "EVALSHA", sha, 2, self.P, self.G, now_ms(), "send", pack(list(records))
        )

    async def finish(self, ops: list[dict[str, Any]]) -> int:
        sha = await self.load("finish")
        return await self.r.execute_command(  # type: ignore[no-any-return]
            "EVALSHA", sha, 2, self.P, self.G, now_ms(), pack(ops)
        )

    async def revoke(self, task_id: str) -> bytes:
        sha = await self.load("revoke")
        return await self.r.execute_command(  # type: ignore[no-any-return]
            "EVALSHA", sha, 2, self.P, self.G, task_id, now_ms(), 86400
        )

    async def result(self, task_id: str, timeout: float = 10) -> dict[bytes, bytes]:
        """SUBSCRIBE done:<id> first, mark the task watched, then HGETALL; again on each
        final state message."""
        pubsub = self.r.pubsub()
        await pubsub.subscribe(f"{self.P}done:{task_id}")
        await self.r.hset(f"{self.P}t:{task_id}", "_w", 1)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    h: dict[bytes, bytes] = await self.r.hgetall(f"{self.P}t:{task_id}")
                    if h.get(b"state") in FINAL:
                        return h
                    while True:
                        msg = await pubsub.get_message(timeout=1.0)
                        if msg and msg["type"] == "message" and msg["data"] in FINAL:
                            break
                        if msg is None:
                            break  # re-read now and then: the doc's loop, bounded
        finally:
            await pubsub.aclose()


@pytest.fixture
async def producer(redis_url: str, namespace: str) -> AsyncIterator[Producer]:
    r = aioredis.Redis.from_url(redis_url)
    yield Producer(r, namespace)
    await r.aclose()


def recipe_tasks(app: App) -> None:
    """The tasks the recipes send by name."""

    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="report")
    async def report(err: dict[str, Any]) -> dict[str, Any]:
        return err

    @app.task(name="iso")
    async def iso(at: datetime) -> str:
        return at.isoformat()

    @app.task(name="slow")
    async def slow() -> str:
        await asyncio.sleep(0.5)
        return "slow"


@pytest.fixture
async def recipes_app(app: App, worker: StartWorker) -> App:
    recipe_tasks(app)
    await worker()
    return app


def value(h: dict[bytes, bytes]) -> Any:
    assert h[b"state"] == b"SUCCESS", h
    assert h[b"ct"] == b"msgpack"
    return msgpack.unpackb(h[b"result"])


async def test_plain_task_without_scripts(recipes_app: App, producer: Producer) -> None:
    P, task_id = producer.P, new_id()
    r = producer.r
    async with r.pipeline(transaction=True) as tx:
        tx.hset(
            f"{P}t:{task_id}",
            mapping={
                "state": "PENDING",
                "name": "add",
                "queue": "default",
                "enqueued_at": now_ms(),
            },
        )
        tx.pexpire(f"{P}t:{task_id}", 86_400_000)
        tx.xadd(
            f"{P}q:default:5", {"v": 2, "id": task_id, "ct": "msgpack", "m": payload("add", [2, 3])}
        )
        tx.sadd(f"{P}queues", "default")
        await tx.execute()
    assert value(await producer.result(task_id)) == 5


async def test_plain_task_deduplicated(recipes_app: App, producer: Producer) -> None:
    task_id = new_id()
    rec = producer.record(task_id, "slow", [])
    assert await producer.enqueue(rec) == [1]
    assert await producer.enqueue(rec) == [0]  # still live: nothing added
    assert value(await producer.result(task_id)) == "slow"
    entries = await producer.r.xlen(f"{producer.P}q:default:5")
    assert entries == 0


async def test_a_reply_channel_outside_the_namespace_is_ignored(producer: Producer) -> None:
    """protocol.md: `reply` is `P reply:<client id>`; another channel is not stored (on a
    Cluster its SPUBLISH would fail the worker's call)."""
    mine, theirs, later = new_id(), new_id(), new_id()
    await producer.enqueue(
        producer.record(mine, "add", [1, 1], reply=f"{producer.P}reply:abc"),
        producer.record(theirs, "add", [1, 1], reply="elsewhere:reply:abc"),
        producer.record(later, "add", [1, 1], reply="elsewhere", due=now_ms() + 60_000),
    )
    got = [await producer.r.hget(f"{producer.P}t:{i}", "reply") for i in (mine, theirs, later)]
    assert got == [f"{producer.P}reply:abc".encode(), None, None]


async def test_prioritised_task(recipes_app: App, producer: Producer) -> None:
    task_id = new_id()
    assert await producer.enqueue(producer.record(task_id, "add", [4, 5], priority=9)) == [1]
    assert value(await producer.result(task_id)) == 9


async def test_delayed_task(recipes_app: App, producer: Producer) -> None:
    task_id = new_id()
    due = now_ms() + 700
    assert await producer.enqueue(producer.record(task_id, "add", [1, 1], due=due)) == [1]
    h = await producer.r.hgetall(f"{producer.P}t:{task_id}")
    assert h[b"state"] == b"SCHEDULED"
    assert value(await producer.result(task_id)) == 2
    assert now_ms() >= due


async def test_a_fractional_delay_or_due_is_rounded_down_to_whole_ms(
    recipes_app: App, producer: Producer
) -> None:
    """A producer whose numbers are all doubles (JavaScript: Date.now() + s * 1000) may
    send a fraction of a ms: the task runs, and its record expires (a Node producer's
    trial found one stranded, SCHEDULED with no TTL, by a refusal halfway)."""
    by_delay, by_due = new_id(), new_id()
    assert await producer.enqueue(
        producer.record(by_delay, "add", [1, 2], delay=300.7),
        producer.record(by_due, "add", [3, 4], due=now_ms() + 300.25),
    ) == [1, 1]
    for task_id in (by_delay, by_due):
        eta = await producer.r.hget(f"{producer.P}t:{task_id}", "eta")
        assert eta is not None and eta.isdigit(), eta
    assert value(await producer.result(by_delay)) == 3
    assert value(await producer.result(by_due)) == 7
    for task_id in (by_delay, by_due):
        assert await producer.r.pttl(f"{producer.P}t:{task_id}") > 0


async def test_delayed_task_without_scripts(recipes_app: App, producer: Producer) -> None:
    P, task_id = producer.P, new_id()
    due = now_ms() + 300
    rec = producer.record(task_id, "add", [20, 1])
    r = producer.r
    async with r.pipeline(transaction=True) as tx:
        tx.hset(
            f"{P}t:{task_id}",
            mapping={
                "state": "SCHEDULED",
                "name": "add",
                "queue": "default",
                "enqueued_at": now_ms(),
                "eta": due,
                "_rec": pack(rec),
            },
        )
        tx.pexpire(f"{P}t:{task_id}", 86_400_000 + due - now_ms())
        tx.zadd(f"{P}delayed", {task_id: due})
        tx.sadd(f"{P}queues", "default")
        await tx.execute()
    assert value(await producer.result(task_id)) == 21


async def test_chain(recipes_app: App, producer: Producer) -> None:
    first, last = new_id(), new_id()
    link = [{"t": "sig", "id": last, "name": "add", "args": [3], "kwargs": {}, "opts": {}}]
    rec = producer.record(first, "add", [], m=payload("add", [1, 2], chain=link), tail=last)
    assert await producer.enqueue(rec) == [1]
    assert value(await producer.result(last)) == 6
    assert value(await producer.result(first)) == 3


async def test_a_msgpack_timestamp_is_a_datetime(recipes_app: App, producer: Producer) -> None:
    """msgpack's own timestamp (ext -1: what @msgpack/msgpack makes of a JS Date) is read
    as an aware UTC datetime, in arguments and as a canvas step's eta. It reached a task
    as a msgpack.Timestamp, and dead-lettered a chain whose step had it as its eta."""
    at = datetime(2026, 12, 7, 10, 30, 15, 250000, tzinfo=UTC)
    stamped = msgpack.packb({"name": "iso", "args": [at], "kwargs": {}}, datetime=True)
    first = new_id()
    assert await producer.enqueue(producer.record(first, "iso", [], m=stamped)) == [1]
    assert value(await producer.result(first)) == "2026-12-07T10:30:15.250000+00:00"

    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    step, last = new_id(), new_id()
    link = [
        {"t": "sig", "id": last, "name": "add", "args": [3], "kwargs": {}, "opts": {"eta": soon}}
    ]
    m = msgpack.packb({"name": "add", "args": [1, 2], "kwargs": {}, "chain": link}, datetime=True)
    assert await producer.enqueue(producer.record(step, "add", [], m=m, tail=last)) == [1]
    assert value(await producer.result(last)) == 6


def chord_ops(producer: Producer, cid: str, body: str, heads: list[str]) -> list[dict[str, Any]]:
    """A chord of `add(i + 1, i + 1)` headers and a `tsum` body, as finish.lua ops."""
    return [
        {
            "op": "chord",
            "id": cid,
            "ttl": 86400,
            "n": len(heads),
            "body": producer.record(body, "tsum", [], m=payload("tsum", [], chord_body=cid)),
        },
        *(
            {
                "op": "enqueue",
                "mode": "send",
                "task": producer.record(h, "add", [i + 1, i + 1], cid=cid, cix=i),
            }
            for i, h in enumerate(heads)
        ),
    ]


async def test_chord(recipes_app: App, producer: Producer) -> None:
    cid, body = new_id(), new_id()
    heads = [new_id(), new_id()]
    assert await producer.finish(chord_ops(producer, cid, body, heads)) == 3
    assert value(await producer.result(body)) == 6


async def test_chord_with_a_chain_as_a_header(recipes_app: App, producer: Producer) -> None:
    """Section 5: a header that is a chain is its first step's record, with cid, cix and
    tail on it and the other steps in its payload's chain; the chord hears from the
    chain's last step (not from its first)."""
    cid, body, first, last = new_id(), new_id(), new_id(), new_id()
    rest = [{"t": "sig", "id": last, "name": "add", "args": [10], "kwargs": {}, "opts": {}}]
    ops = chord_ops(producer, cid, body, [new_id()])  # header 0: add(1, 1)
    ops[0]["n"] = 2
    head = producer.record(
        first, "add", [], m=payload("add", [50, 50], chain=rest), cid=cid, cix=1, tail=last
    )
    ops.append({"op": "enqueue", "mode": "send", "task": head})
    assert await producer.finish(ops) == 3
    assert value(await producer.result(body)) == 2 + 110  # tsum([2, (50 + 50) + 10])
    assert value(await producer.result(first)) == 100


async def test_revoke(app: App, producer: Producer) -> None:
    # No worker yet: the task is queued, and the revoke deletes its entry.
    task_id = new_id()
    assert await producer.enqueue(producer.record(task_id, "add", [1, 2])) == [1]
    assert await producer.revoke(task_id) == b"PENDING"
    h = await producer.result(task_id)
    assert h[b"state"] == b"REVOKED"
    assert await producer.r.xlen(f"{producer.P}q:default:5") == 0


async def test_callback_and_errback(recipes_app: App, producer: Producer) -> None:
    ok, cb, bad, eb = new_id(), new_id(), new_id(), new_id()
    link = [{"t": "sig", "id": cb, "name": "add", "args": [100], "kwargs": {}, "opts": {}}]
    assert await producer.enqueue(
        producer.record(ok, "add", [], m=payload("add", [1, 2], link=link))
    ) == [1]
    assert value(await producer.result(cb)) == 103
    errback = producer.record(eb, "report", [], m=payload("report", []))
    assert await producer.enqueue(producer.record(bad, "add", ["x", 1], eb=[errback])) == [1]
    report = value(await producer.result(eb))
    assert report["task_id"] == bad and report["exc_type"] == "TypeError"


async def test_failure_is_readable(recipes_app: App, producer: Producer) -> None:
    task_id = new_id()
    assert await producer.enqueue(producer.record(task_id, "add", ["a", 1])) == [1]
    h = await producer.result(task_id)
    assert h[b"state"] == b"FAILURE"
    assert h[b"exc_type"] == b"TypeError"
    assert b"Traceback" in h[b"traceback"]


async def test_signed_task(make_app: Any, worker: StartWorker, producer: Producer) -> None:
    import hashlib
    import hmac

    signed_app = make_app(signing_key=b"k3y")

    @signed_app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    await worker(signed_app)
    task_id = new_id()
    rec = producer.record(task_id, "add", [2, 40])
    body = b"aiotasks/2\n" + b"".join(
        f.encode() + b"=" + (v if isinstance(v, bytes) else str(v).encode()) + b"\n"
        for f in ("v", "id", "ct", "m", "exp", "r", "cid", "cix", "tail")
        if (v := rec.get(f)) not in (None, "")
    )
    rec["sig"] = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert await producer.enqueue(rec) == [1]
    assert value(await producer.result(task_id)) == 42
    # The hex digits may be upper case (the document says only "hex").
    upper = producer.record(new_id(), "add", [2, 2])
    body = body.replace(task_id.encode(), upper["id"].encode()).replace(rec["m"], upper["m"])
    upper["sig"] = hmac.new(b"k3y", body, hashlib.sha256).hexdigest().upper()
    assert await producer.enqueue(upper) == [1]
    assert value(await producer.result(upper["id"])) == 4
    forged = producer.record(new_id(), "add", [1, 1], sig=rec["sig"])
    assert await producer.enqueue(forged) == [1]
    h = await producer.result(forged["id"])
    assert h[b"state"] == b"FAILURE" and h[b"exc_type"] == b"SignatureError"


def doc_shard_tag(namespace: str, k: int, n: int) -> str:
    """protocol.md "Shards", written from the text alone (CRC-16/XMODEM is binascii's
    crc_hqx with a 0 start; the slot is it mod 16384)."""
    import binascii

    def slot(s: str) -> int:
        return binascii.crc_hqx(s.encode(), 0) % 16384

    if k == 0:
        return namespace
    width = 16384 / n
    want = (int(slot(namespace) // width) + k) % n
    j = 0
    while True:
        tag = f"{namespace}#{k}" + (f".{j}" if j else "")
        if int(slot(tag) // width) == want:
            return tag
        j += 1


async def test_a_task_in_each_shard_of_a_sharded_namespace(
    make_app: Callable[..., App], worker: StartWorker, redis_url: str, namespace: str
) -> None:
    import zlib

    n = 3
    assert [doc_shard_tag("aiotasks", k, 3) for k in range(3)] == [
        "aiotasks",
        "aiotasks#1.3",
        "aiotasks#2",
    ]
    app = make_app(shards=n)
    recipe_tasks(app)
    await worker(app)
    r = aioredis.Redis.from_url(redis_url)
    try:
        for k in range(n):
            producer = Producer(r, namespace)
            producer.P = "{" + doc_shard_tag(namespace, k, n) + "}:"
            producer.G = producer.P + "guard"
            task_id = next(i for i in iter(new_id, None) if zlib.crc32(i.encode()) % n == k)
            assert await producer.enqueue(producer.record(task_id, "add", [k, 10])) == [1]
            assert value(await producer.result(task_id)) == k + 10
            # A chord: every id in the shard, one finish.lua call there (as test_chord).
            cid, body, *heads = [
                next(i for i in iter(new_id, None) if zlib.crc32(i.encode()) % n == k)
                for _ in range(4)
            ]
            ops = chord_ops(producer, cid, body, heads)
            assert await producer.finish(ops) == 3
            assert value(await producer.result(body)) == 6
        assert await app.client.recorded_shards() == n
    finally:
        await r.aclose()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"priority": 12}, "'priority' must be a whole number 0..9"),
        ({"priority": 2.5}, "'priority' must be a whole number 0..9"),
        ({"queue": "a,b"}, "'queue' must be a non-empty string"),
        ({"queue": " a"}, "'queue' must be a non-empty string"),
        ({"queue": ""}, "'queue' must be a non-empty string"),
        ({"queue": "a "}, "'queue' must be a non-empty string"),
        ({"queue": 5}, "'queue' must be a non-empty string"),
        ({"ttl": None}, "'ttl' must be a whole number of seconds >= 1"),
        ({"ttl": 1.5}, "'ttl' must be a whole number of seconds >= 1"),
        ({"id": 42}, "'id' must be a non-empty string"),
        ({"name": ""}, "'name' must be a non-empty string"),
        ({"m": [1, 2]}, "'m' must be a (str-typed) byte string"),
        ({"v": None}, "'v' must be 2"),
        ({"due": "soon"}, "'due' and 'delay' must be numbers of ms"),
        ({"delay": "1500"}, "'due' and 'delay' must be numbers of ms"),
        ({"due": float("inf")}, "'due' and 'delay' must be numbers of ms"),
        ({"delay": float("nan")}, "'due' and 'delay' must be numbers of ms"),
        ({"due": 1e20}, "'due' and 'delay' must be numbers of ms"),
        ({"eb": [{"id": "e"}]}, "errback 1: 'v' must be 2"),
    ],
)
async def test_a_record_outside_the_contract_is_refused_and_nothing_enqueued(
    producer: Producer, change: dict[str, Any], problem: str
) -> None:
    """protocol.md section 5: a record the contract does not allow (a priority no worker
    reads, a queue name with a comma, no ttl) fails the whole call with an error naming
    it; the good record beside it is not enqueued either."""
    good, bad = new_id(), new_id()
    record = {
        k: v for k, v in {**producer.record(bad, "add", [1, 2]), **change}.items() if v is not None
    }
    with pytest.raises(aioredis.ResponseError) as err:
        await producer.enqueue(producer.record(good, "add", [1, 1]), record)
    assert f"record 2: {problem}" in str(err.value)
    assert "nothing enqueued" in str(err.value)
    assert await producer.r.exists(f"{producer.P}t:{good}", f"{producer.P}t:{bad}") == 0
    assert [k async for k in producer.r.scan_iter(f"{producer.P}q:*")] == []


async def test_an_unknown_mode_is_refused(producer: Producer) -> None:
    sha = await producer.load("enqueue")
    task_id = new_id()
    with pytest.raises(aioredis.ResponseError, match="unknown mode 'bogus'"):
        await producer.r.execute_command(
            "EVALSHA",
            sha,
            2,
            producer.P,
            producer.G,
            now_ms(),
            "bogus",
            pack([producer.record(task_id, "add", [1, 1])]),
        )
    assert await producer.r.exists(f"{producer.P}t:{task_id}") == 0


async def test_a_chord_op_outside_the_contract_applies_no_op(producer: Producer) -> None:
    """finish.lua checks every op carrying records before applying any: a bad header
    record leaves no chord counter and no header enqueued."""
    chord_id, h1, h2 = new_id(), new_id(), new_id()
    body = producer.record(new_id(), "tsum", [])
    ops = [
        {"op": "chord", "id": chord_id, "ttl": 86400, "n": 2, "body": body},
        {
            "op": "enqueue",
            "mode": "send",
            "task": producer.record(h1, "add", [1, 1], cid=chord_id, cix=0),
        },
        {
            "op": "enqueue",
            "mode": "send",
            "task": producer.record(h2, "add", [1, 1], cid=chord_id, cix=1, priority=10),
        },
    ]
    with pytest.raises(
        aioredis.ResponseError, match=r"op 3 \(enqueue\): 'priority'.*no op applied"
    ):
        await producer.finish(ops)
    assert await producer.r.exists(f"{producer.P}chord:{chord_id}", f"{producer.P}t:{h1}") == 0
    bad_mode = [{"op": "enqueue", "mode": "later", "task": producer.record(h1, "add", [1, 1])}]
    with pytest.raises(aioredis.ResponseError, match="op 1 \\(enqueue\\): unknown mode 'later'"):
        await producer.finish(bad_mode)
    no_n = [{"op": "chord", "id": chord_id, "ttl": 86400, "n": 0, "body": body}]
    with pytest.raises(aioredis.ResponseError, match="a chord needs"):
        await producer.finish(no_n)


async def test_ops_that_are_not_ops_apply_none(producer: Producer) -> None:
    """An unknown op, a map without 'op' or a number among the ops fails the whole call,
    naming the problem, before any op is applied (the first op here would enqueue)."""
    task_id = new_id()
    first = {"op": "enqueue", "mode": "send", "task": producer.record(task_id, "add", [1, 1])}
    for bad, says in [
        ({"op": "frobnicate"}, r"op 2 \(frobnicate\): unknown op"),
        ({"id": new_id(), "state": "SUCCESS"}, r"op 2 \(nil\): unknown op"),
        (7, "the ops are not as the contract has them"),
    ]:
        with pytest.raises(aioredis.ResponseError, match=f"{says}.*no op applied"):
            await producer.finish([first, bad])
        assert await producer.r.exists(f"{producer.P}t:{task_id}") == 0
    # A map without 'op' whose 12th-next element is a number was walked as a flat done
    # op's head: the call then failed halfway, after the first op was applied.
    walked_over = [first, {"id": new_id()}, *["x"] * 10, 0]
    with pytest.raises(aioredis.ResponseError, match=r"op 2 \(nil\): unknown op.*no op applied"):
        await producer.finish(walked_over)
    assert await producer.r.exists(f"{producer.P}t:{task_id}") == 0
