"""Sending tasks: decorators, every send spelling, bulk sends, dedup and send errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiotasks import (
    App,
    BrokerConnectionError,
    BrokerRefusedError,
    SerializationError,
    Signature,
    Task,
    TaskHandle,
    TaskState,
    Worker,
    chain,
    current_task,
)
from aiotasks.message import check_options
from tests.helpers import count_enqueue_calls

StartWorker = Callable[..., Awaitable[Worker]]
UNREACHABLE = "redis://127.0.0.1:1/0"


async def xlen(app: App, queue: str = "default", priority: int = 5) -> int:
    return int(await app.client.redis.xlen(app.client.keys.stream(queue, priority)))


async def entry_ids(app: App, queue: str = "default", priority: int = 5) -> list[str]:
    """The task ids of a stream's entries, in stream order."""
    entries: Any = await app.client.redis.xrange(app.client.keys.stream(queue, priority))
    return [fields[b"id"].decode() for _, fields in entries]


async def namespace_keys(app: App) -> list[bytes]:
    """Every key of the app's namespace (a big SCAN COUNT: the server is shared and busy)."""
    redis, pattern = app.client.redis, app.client.keys.prefix + "*"
    return [k async for k in redis.scan_iter(match=pattern, count=10_000)]


# -- decorators --------------------------------------------------------------------------


async def test_bare_decorator_registers_under_module_qualname(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        """Adds."""
        return x + y

    assert isinstance(add, Task)
    assert add.name == f"{__name__}.{add.fn.__qualname__}"
    assert add.name.endswith("<locals>.add")
    assert app.tasks[add.name] is add
    assert add.__doc__ == "Adds."


async def test_decorator_with_options_sets_name_queue_and_priority(
    app: App, worker: StartWorker
) -> None:
    @app.task(name="mail.send", queue="high", priority=7, max_retries=2)
    async def send_mail(to: str) -> str:
        return f"sent to {to}"

    assert send_mail.name == "mail.send"
    assert app.tasks["mail.send"] is send_mail
    h = await send_mail.send("bob")
    assert await xlen(app, "high", 7) == 1
    assert await xlen(app, "default", 5) == 0
    await worker(queues=["high"])
    assert await h.result(timeout=5) == "sent to bob"


async def test_unknown_task_decorator_option_is_a_type_error(app: App) -> None:
    with pytest.raises(TypeError):

        @app.task(no_such_option=1)
        async def f() -> None: ...


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"priority": 11}, "priority"),
        ({"priority": -3}, "priority"),
        ({"priority": 5.5}, "priority"),
        ({"result_ttl": -5}, "result_ttl"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": "3"}, "max_retries"),
        ({"queue": ""}, "queue"),
        ({"queue": "a,b"}, "queue"),
        ({"queue": " mail"}, "queue"),
        ({"rate_limit": "fast"}, "rate_limit"),
    ],
)
def test_bad_task_options_are_refused_when_declared(
    app: App, options: dict[str, Any], match: str
) -> None:
    """What a send would refuse is refused at decoration, not left to strand every send
    (a priority of 11 went to a stream no worker reads)."""
    with pytest.raises(ValueError, match=match):

        @app.task(**options)
        async def t() -> None: ...


@pytest.mark.parametrize(
    ("given", "kept"), [(10, "10/s"), ("100", "100/s"), (2.5, "2.5/s"), ("5/m", "5/m"), (0, None)]
)
def test_a_bare_rate_limit_is_tasks_per_second_and_0_is_none(
    app: App, given: Any, kept: str | None
) -> None:
    @app.task(rate_limit=given)
    async def t() -> None: ...

    assert t.opts.rate_limit == kept


@pytest.mark.parametrize(
    "options",
    [
        {"result_ttl": 0},
        {"result_ttl": -1},
        {"compression": "snappy"},
        {"default_queue": ""},
        {"default_queue": "a,b"},
        {"task_routes": {"mail.*": "mail, high"}},
        {"visibility_timeout": float("inf")},
    ],
)
def test_bad_app_options_are_refused_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options)).removeprefix("default_")):
        App(namespace="refused", **options)


@pytest.mark.parametrize("queue", ["a,b", " mail", "mail "])
async def test_a_send_to_a_queue_no_worker_could_take_from_is_refused(app: App, queue: str) -> None:
    """A worker's queues are named without commas or surrounding spaces (`--queues a,b`):
    such a send would wait for ever, so it is refused, and nothing is enqueued."""

    @app.task
    async def t() -> None: ...

    with pytest.raises(ValueError, match="no commas, no surrounding spaces"):
        await t.s().set(queue=queue).send()
    with pytest.raises(ValueError, match="no commas, no surrounding spaces"):
        await app.send_task("t", queue=queue)
    with pytest.raises(ValueError, match="is not a queue name"):
        await app.schedules.add("s", t.s(), every=60, queue=queue)
    assert await app.schedules.list() == []
    assert await app.client.redis.keys(f"{app.client.keys.prefix}*") == []


def test_a_queue_name_is_checked_at_the_send_not_in_a_message_already_sent() -> None:
    """A canvas step a worker decodes goes where it was sent, whatever its queue's name
    (an older sender's, another language's, a worker given queues=[...] in Python may
    serve it): only a send being made is held to what `--queues` can name."""
    with pytest.raises(ValueError, match="no commas"):
        check_options({"queue": "a,b"})
    check_options({"queue": "a,b"}, sending=False)
    with pytest.raises(ValueError, match="queue"):
        check_options({"queue": ""}, sending=False)


async def test_each_app_has_its_own_registry(app: App, redis_url: str) -> None:
    other = App(redis_url=redis_url, namespace=app.settings.namespace + "-other")

    @app.task(name="only.here")
    async def f() -> None: ...

    assert "only.here" in app.tasks
    assert "only.here" not in other.tasks


# -- async and sync functions --------------------------------------------------------------


async def test_async_task_runs_on_the_worker_loop(app: App, worker: StartWorker) -> None:
    @app.task
    async def where() -> int:
        return threading.get_ident()

    await worker()
    h = await where.send()
    assert await h.result(timeout=5) == threading.get_ident()


async def test_plain_def_task_runs_in_a_thread(app: App, worker: StartWorker) -> None:
    @app.task
    def where(x: int) -> list[int]:
        return [x * 2, threading.get_ident()]

    await worker()
    h = await where.send(21)
    doubled, thread_id = await h.result(timeout=5)
    assert doubled == 42
    assert thread_id != threading.get_ident()


# -- send spellings -----------------------------------------------------------------------


async def test_send_returns_a_handle_and_queues_one_entry(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.send(2, 3)
    assert isinstance(h, TaskHandle)
    assert isinstance(h.id, str) and h.id
    assert await h.state() == TaskState.PENDING
    assert await entry_ids(app) == [h.id]
    await worker()
    assert await h.result(timeout=5) == 5


async def test_send_with_kwargs(app: App, worker: StartWorker) -> None:
    @app.task
    async def sub(x: int, y: int = 0) -> int:
        return x - y

    await worker()
    h = await sub.send(10, y=4)
    assert await h.result(timeout=5) == 6


async def test_options_send_applies_queue_and_priority(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    bound = add.options(queue="high", priority=9)
    h = await bound.send(2, 3)
    assert await entry_ids(app, "high", 9) == [h.id]
    assert await xlen(app) == 0
    await worker(queues=["high"])
    assert await h.result(timeout=5) == 5


async def test_options_countdown_schedules_the_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.options(countdown=30).send(2, 3)
    assert await h.state() == TaskState.SCHEDULED
    assert await xlen(app) == 0
    assert await app.client.redis.zscore(app.client.keys.delayed, h.id) is not None


async def test_apply_async_with_args_kwargs_and_countdown(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    sent = time.monotonic()
    h = await add.apply_async((2,), {"y": 3}, countdown=0.5)
    assert await h.state() == TaskState.SCHEDULED
    assert await h.result(timeout=5) == 5
    assert time.monotonic() - sent >= 0.45


async def test_apply_async_without_options_runs_now(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.apply_async((4, 5))
    assert await entry_ids(app) == [h.id]
    await worker()
    assert await h.result(timeout=5) == 9


async def test_signature_send_and_set(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    sig = add.s(2, 3)
    assert isinstance(sig, Signature)
    assert (sig.name, sig.args, sig.kwargs) == (add.name, (2, 3), {})
    plain = sig.clone()  # a copy: set() changes the signature itself, as Celery's
    high = sig.set(queue="high", priority=8)
    assert high is sig and high.options == {"queue": "high", "priority": 8}
    assert plain.options == {}

    h1 = await high.send()
    h2 = await plain.send(priority=1)
    assert await entry_ids(app, "high", 8) == [h1.id]
    assert await entry_ids(app, "default", 1) == [h2.id]
    await worker(queues=["high", "default"])
    assert await h1.result(timeout=5) == 5
    assert await h2.result(timeout=5) == 5


async def test_signature_with_kwargs(app: App, worker: StartWorker) -> None:
    @app.task
    async def sub(x: int, y: int = 0) -> int:
        return x - y

    await worker()
    h = await sub.s(10, y=3).send()
    assert await h.result(timeout=5) == 7


async def test_send_task_by_name(app: App, worker: StartWorker) -> None:
    @app.task(name="math.add")
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await app.send_task("math.add", args=(2,), kwargs={"y": 40})
    assert await h.result(timeout=5) == 42
    info = await h.info()
    assert info.name == "math.add"


async def test_send_task_by_name_unregistered_on_the_client(
    make_app: Callable[..., App], app: App, worker: StartWorker
) -> None:
    # The sender does not know the task; a worker App on the same namespace does.
    worker_app = make_app()

    @worker_app.task(name="remote.mul")
    async def mul(x: int, y: int) -> int:
        return x * y

    assert "remote.mul" not in app.tasks
    await worker(worker_app)
    h = await app.send_task("remote.mul", args=(6, 7))
    assert await h.result(timeout=5) == 42


async def test_app_handle_reads_any_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await worker()
    h = await add.send(1, 1)
    assert await app.handle(h.id).result(timeout=5) == 2
    assert app.handle(h.id) == h


# -- send_many ------------------------------------------------------------------------


async def test_send_many_is_one_round_trip_with_handles_in_order(
    app: App, worker: StartWorker
) -> None:
    @app.task
    async def add(x: int, y: int = 0) -> int:
        return x + y

    scripts = app.client.scripts
    calls: list[dict[str, Any]] = []
    original = scripts.enqueue

    async def counting(**kw: Any) -> list[int]:
        calls.append(kw)
        return await original(**kw)

    scripts.enqueue = counting  # type: ignore[method-assign]

    batch: list[tuple[tuple[int, ...], dict[str, int] | None]] = [
        ((1, 2), None),
        ((3,), {"y": 4}),
        ((), {"x": 5, "y": 6}),
        ((7,), None),
    ]
    handles = await add.send_many(batch)
    assert len(calls) == 1, "send_many must enqueue in one script call"
    assert len(handles) == 4
    assert len({h.id for h in handles}) == 4
    # Every entry landed, in the order of the calls.
    assert await entry_ids(app) == [h.id for h in handles]
    await worker()
    results = [await h.result(timeout=5) for h in handles]
    assert results == [3, 7, 11, 7]


async def test_send_many_with_options(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    handles = await add.send_many([((1, 1), None), ((2, 2), None)], queue="bulk", priority=2)
    assert await entry_ids(app, "bulk", 2) == [h.id for h in handles]


async def test_send_many_of_nothing_returns_nothing(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    assert await add.send_many([]) == []


# -- inline calls -----------------------------------------------------------------------


async def test_inline_call_needs_no_broker() -> None:
    offline = App(redis_url=UNREACHABLE, namespace="t-inline")

    @offline.task
    async def add(x: int, y: int) -> int:
        return x + y

    @offline.task
    def mul(x: int, y: int) -> int:
        return x * y

    @offline.task(name="whoami", max_retries=2)
    async def whoami() -> tuple[str, int, int, str]:
        ctx = current_task()  # a context of its own, as Celery gives a direct call
        await ctx.progress(done=1)  # stores nothing: there is no broker
        return ctx.name, ctx.attempt, ctx.max_retries, ctx.queue

    try:
        async with asyncio.timeout(2):
            assert await add(2, 3) == 5
            assert await mul(2, 3) == 6
            assert await add.s(1)(2) == 3
            assert await whoami() == ("whoami", 1, 2, "default")
    finally:
        await offline.close()
    with pytest.raises(RuntimeError):
        current_task()  # only inside the call


async def test_an_inline_call_hands_retry_and_replace_to_its_caller() -> None:
    """No worker acts on them: a unit test of the task asserts on them, as in Celery."""
    from aiotasks import Replace, Retry, chain

    offline = App(redis_url=UNREACHABLE, namespace="t-inline")

    @offline.task
    async def add(x: int, y: int) -> int:
        return x + y

    @offline.task
    async def again() -> None:
        raise current_task().retry(countdown=5)

    @offline.task
    async def become(x: int) -> None:
        raise current_task().replace(chain(add.s(x, 1), add.s(2)))

    try:
        async with asyncio.timeout(2):
            with pytest.raises(Retry) as retry:
                await again()
            assert retry.value.countdown == 5
            with pytest.raises(Replace) as replace:
                await become(3)
            assert replace.value.canvas == chain(add.s(3, 1), add.s(2))
    finally:
        await offline.close()


# -- send errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [object(), lambda: 1, {"nested": [object()]}], ids=["object", "lambda", "nested"]
)
async def test_unencodable_argument_raises_and_enqueues_nothing(app: App, bad: Any) -> None:
    @app.task
    async def echo(x: Any) -> Any:
        return x

    with pytest.raises(SerializationError):
        await echo.send(bad)
    with pytest.raises(SerializationError):
        await echo.send(x=bad)
    with pytest.raises(SerializationError):
        await echo.options(serializer="json").send(bad)
    assert await xlen(app) == 0
    assert await namespace_keys(app) == []


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def cyclic() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


#: Arguments a serializer cannot encode: (serializer, value), by what is wrong with them.
UNENCODABLE = {
    "msgpack-deep": ("msgpack", nested(100_000)),
    "json-deep": ("json", nested(100_000)),
    "msgpack-cyclic": ("msgpack", cyclic()),
    "json-cyclic": ("json", cyclic()),
    "msgpack-int-over-64-bits": ("msgpack", 2**64),
    "msgpack-int-under-64-bits": ("msgpack", -(2**63) - 1),
    "json-int-of-5000-digits": ("json", 10**5000),
    "json-nan": ("json", float("nan")),
    "json-infinity": ("json", float("-inf")),
    "json-tuple-key": ("json", {(1, 2): 3}),
    "msgpack-lone-surrogate": ("msgpack", "\ud800"),
}


@pytest.mark.parametrize("case", list(UNENCODABLE))
async def test_what_a_serializer_cannot_encode_raises_serialization_error(
    app: App, case: str
) -> None:
    """Whatever the serializer and the way of sending: SerializationError (never a
    RecursionError, OverflowError or ValueError of its own), and nothing is enqueued."""
    serializer, bad = UNENCODABLE[case]

    @app.task(name="echo", serializer=serializer)
    async def echo(x: Any) -> Any:
        return x

    sends = [
        lambda: echo.send(bad),
        lambda: echo.send(x=bad),
        lambda: echo.send_many([((1,), None), ((bad,), None)]),
        lambda: echo.s(bad).send(),
        lambda: app.send_task("echo", args=(bad,), serializer=serializer),
        lambda: chain(echo.s(1), echo.si(bad)).send(),
    ]
    for send in sends:
        with pytest.raises(SerializationError) as err:
            await send()
        assert type(err.value) is SerializationError
    assert await namespace_keys(app) == []


async def test_unencodable_argument_in_a_batch_enqueues_nothing(app: App) -> None:
    @app.task
    async def echo(x: Any) -> Any:
        return x

    with pytest.raises(SerializationError):
        await echo.send_many([((1,), None), ((object(),), None), ((3,), None)])
    assert await xlen(app) == 0
    assert await namespace_keys(app) == []


async def test_serialization_error_is_an_aiotasks_error(app: App) -> None:
    from aiotasks import AiotasksError

    @app.task
    async def echo(x: Any) -> Any:
        return x

    with pytest.raises(AiotasksError):
        await echo.send(object())


async def test_send_to_unreachable_redis_raises_broker_connection_error() -> None:
    offline = App(redis_url=UNREACHABLE, namespace="t-offline")

    @offline.task
    async def add(x: int, y: int) -> int:
        return x + y

    started = time.monotonic()
    try:
        with pytest.raises(BrokerConnectionError) as info:
            async with asyncio.timeout(10):
                await add.send(1, 2)
    finally:
        await offline.close()
    assert time.monotonic() - started < 5
    assert isinstance(info.value, ConnectionError)


async def test_send_to_unreachable_redis_honours_retry_policy() -> None:
    offline = App(redis_url=UNREACHABLE, namespace="t-offline")

    @offline.task
    async def add(x: int, y: int) -> int:
        return x + y

    policy = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0, "interval_max": 0.2}
    started = time.monotonic()
    try:
        with pytest.raises(BrokerConnectionError):
            async with asyncio.timeout(10):
                await add.apply_async((1, 2), retry_policy=policy)
    finally:
        await offline.close()
    elapsed = time.monotonic() - started
    # Two retries, 0.2 s apart: at least 0.4 s, and bounded.
    assert 0.35 <= elapsed < 5


# -- task_id dedup ------------------------------------------------------------------------


async def test_sending_a_queued_task_id_again_returns_the_same_handle(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h1 = await add.options(task_id="order-42").send(1, 2)
    h2 = await add.options(task_id="order-42").send(100, 200)
    h3 = await add.apply_async((5, 5), task_id="order-42")
    assert h1.id == h2.id == h3.id == "order-42"
    assert h1 == h2
    assert await entry_ids(app) == ["order-42"]


async def test_dedup_keeps_the_first_arguments(app: App, worker: StartWorker) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    await add.options(task_id="dup").send(1, 2)
    await add.options(task_id="dup").send(100, 200)
    await worker()
    assert await app.handle("dup").result(timeout=5) == 3


async def test_sending_a_scheduled_task_id_again_enqueues_nothing(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h1 = await add.options(task_id="later", countdown=30).send(1, 2)
    h2 = await add.options(task_id="later").send(1, 2)
    assert h1 == h2
    assert await xlen(app) == 0
    assert await h1.state() == TaskState.SCHEDULED


async def test_send_task_by_name_dedups_too(app: App) -> None:
    h1 = await app.send_task("some.task", args=(1,), task_id="by-name")
    h2 = await app.send_task("some.task", args=(2,), task_id="by-name")
    assert h1 == h2
    assert await entry_ids(app) == ["by-name"]


# -- option validation ------------------------------------------------------------------


async def test_unknown_send_option_is_a_type_error(app: App) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError):
        await add.apply_async((1, 2), no_such_option=True)
    with pytest.raises(TypeError):
        add.options(no_such_option=True)
    with pytest.raises(TypeError):
        add.s(1, 2).set(no_such_option=True)
    with pytest.raises(TypeError):
        await app.send_task(add.name, args=(1, 2), no_such_option=True)
    assert await namespace_keys(app) == []


@pytest.mark.parametrize("priority", [-1, 10, 100, 2.5, "5"])
async def test_priority_out_of_range_is_a_value_error(app: App, priority: Any) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(ValueError):
        await add.apply_async((1, 2), priority=priority)
    with pytest.raises(ValueError):
        add.options(priority=priority)
    assert await namespace_keys(app) == []


@pytest.mark.parametrize("priority", [0, 9])
async def test_priority_bounds_are_accepted(app: App, priority: int) -> None:
    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    h = await add.apply_async((1, 2), priority=priority)
    assert await entry_ids(app, "default", priority) == [h.id]


# -- automatic batching ------------------------------------------------------------------


async def test_concurrent_sends_go_out_as_one_script_call(app: App, worker: StartWorker) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    sizes = count_enqueue_calls(app)
    handles = await asyncio.gather(*(double.send(i) for i in range(100)))
    assert sizes == [100], "100 sends of one loop turn must be one enqueue.lua call"
    assert len({h.id for h in handles}) == 100
    assert sorted(await entry_ids(app)) == sorted(h.id for h in handles)
    await worker()
    assert [await h.result(timeout=10) for h in handles] == [2 * i for i in range(100)]


async def test_a_lone_send_is_not_delayed_into_a_later_batch(app: App) -> None:
    @app.task
    async def noop() -> None:
        return None

    sizes = count_enqueue_calls(app)
    for _ in range(3):
        await noop.send()
    assert sizes == [1, 1, 1]


async def test_a_refused_record_fails_only_its_own_sender(app: App) -> None:
    @app.task
    async def noop() -> None:
        return None

    sends = app.client._connect().sends
    # A record enqueue.lua cannot take (no queue): Redis refuses the script call.
    bad = sends.enqueue([{"id": "broken", "v": 1}], app.settings.retry_policy)
    good = [noop.send() for _ in range(5)]
    out = await asyncio.gather(bad, *good, return_exceptions=True)
    assert isinstance(out[0], BrokerRefusedError)
    handles = out[1:]
    assert all(isinstance(h, TaskHandle) for h in handles)
    assert sorted(await entry_ids(app)) == sorted(h.id for h in handles)  # type: ignore[union-attr]


async def test_concurrent_sends_of_one_id_enqueue_it_once(app: App) -> None:
    @app.task
    async def noop() -> None:
        return None

    handles = await asyncio.gather(*(noop.apply_async(task_id="same-id") for _ in range(10)))
    assert {h.id for h in handles} == {"same-id"}
    assert await entry_ids(app) == ["same-id"]


async def test_a_cancelled_sender_does_not_break_the_batch(app: App) -> None:
    @app.task
    async def noop() -> None:
        return None

    doomed = asyncio.ensure_future(noop.send())
    others = [asyncio.ensure_future(noop.send()) for _ in range(3)]
    await asyncio.sleep(0)
    doomed.cancel()
    handles = await asyncio.gather(*others)
    assert len({h.id for h in handles}) == 3
    assert set(h.id for h in handles) <= set(await entry_ids(app))
