"""Message signing: a worker with a key runs only messages signed with one of its keys."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import App, TaskFailed, TaskState, Worker, chain, chord

StartWorker = Callable[..., Awaitable[Worker]]
NAME = "tests.signing.echo"


def tasks(app: App, runs: list[Any]) -> dict[str, Any]:
    @app.task(name=NAME)
    async def echo(x: Any) -> Any:
        runs.append(x)
        return x

    @app.task(name="tests.signing.tsum")
    async def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(name="tests.signing.flaky", max_retries=1, autoretry_for=(ValueError,))
    async def flaky(x: int) -> int:
        runs.append(("flaky", x))
        if len([r for r in runs if r == ("flaky", x)]) < 2:
            raise ValueError("once")
        return x

    return {"echo": echo, "tsum": tsum, "flaky": flaky}


async def stream_entries(app: App) -> list[dict[bytes, bytes]]:
    entries = await app.client.redis.xrange(app.client.keys.stream("default", 5))
    return [f for _, f in entries]


async def test_a_signed_app_runs_its_messages_and_canvases(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    sender = make_app(signing_key=b"s3cret")
    consumer = make_app(signing_key=b"s3cret")
    runs: list[Any] = []
    t = tasks(sender, runs)
    tasks(consumer, runs)
    h = await t["echo"].send(1)
    (entry,) = await stream_entries(sender)
    assert len(entry[b"sig"]) == 64  # an HMAC-SHA256, hex
    await worker(consumer, concurrency=4)
    assert await h.result(timeout=10) == 1
    # What the worker sends on (chain steps, chord bodies, retries, delayed tasks) is
    # signed with its key too.
    ch = await chain(t["echo"].s(2), t["echo"].s()).send()
    assert await ch.result(timeout=10) == 2
    c = await chord([t["echo"].s(3), t["echo"].s(4)], t["tsum"].s()).send()
    assert await c.result(timeout=10) == 7
    assert await (await t["flaky"].send(5)).result(timeout=10) == 5
    later = await t["echo"].options(countdown=0.3).send(6)
    assert await later.result(timeout=10) == 6


@pytest.mark.parametrize("sender_key", [None, b"wrong"])
async def test_unsigned_or_wrongly_signed_messages_are_refused_unrun(
    make_app: Callable[..., App], worker: StartWorker, sender_key: bytes | None
) -> None:
    sender = make_app(signing_key=sender_key)
    consumer = make_app(signing_key=b"s3cret")
    runs: list[Any] = []
    t = tasks(sender, runs)
    tasks(consumer, runs)
    await worker(consumer)
    h = await t["echo"].send("payload")
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "SignatureError"
    entries = await consumer.client.redis.xrange(consumer.client.keys.dead("default"))
    assert len(entries) == 1 and entries[0][1][b"reason"].startswith(b"SignatureError: ")
    assert runs == []


async def test_a_forged_payload_is_refused(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    sender = make_app(signing_key=b"s3cret")
    consumer = make_app(signing_key=b"s3cret")
    runs: list[Any] = []
    t = tasks(sender, runs)
    tasks(consumer, runs)
    await t["echo"].send("harmless")
    (signed,) = await stream_entries(sender)
    # Someone with write access copies a signed entry and swaps its payload.
    other = sender.client.keys.stream("default", 5)
    r: Any = sender.client.redis
    await r.delete(other)
    forged_payload = (await t["echo"].s("evil").send()).id
    (evil,) = [f for f in await stream_entries(sender) if f[b"id"] == forged_payload.encode()]
    # A new task id (the signed one's record would make this entry stale and dropped),
    # the signed entry's signature, another payload.
    forged = {**signed, b"m": evil[b"m"], b"id": b"forged-1"}
    await r.delete(other)
    await r.xadd(other, forged)
    await worker(consumer)
    with pytest.raises(TaskFailed) as failed:
        await consumer.handle("forged-1").result(timeout=10)
    assert failed.value.exc_type == "SignatureError"
    assert runs == []


async def test_keys_rotate(make_app: Callable[..., App], worker: StartWorker) -> None:
    old_sender = make_app(signing_key=b"old")
    new_sender = make_app(signing_key=[b"new", b"old"])
    consumer = make_app(signing_key=[b"new", b"old"])
    runs: list[Any] = []
    for a in (old_sender, new_sender, consumer):
        tasks(a, runs)
    await worker(consumer)
    h_old = await old_sender.send_task(NAME, args=("from old",))
    h_new = await new_sender.send_task(NAME, args=("from new",))
    assert await h_old.result(timeout=10) == "from old"
    assert await h_new.result(timeout=10) == "from new"
    # Once the old key is dropped from workers, its messages are refused.
    strict = make_app(signing_key=b"new")
    tasks(strict, runs)
    await asyncio.sleep(0)
    for w_app in (strict,):
        await worker(w_app, queues=["strict"])
    h = await old_sender.send_task(NAME, args=("late",), queue="strict")
    with pytest.raises(TaskFailed) as failed:
        await h.result(timeout=10)
    assert failed.value.exc_type == "SignatureError"
    assert await h.state() == TaskState.FAILURE


def test_keys_never_show_in_settings() -> None:
    app = App(signing_key=b"very-secret-key")
    assert b"very-secret-key".decode() not in repr(app.settings)
    with pytest.raises(ValueError):
        App(signing_key=b"")
