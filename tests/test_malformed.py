"""Malformed entries are dead-lettered on their first delivery and never run; failures of
aiotasks' own code around a run are recorded once, never redelivered.

Entries are written with raw XADD, as a producer in another language (or an attacker
with write access to the keys) would, against a real worker.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from aiotasks import App, TaskFailed, TaskState, Worker
from aiotasks.admin import Admin
from aiotasks.contract import PROTOCOL
from tests.helpers import wait_until

StartWorker = Callable[..., Awaitable[Worker]]
NAME = "tests.malformed.probe"


def encode(payload: Any, serializer: str) -> bytes:
    if serializer == "json":
        import json

        return json.dumps(payload).encode()
    return msgpack.packb(payload, use_bin_type=True)  # type: ignore[no-any-return]


def good_payload() -> dict[str, Any]:
    return {"name": NAME, "args": [1], "kwargs": {}}


async def xadd(app: App, fields: dict[str, Any]) -> str:
    """Put an entry on the default queue as a raw producer would (protocol.md's plain-task
    recipe: the hash first, in one MULTI with the entry); its task id."""
    task_id = str(fields.get("id") or uuid.uuid4().hex)
    stream = app.client.keys.stream("default", 5)
    tkey = app.client.keys.task(task_id)
    r: Any = app.client.redis
    async with r.pipeline(transaction=True) as pipe:
        pipe.hset(tkey, mapping={"state": "PENDING", "name": NAME, "queue": "default"})
        pipe.expire(tkey, 300)
        pipe.xadd(stream, {"id": task_id, **fields})
        await pipe.execute()
    return task_id


def probe(app: App) -> list[int]:
    runs: list[int] = []

    @app.task(name=NAME)
    async def _probe(x: int) -> int:
        runs.append(x)
        return x

    return runs


async def queue_drained(app: App) -> bool:
    r: Any = app.client.redis
    stream = app.client.keys.stream("default", 5)
    if await r.xlen(stream):
        return False
    return (await r.xpending(stream, "workers"))["pending"] == 0


async def dead_reasons(app: App) -> list[str]:
    entries = await app.client.redis.xrange(app.client.keys.dead("default"))
    return [f[b"reason"].decode() for _, f in entries]


def zlib_bomb(size: int) -> bytes:
    # A payload map whose one string inflates to `size` bytes.
    inner = msgpack.packb({"name": NAME, "args": ["x" * size], "kwargs": {}})
    return zlib.compress(inner, 9)


def entry_cases(serializer: str) -> dict[str, dict[str, Any]]:
    v, ct = str(PROTOCOL), serializer

    def with_payload(**changes: Any) -> dict[str, Any]:
        return {"v": v, "ct": ct, "m": encode({**good_payload(), **changes}, serializer)}

    raw: dict[str, dict[str, Any]] = {}
    if serializer == "msgpack":
        ext = msgpack.packb({**good_payload(), "args": [msgpack.ExtType(99, b"zz")]})
        deep = b"\x91" * 100_000 + b"\xc0"  # arrays nested past what msgpack unpacks
        raw = {
            "unregistered ext type": {"v": v, "ct": ct, "m": ext},
            "nested too deep": {"v": v, "ct": ct, "m": deep},
        }
    else:
        # Python's json reads NaN, Infinity and 1e999 (inf), which are not JSON: the task
        # ran, then failed on its own result.
        raw = {
            f"{what.decode()} in the arguments": {
                "v": v,
                "ct": ct,
                "m": b'{"name": "%s", "args": [%s], "kwargs": {}}' % (NAME.encode(), what),
            }
            for what in (b"NaN", b"1e999")
        }
    return raw | {
        "chord id without index": {**with_payload(), "cid": "c1"},
        "chord index not a number": {**with_payload(), "cid": "c1", "cix": "abc"},
        "link not canvas nodes": with_payload(link=[1]),
        "link signature missing fields": with_payload(link=[{"t": "sig", "name": NAME}]),
        "link unknown node type": with_payload(link=[{"t": "lasagne"}]),
        "opts not a map": with_payload(opts=[1]),
        "soft_timeout not a number": with_payload(opts={"soft_timeout": "abc"}),
        "hard_timeout negative": with_payload(opts={"hard_timeout": -1}),
        "soft_timeout over hard_timeout": with_payload(opts={"soft_timeout": 5, "hard_timeout": 1}),
        "unknown option": with_payload(opts={"run_as_root": True}),
        "args not an array": with_payload(args="not-a-list"),
        "no task name": {"v": v, "ct": ct, "m": encode({"args": [1]}, serializer)},
        "task name a number": with_payload(name=42),
        "empty content type": {**with_payload(), "ct": ""},
        "payload not a map": {"v": v, "ct": ct, "m": encode([1, 2, 3], serializer)},
        "unknown content type": {**with_payload(), "ct": "pickle"},
        "unknown protocol version": {**with_payload(), "v": "99"},
        "no protocol version": {"ct": ct, "m": encode(good_payload(), serializer)},
        "retries not a number": {**with_payload(), "r": "many"},
        "chord index out of range": {**with_payload(), "cid": "c1", "cix": str(10**30)},
        # json carries any integer; msgpack at most 64 bits: both far past ten years
        "result_ttl out of range": with_payload(
            opts={"result_ttl": 10**25 if serializer == "json" else 2**63}
        ),
        "link option not a number": with_payload(
            link=[
                {
                    "t": "sig",
                    "id": "x",
                    "name": NAME,
                    "args": [],
                    "kwargs": {},
                    "opts": {"countdown": "abc"},
                }
            ]
        ),
        "link is a map": with_payload(link={}),
        "chain step is a group": with_payload(chain=[{"t": "group", "tasks": []}]),
        "chain is empty chain node": with_payload(chain=[{"t": "chain", "steps": []}]),
        "errback not a signature": with_payload(
            link=[
                {
                    "t": "sig",
                    "id": "x",
                    "name": NAME,
                    "args": [],
                    "kwargs": {},
                    "opts": {},
                    "link_error": [{"t": "group", "tasks": []}],
                }
            ]
        ),
    }


CASES = [(s, name) for s in ("msgpack", "json") for name in entry_cases(s)]


@pytest.mark.parametrize(("serializer", "case"), CASES, ids=[f"{s}-{c}" for s, c in CASES])
async def test_malformed_entry_is_dead_lettered_once_and_never_runs(
    app: App, worker: StartWorker, serializer: str, case: str
) -> None:
    runs = probe(app)
    await worker()
    task_id = await xadd(app, entry_cases(serializer)[case])
    h = app.handle(task_id)
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "DecodeError", failed.value
    await wait_until(lambda: queue_drained(app), 5, "the entry acked and deleted")
    reasons = await dead_reasons(app)
    assert len(reasons) == 1 and reasons[0].startswith("DecodeError: "), reasons
    if case == "unknown protocol version":
        assert "'99'" in reasons[0]
    if case == "task name a number":
        assert "'name' must be a non-empty string, got 42" in reasons[0]
    if case == "empty content type":
        assert "'ct' is empty" in reasons[0]
    if case == "unregistered ext type":
        assert "extension type 99 is not registered" in reasons[0]
    assert not reasons[0].rstrip().endswith(":"), reasons  # a reason, not an empty one
    # What `aiotasks inspect` and its dashboard page show of it: from its dead letter,
    # arguments or why there are none (a payload typed anyhow raised TypeError there).
    shown = await Admin(app).arguments(task_id)
    assert shown is not None and shown.where == "dead letter", shown
    assert shown.error is not None or shown.args == [1], shown
    # A well-formed task still runs after it, and the malformed one never did.
    ok = await (await app.send_task(NAME, args=(7,))).result(timeout=10)
    assert ok == 7 and runs == [7]
    assert (await h.info()).attempts in (0, 1)


async def test_an_oversized_body_is_dead_lettered(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    app = make_app(max_message_size=4096)
    runs = probe(app)
    await worker(app)
    payload = {**good_payload(), "args": ["x" * 10_000]}
    task_id = await xadd(app, {"v": str(PROTOCOL), "ct": "msgpack", "m": encode(payload, "")})
    with pytest.raises(TaskFailed) as failed:
        await app.handle(task_id).result(timeout=10)
    assert failed.value.exc_type == "DecodeError"
    assert "max_message_size" in failed.value.exc_message
    assert runs == []


@pytest.mark.parametrize("compression", ["zlib", "bz2", "lzma"])
async def test_an_over_compressed_body_is_dead_lettered_without_inflating_it(
    make_app: Callable[..., App], worker: StartWorker, compression: str
) -> None:
    import bz2
    import lzma

    app = make_app(max_message_size=1024 * 1024)
    runs = probe(app)
    await worker(app)
    inner = msgpack.packb({"name": NAME, "args": ["x" * (50 * 1024 * 1024)], "kwargs": {}})
    squeeze = {"zlib": zlib.compress, "bz2": bz2.compress, "lzma": lzma.compress}[compression]
    body = squeeze(inner)
    assert len(body) < 1024 * 1024  # small on the wire, 50 MB inflated
    task_id = await xadd(app, {"v": str(PROTOCOL), "ct": f"msgpack+{compression}", "m": body})
    with pytest.raises(TaskFailed) as failed:
        await app.handle(task_id).result(timeout=20)
    assert failed.value.exc_type == "DecodeError"
    assert "max_message_size" in failed.value.exc_message
    assert runs == []


async def test_send_refuses_a_body_over_max_message_size(make_app: Callable[..., App]) -> None:
    from aiotasks import SerializationError

    app = make_app(max_message_size=1000)
    probe(app)
    with pytest.raises(SerializationError, match="max_message_size"):
        await app.send_task(NAME, args=("x" * 5000,))
    assert await app.client.redis.xlen(app.client.keys.stream("default", 5)) == 0


# -- results that cannot be stored ------------------------------------------------------


@pytest.mark.parametrize("serializer", ["msgpack", "json"])
async def test_an_unencodable_result_fails_once(
    make_app: Callable[..., App], worker: StartWorker, serializer: str
) -> None:
    app = make_app(serializer=serializer)
    runs: list[int] = []

    @app.task
    async def unencodable() -> Any:
        runs.append(1)
        if serializer == "json":
            deep: list[Any] = []
            for _ in range(100_000):  # too deep for the json encoder: RecursionError
                deep = [deep]
            return deep
        return object()

    await worker(app)
    h = await unencodable.send()
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "SerializationError"
    await asyncio.sleep(0.5)
    assert runs == [1]
    assert await h.state() == TaskState.FAILURE
    assert await queue_drained(app)


async def test_an_internal_error_after_decoding_is_recorded_once(
    app: App, worker: StartWorker
) -> None:
    runs: list[Any] = []

    @app.task
    async def body(results: list[Any]) -> None:
        runs.append(results)

    await worker()
    # A chord body whose header results were corrupted in Redis: reading them fails
    # inside aiotasks, after the entry was decoded.
    cid = uuid.uuid4().hex
    await app.client.redis.hset(app.client.keys.chord_results(cid), "0", b"garbage")
    payload = {"name": body.name, "args": [], "kwargs": {}, "chord_body": cid}
    task_id = await xadd(
        app, {"v": str(PROTOCOL), "ct": "msgpack", "m": encode(payload, "msgpack")}
    )
    with pytest.raises(TaskFailed) as failed:
        await app.handle(task_id).result(timeout=10)
    assert failed.value.exc_type == "InternalError"
    await asyncio.sleep(0.3)
    assert runs == []
    assert await queue_drained(app)
    assert await dead_reasons(app) == []


async def test_a_scheduled_task_without_a_readable_record_fails_loudly(
    app: App, worker: StartWorker
) -> None:
    # As aiotasks 0.1 left a delayed task: no _rec. It must not vanish silently.
    task_id = uuid.uuid4().hex
    r: Any = app.client.redis
    await r.hset(
        app.client.keys.task(task_id),
        mapping={"state": "SCHEDULED", "name": NAME, "queue": "default", "_m": b"old"},
    )
    await r.zadd(app.client.keys.delayed, {task_id: 0})
    probe(app)
    await worker()
    with pytest.raises(TaskFailed) as failed:
        await app.handle(task_id).result(timeout=10)
    assert failed.value.exc_type == "DecodeError"
    assert await r.zcard(app.client.keys.delayed) == 0
    # A dead letter of its queue says so, with the task's id; requeuing it moves nothing
    # (there is no payload to run).
    from aiotasks.admin import Admin

    admin = Admin(app)
    (dead,) = await admin.dead_letters("default")
    assert dead.task_id == task_id and "no readable record" in dead.reason
    assert await admin.requeue_dead("default") == 0
    assert len(await admin.dead_letters("default")) == 1
    from aiotasks.admin import CannotRetry

    with pytest.raises(CannotRetry, match="holds no message to run"):
        await admin.retry(task_id)
    found = await admin.arguments(task_id)
    assert found is not None and found.where == "dead letter"
    assert found.error is not None and "holds no message" in found.error
    assert "no readable record" in found.error


async def test_a_body_that_raises_cancelled_error_itself_fails_once(
    app: App, worker: StartWorker
) -> None:
    runs: list[int] = []

    @app.task
    async def cancels_itself() -> None:
        runs.append(1)
        raise asyncio.CancelledError

    await worker()
    h = await cancels_itself.send()
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "CancelledError"
    await asyncio.sleep(0.3)
    assert runs == [1]
    assert await queue_drained(app)


async def test_an_outcome_redis_refuses_still_settles_the_chord(
    app: App, worker: StartWorker
) -> None:
    from aiotasks import ChordError, chord

    @app.task
    async def header(i: int) -> int:
        await asyncio.sleep(0.5)
        return i

    @app.task
    async def body(results: list[int]) -> int:
        return sum(results)

    probe(app)
    await worker(concurrency=4)
    h = await chord([header.s(1), header.s(2)], body.s()).send()
    r: Any = app.client.redis
    (chord_key,) = [k async for k in r.scan_iter(match=app.client.keys.chord("*"))]
    cid = chord_key.decode().rsplit(":", 1)[1]
    # The header results hash has the wrong type: Redis refuses to store a result in it.
    await r.set(app.client.keys.chord_results(cid), "not a hash")
    with pytest.raises(ChordError) as failed:
        await h.result(timeout=10)
    assert "InternalError" in failed.value.exc_message
    assert await queue_drained(app)
    assert (await (await app.send_task(NAME, args=(3,))).result(timeout=10)) == 3


async def test_send_options_are_normalized_so_workers_accept_them(
    app: App, worker: StartWorker
) -> None:
    probe(app)
    await worker()
    h = await app.send_task(NAME, args=(5,), result_ttl=3600.0, max_retries=2.0, ignore_result=1)
    assert await h.result(timeout=10) is None  # ran, ignore_result kept no value
    assert await h.state() == TaskState.SUCCESS


async def test_send_refuses_bad_option_values(app: App) -> None:
    for bad in (
        {"priority": True},
        {"priority": 10},
        {"countdown": "soon"},
        {"max_retries": -1},
        {"result_ttl": 1.5},
        {"serializer": "pickle"},
        {"queue": ""},
    ):
        with pytest.raises(ValueError):
            await app.send_task(NAME, args=(1,), **bad)


async def test_send_refuses_a_compressed_body_over_max_message_size(
    make_app: Callable[..., App],
) -> None:
    from aiotasks import SerializationError

    app = make_app(compression="zlib", max_message_size=1024 * 1024)
    # Compresses to almost nothing, but a worker would have to inflate 2 MiB.
    with pytest.raises(SerializationError, match="max_message_size"):
        await app.send_task(NAME, args=("x" * (2 * 1024 * 1024),))


async def test_a_dead_letter_with_a_newline_in_its_id_is_logged_on_one_line(
    app: App, worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    await worker()
    task_id = await xadd(app, {"id": "c-nl\nforged line", "v": str(PROTOCOL), "ct": "pickle"})
    with pytest.raises(TaskFailed):
        await app.handle(task_id).result(timeout=10)
    [line] = [r.getMessage() for r in caplog.records if "dead-lettering" in r.getMessage()]
    assert "\n" not in line and "'c-nl\\nforged line'" in line, line
