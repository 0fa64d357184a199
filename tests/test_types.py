"""Types a user passes: dataclasses, pydantic models and Enums rebuilt from annotations,
types taught with `register_type`, and the hint `SerializationError` gives for the rest."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from aiotasks import (
    App,
    SerializationError,
    TaskFailed,
    TaskState,
    Worker,
    codec,
    register_type,
    usertypes,
)
from aiotasks.adapt import adapter_for

StartWorker = Callable[..., Awaitable[Worker]]
SERIALIZERS = ["msgpack", "json"]


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Shape:
    name: str
    corners: list[Point]
    center: Point | None = None
    tags: dict[str, Point] = dataclasses.field(default_factory=dict)


@dataclass
class Tree:
    value: int
    children: list[Tree] = dataclasses.field(default_factory=list)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


try:
    import pydantic
except ImportError:  # the models below need it; their test is skipped without it
    pydantic = None
else:

    class Item(pydantic.BaseModel):
        sku: str
        price: Decimal

    class Order(pydantic.BaseModel):
        items: list[Item]
        note: str | None = None


class Money:
    """A type of the user's own, taught to the serializers with register_type."""

    def __init__(self, amount: Decimal, currency: str) -> None:
        self.amount, self.currency = amount, currency

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (other.amount, other.currency) == (
            self.amount,
            self.currency,
        )

    def __hash__(self) -> int:
        return hash((self.amount, self.currency))


@pytest.fixture
def money() -> Iterator[None]:
    """Money registered for the test only."""
    register_type(
        Money,
        encode=lambda m: [str(m.amount), m.currency],
        decode=lambda v: Money(Decimal(v[0]), v[1]),
        name="test.money",
    )
    yield
    usertypes._unregister(usertypes._by_name["test.money"])


def make_app(redis_url: str, namespace: str, serializer: str) -> App:
    return App(redis_url=redis_url, namespace=namespace, serializer=serializer)


# -- dataclasses, models and enums through a real worker -------------------------------


@pytest.mark.parametrize("serializer", SERIALIZERS)
async def test_dataclass_arguments_and_result_are_rebuilt(
    redis_url: str, namespace: str, worker: StartWorker, serializer: str
) -> None:
    app = make_app(redis_url, namespace, serializer)
    seen: list[Any] = []

    @app.task
    async def grow(shape: Shape, by: int, color: Color) -> Shape:
        seen.append((shape, color))
        corners = [Point(p.x * by, p.y * by) for p in shape.corners]
        return dataclasses.replace(shape, corners=corners, name=f"{shape.name}-{color.value}")

    try:
        await worker(app)
        sent = Shape("sq", [Point(0, 0), Point(1, 2)], Point(1, 1), {"a": Point(3, 4)})
        h = await grow.send(sent, 2, Color.RED)
        got = await h.result(timeout=10)
        assert got == Shape("sq-red", [Point(0, 0), Point(2, 4)], Point(1, 1), {"a": Point(3, 4)})
        assert seen == [(sent, Color.RED)]  # the worker got a Shape of Points, and a Color
        # Read without the task (a handle by id, info()): the fields as plain data.
        plain = await app.handle(h.id).result(timeout=5)
        assert plain["corners"] == [{"x": 0, "y": 0}, {"x": 2, "y": 4}]
        assert (await h.info()).result["name"] == "sq-red"
    finally:
        await app.close()


async def test_nested_containers_optional_and_recursive(app: App, worker: StartWorker) -> None:
    @app.task
    async def walk(
        tree: Tree, points: tuple[Point, ...], maybe: Point | None, by_key: dict[str, list[Point]]
    ) -> list[str]:
        assert isinstance(tree.children[0].children[0], Tree)
        assert all(isinstance(p, Point) for p in points) and maybe is None
        return [type(by_key["k"][0]).__name__, type(points).__name__, str(tree.children[0].value)]

    await worker()
    tree = Tree(1, [Tree(2, [Tree(3)])])
    h = await walk.send(tree, (Point(1, 1),), None, {"k": [Point(2, 2)]})
    assert await h.result(timeout=10) == ["Point", "tuple", "2"]


async def test_unannotated_parameter_gets_the_fields(app: App, worker: StartWorker) -> None:
    @app.task
    async def raw(value):  # type: ignore[no-untyped-def]
        return value

    await worker()
    assert raw.adapter is None  # nothing to rebuild: the fast path
    assert await (await raw.send(Point(1, 2))).result(timeout=10) == {"x": 1, "y": 2}


async def test_data_that_does_not_fit_fails_the_task(app: App, worker: StartWorker) -> None:
    @app.task
    async def needs_point(p: Point) -> int:
        return p.x

    await worker()
    h = await app.send_task(needs_point.name, args=({"x": 1, "z": 2},))
    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=10)
    assert err.value.exc_type == "TypeError"
    assert "z" in err.value.exc_message


async def test_chord_body_gets_its_header_results_rebuilt(app: App, worker: StartWorker) -> None:
    from aiotasks import chord

    @app.task
    async def point(i: int) -> Point:
        return Point(i, i)

    @app.task
    async def total(points: list[Point]) -> Point:
        return Point(sum(p.x for p in points), sum(p.y for p in points))

    await worker()
    h = await chord([point.s(1), point.s(2)], total.s()).send()
    assert await app.handle(h.id).result(timeout=10) == {"x": 3, "y": 3}


@pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")
@pytest.mark.parametrize("serializer", SERIALIZERS)
async def test_pydantic_models(
    redis_url: str, namespace: str, worker: StartWorker, serializer: str
) -> None:
    app = make_app(redis_url, namespace, serializer)

    @app.task
    async def price(order: Order) -> Item:
        assert isinstance(order.items[0], Item)
        return Item(sku="total", price=sum((i.price for i in order.items), Decimal(0)))

    try:
        await worker(app)
        order = Order(items=[Item(sku="a", price=Decimal("1.10")), Item(sku="b", price="2.20")])
        got = await (await price.send(order)).result(timeout=10)
        assert got == Item(sku="total", price=Decimal("3.30"))
    finally:
        await app.close()


def test_hints_are_read_once_per_task() -> None:
    app = App(namespace="unused")

    @app.task
    async def plain(x: int, y: list[int]) -> int:
        return x

    @app.task
    async def typed(p: Point, *rest: Point, **more: Color) -> Point:
        return p

    assert plain.adapter is None
    adapter = typed.adapter
    assert adapter is not None and typed.adapter is adapter
    args, kwargs = typed.load_args([{"x": 1, "y": 2}, {"x": 3, "y": 4}], {"c": "blue"})
    assert args == [Point(1, 2), Point(3, 4)] and kwargs == {"c": Color.BLUE}
    assert adapter_for(lambda a: a) is None

    @app.task
    async def mixed(raw: dict[str, int], *, keep: Any = None, **points: Point) -> None: ...

    _, kwargs = mixed.load_args(
        [], {"raw": {"x": 1, "y": 2}, "keep": {"x": 0}, "p": {"x": 3, "y": 4}}
    )
    assert kwargs == {"raw": {"x": 1, "y": 2}, "keep": {"x": 0}, "p": Point(3, 4)}


# -- register_type ------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", SERIALIZERS)
async def test_registered_type_round_trips_through_a_worker(
    redis_url: str, namespace: str, worker: StartWorker, serializer: str, money: None
) -> None:
    app = make_app(redis_url, namespace, serializer)

    @app.task
    async def double(m: Money, many: list[Money]) -> dict[str, Money]:
        assert isinstance(many[0], Money)
        return {"twice": Money(m.amount * 2, m.currency)}

    try:
        await worker(app)
        h = await double.send(Money(Decimal("1.25"), "EUR"), [Money(Decimal(1), "USD")])
        assert await h.result(timeout=10) == {"twice": Money(Decimal("2.50"), "EUR")}
        assert (await h.info()).result == {"twice": Money(Decimal("2.50"), "EUR")}
    finally:
        await app.close()


def test_registered_type_wire_forms(money: None) -> None:
    m = Money(Decimal("9.99"), "GBP")
    data, _ = codec.encode({"m": m}, "json")
    assert b'{"__t":"test.money","v":["9.99","GBP"]}' in data
    assert codec.decode(data, "json") == {"m": m}
    packed, _ = codec.encode(m, "msgpack")
    assert packed[0] in (0xC7, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)  # an ext type...
    assert codec.decode(packed, "msgpack") == m
    ext = codec.msgpack.unpackb(packed)  # ...code 64, named: [name, value]
    assert ext.code == usertypes.EXT_NAMED


def test_registered_type_with_its_own_code() -> None:
    register_type(
        Point, encode=lambda p: [p.x, p.y], decode=lambda v: Point(*v), name="test.point", code=100
    )
    try:
        packed, _ = codec.encode([Point(2, 1)], "msgpack")
        assert codec.msgpack.unpackb(packed)[0].code == 100  # [x, y], no name, no fields
        assert codec.decode(packed, "msgpack") == [Point(2, 1)]
    finally:
        usertypes._unregister(usertypes._by_name["test.point"])


def test_register_type_refuses_conflicts(money: None) -> None:
    class Other:
        pass

    with pytest.raises(ValueError, match="already names"):
        register_type(Other, encode=str, decode=str, name="test.money")
    with pytest.raises(ValueError, match="reserved"):
        register_type(Other, encode=str, decode=str, name="datetime")
    with pytest.raises(ValueError, match="65..127"):
        register_type(Other, encode=str, decode=str, code=5)


def test_a_type_this_process_never_registered_is_named(money: None) -> None:
    packed, _ = codec.encode(Money(Decimal(1), "EUR"), "msgpack")
    usertypes._unregister(usertypes._by_name["test.money"])
    with pytest.raises(SerializationError, match="no type registered as 'test.money'"):
        codec.decode(packed, "msgpack")
    register_type(Money, encode=str, decode=str, name="test.money")  # for the fixture


# -- what cannot be sent, and why ---------------------------------------------------------


def fake(module: str, name: str, **attrs: Any) -> Any:
    """An instance of a class that says it comes from `module` (numpy, pandas, ...)."""
    return type(name, (), {"__module__": module, **attrs})()


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (fake("numpy", "int64"), ".item()"),
        (fake("numpy", "ndarray", ndim=2), ".tolist()"),
        (fake("pandas.core.frame", "DataFrame"), ".to_dict()"),
        (fake("shop", "Cart", __attrs_attrs__=()), "attrs.asdict"),
        (fake("shop", "Basket"), "register_type"),
        ({Point(1, 2)}, "send a list"),
    ],
    ids=["numpy-scalar", "numpy-array", "pandas", "attrs", "plain-class", "set-of-records"],
)
@pytest.mark.parametrize("serializer", SERIALIZERS)
async def test_unencodable_argument_names_the_fix(
    app: App, serializer: str, value: Any, hint: str
) -> None:
    @app.task
    async def take(v: Any) -> None: ...

    with pytest.raises(SerializationError) as err:
        await take.options(serializer=serializer).send(value)
    assert hint in str(err.value)
    assert type(value).__name__ in str(err.value)
    keys = await app.client.redis.keys(app.client.keys.prefix + "t:*")
    assert keys == []  # nothing was enqueued


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_sets_of_tuples_round_trip(serializer: str) -> None:
    value = {"s": {(1, 2), (3, (4, 5))}, "f": frozenset({("a",)}), "l": [(1, 2)]}
    data, ct = codec.encode(value, serializer)
    assert codec.decode(data, ct) == {
        "s": {(1, 2), (3, (4, 5))},
        "f": frozenset({("a",)}),
        "l": [[1, 2]],  # outside a set a tuple still comes back as a list
    }


async def test_result_that_cannot_be_encoded_says_why(app: App, worker: StartWorker) -> None:
    @app.task
    async def bad() -> Any:
        return fake("numpy", "float32")

    await worker()
    h = await bad.send()
    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=10)
    assert err.value.exc_type == "SerializationError"
    assert ".item()" in err.value.exc_message
    assert await h.state() == TaskState.FAILURE
