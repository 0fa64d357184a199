"""Serialization: rich values round-trip through a real task with msgpack and json,
compression of big bodies, and results that cannot be encoded."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from aiotasks import App, SerializationError, TaskFailed, TaskState, Worker

StartWorker = Callable[..., Awaitable[Worker]]

VALUES: dict[str, Any] = {
    "datetime-aware": datetime(
        2024, 5, 17, 13, 45, 30, 123456, tzinfo=timezone(timedelta(hours=2))
    ),
    "datetime-utc": datetime(2024, 5, 17, 11, 45, 30, tzinfo=UTC),
    "datetime-naive": datetime(2024, 5, 17, 13, 45, 30, 123456),
    "date": date(2024, 2, 29),
    "time": time(23, 59, 58, 999),
    "timedelta": timedelta(days=-3, seconds=7, microseconds=11),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("-12345.678900"),
    "bytes": b"\x00\xffbinary\x80",
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "str": "unicode: é ✓ 漢字",
    "int": 2**62,
    "float": 1.5,
    "none": None,
    "bool": True,
    "list": [1, "two", 3.0, None],
    "nested": {
        "when": datetime(2020, 1, 1, tzinfo=UTC),
        "ids": [uuid.UUID(int=1), uuid.UUID(int=2)],
        "deep": {"amounts": [Decimal("1.10"), Decimal("2.20")], "raw": b"\x01\x02"},
        "tags": {"x"},
        "spans": [timedelta(seconds=1), {"on": date(2021, 3, 4)}],
    },
}


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (True != 1, naive != aware)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, datetime):
        return bool(a == b and a.utcoffset() == b.utcoffset())
    return bool(a == b)


async def entry_content_types(app: App, queue: str = "default") -> list[str]:
    entries: Any = await app.client.redis.xrange(app.client.keys.stream(queue))
    return [fields[b"ct"].decode() for _, fields in entries]


@pytest.fixture
def json_app(make_app: Callable[..., App]) -> App:
    return make_app(serializer="json")


def register_echo(app: App) -> Any:
    @app.task(name="echo")
    async def echo(value: Any) -> dict[str, Any]:
        # The type seen inside the task proves the argument was decoded, not just relayed.
        return {"value": value, "type": type(value).__name__}

    return echo


@pytest.mark.parametrize("key", list(VALUES))
@pytest.mark.parametrize("mode", ["msgpack", "app-json", "send-json"])
async def test_value_round_trips_through_a_task(
    json_app: App, app: App, worker: StartWorker, key: str, mode: str
) -> None:
    value = VALUES[key]
    sender = json_app if mode == "app-json" else app
    echo = register_echo(sender)
    register_echo(app)
    if mode == "send-json":
        h = await echo.options(serializer="json").send(value)
    else:
        h = await echo.send(value)
    expected_ct = "msgpack" if mode == "msgpack" else "json"
    assert await entry_content_types(app) == [expected_ct]
    await worker()
    out = await h.result(timeout=5)
    assert out["type"] == type(value).__name__
    assert same(out["value"], value), f"{out['value']!r} != {value!r}"


async def test_kwargs_round_trip(app: App, worker: StartWorker) -> None:
    @app.task
    async def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    await worker()
    kwargs = {"when": VALUES["datetime-aware"], "id": VALUES["uuid"], "blob": VALUES["bytes"]}
    h = await echo_kwargs.send(**kwargs)
    assert same(await h.result(timeout=5), kwargs)


async def test_tuples_come_back_as_lists(app: App, worker: StartWorker) -> None:
    echo = register_echo(app)
    await worker()
    h = await echo.send((1, (2, 3)))
    out = await h.result(timeout=5)
    assert out == {"value": [1, [2, 3]], "type": "list"}


async def test_json_entry_payload_is_json(json_app: App) -> None:
    import json

    echo = register_echo(json_app)
    await echo.send({"a": 1})
    entries: Any = await json_app.client.redis.xrange(json_app.client.keys.stream("default"))
    (_, fields), *_ = entries
    assert fields[b"ct"] == b"json"
    json.loads(fields[b"m"])  # readable on the wire


# -- compression -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zlib", "lzma", "bz2"])
async def test_compressed_big_argument_round_trips(
    make_app: Callable[..., App], worker: StartWorker, compression: str
) -> None:
    app = make_app(compression=compression)
    echo = register_echo(app)
    big = {"text": "abc" * 2000, "when": VALUES["datetime-aware"], "blob": bytes(range(256)) * 8}
    h = await echo.send(big)
    assert await entry_content_types(app) == [f"msgpack+{compression}"]
    raw: Any = await app.client.redis.xrange(app.client.keys.stream("default"))
    assert len(raw[0][1][b"m"]) < 3000  # actually compressed
    await worker(app)
    out = await h.result(timeout=5)
    assert same(out["value"], big)


async def test_small_body_is_not_compressed(
    make_app: Callable[..., App], worker: StartWorker
) -> None:
    app = make_app(compression="zlib")
    echo = register_echo(app)
    h = await echo.send("small")
    assert await entry_content_types(app) == ["msgpack"]
    await worker(app)
    assert (await h.result(timeout=5))["value"] == "small"


async def test_compress_min_size_is_honoured(make_app: Callable[..., App]) -> None:
    app = make_app(compression="zlib", compress_min_size=10)
    echo = register_echo(app)
    await echo.send("x" * 100)
    assert await entry_content_types(app) == ["msgpack+zlib"]


async def test_per_send_compression_with_json(app: App, worker: StartWorker) -> None:
    echo = register_echo(app)
    big = [f"row {i}" for i in range(1000)]
    h = await echo.options(serializer="json", compression="zlib").send(big)
    assert await entry_content_types(app) == ["json+zlib"]
    await worker()
    assert (await h.result(timeout=5))["value"] == big


# -- failures ---------------------------------------------------------------------------


async def test_unencodable_result_ends_failure(app: App, worker: StartWorker) -> None:
    @app.task
    async def returns_object() -> Any:
        return object()

    await worker()
    h = await returns_object.send()
    with pytest.raises(TaskFailed) as caught:
        await h.result(timeout=5)
    assert caught.value.exc_type == "SerializationError"
    assert await h.state() == TaskState.FAILURE
    info = await h.info()
    assert info.exc_type == "SerializationError"
    assert info.result is None


async def test_unencodable_result_with_json(json_app: App, worker: StartWorker) -> None:
    @json_app.task
    async def returns_lambda() -> Any:
        return lambda: 1

    await worker(json_app)
    h = await returns_lambda.send()
    with pytest.raises(TaskFailed) as caught:
        await h.result(timeout=5)
    assert caught.value.exc_type == "SerializationError"


async def test_worker_goes_on_after_an_unencodable_result(app: App, worker: StartWorker) -> None:
    @app.task
    async def maybe_bad(bad: bool) -> Any:
        return object() if bad else "fine"

    await worker()
    bad = await maybe_bad.send(True)
    good = await maybe_bad.send(False)
    with pytest.raises(TaskFailed):
        await bad.result(timeout=5)
    assert await good.result(timeout=5) == "fine"


def test_unknown_serializer_is_refused(redis_url: str) -> None:
    with pytest.raises(SerializationError):
        App(redis_url=redis_url, serializer="pickle")
