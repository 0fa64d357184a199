"""Canvas: group, chain and chord, and `|` between them (Celery's canvas).

A canvas is sent in three steps, each in its own module:

1. `nodes.freeze()` turns it into plain nodes with every task id chosen now, rewritten
   into shapes that run directly (a group followed by a step becomes a chord, ...);
2. `compiler.Compiler` turns the nodes into finish.lua ops: the first tasks to run, the
   chord counters, and each task's chain continuation, callbacks and errbacks;
3. one finish.lua call applies the ops atomically.

Later steps are compiled by the worker that finishes the step before them, in the same
atomic call that stores that step's result, so each runs exactly once. A new primitive
is a class here (its shape), a rewrite in `nodes._normalize` into the existing node
types, or, for a new node type, one more branch in `nodes` and `compiler`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from .compiler import Compiler
from .contract import COLLECT
from .handle import GroupHandle, TaskHandle
from .keys import shard_of
from .message import check_options
from .nodes import (
    Node,
    as_list,
    canvas_shard,
    check_args,
    check_debounced,
    check_unpinned,
    chord_node,
    final_id,
    final_sig,
    freeze,
    is_canvas,
    node,
    pinned_task,
)
from .spellings import Links, OnError
from .task import Signature, pinned_id

if TYPE_CHECKING:
    from .app import App

__all__ = ["COLLECT", "chain", "chord", "chunks", "compose", "group", "is_canvas", "send_canvas"]


def compose(left: Any, right: Any) -> Any:
    """`left | right`: a chain of both, or a chord when a group meets a signature."""
    if not is_canvas(right):
        return NotImplemented
    if isinstance(left, group) and isinstance(right, Signature) and not left.options:
        return chord(left.tasks, right)
    return chain(*_steps(left), *_steps(right))


class _Composable(Links):
    """`|` between signatures and canvases builds chains (and `group | sig` a chord),
    and Celery's `apply_async`/`delay` send them. Send options set on a canvas
    (`set()`, `link()`, ...) apply when that canvas is sent, as `send(**options)` would."""

    __slots__ = ()
    options: dict[str, Any]

    def __or__(self, other: Any) -> Any:
        return compose(self, other)

    async def send(self, **options: Any) -> Any:
        raise NotImplementedError

    def set(self, **options: Any) -> Self:
        """Add these send options (`link`, `link_error`, `countdown`, ...) and return this
        canvas: in place, as Celery's `set()`."""
        check_options(options)
        object.__setattr__(self, "options", _merged(self.options, options))
        return self

    @property
    def _own_options(self) -> dict[str, Any]:
        # What nodes.node() refuses on a canvas nested in another: applied only when
        # this canvas is the one sent.
        return self.options

    async def apply_async(
        self, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Any:
        """`send(**options)`, Celery's spelling. Partial `args`/`kwargs` go to the tasks
        that start it, as in Celery: a chain's first step, each member of a group, each
        header task of a chord (not to an immutable one)."""
        canvas = _partial(self, tuple(args), kwargs or {}) if args or kwargs else self
        return await canvas.send(**options)

    async def delay(self, *args: Any, **kwargs: Any) -> Any:
        """`apply_async(args, kwargs)`, Celery's spelling."""
        return await self.apply_async(args, kwargs)


def _partial(c: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`c` with partial arguments given to the tasks that start it (and the send options
    set on it)."""
    if isinstance(c, Signature):
        return c if c.immutable else c.clone(args, kwargs)
    given = _given_partial(c, args, kwargs)
    if given is not c and c.options:
        object.__setattr__(given, "options", dict(c.options))
    return given


def _given_partial(c: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if isinstance(c, chain) and c.tasks:
        return chain(_partial(c.tasks[0], args, kwargs), *c.tasks[1:])
    if isinstance(c, group):
        return group([_partial(t, args, kwargs) for t in c.tasks])
    if isinstance(c, chord):
        return chord([_partial(t, args, kwargs) for t in c.header], c.body, c.on_error)
    return c


def _merged(current: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Send options `more` over `current`; callbacks and errbacks add up."""
    out = {**current, **more}
    for name in ("link", "link_error"):
        if name in current and name in more:
            out[name] = [*as_list(current[name]), *as_list(more[name])]
    return out


def _steps(c: Any) -> tuple[Any, ...]:
    # A chain with send options of its own stays whole: nested, they are refused at send
    # rather than dropped.
    return c.tasks if isinstance(c, chain) and not c.options else (c,)


@dataclass(frozen=True, slots=True)
class group(OnError, _Composable):
    """Tasks that run in parallel: `await group([add.s(1, 1), add.s(2, 2)]).send()`.

    Its result is the list of its members' results, in order; a group inside a group
    gives a nested list. `group | sig` is a chord.
    """

    tasks: tuple[Any, ...]
    options: dict[str, Any] = field(hash=False, repr=False)

    def __init__(self, tasks: Iterable[Any] = (), *more: Any) -> None:
        items = [tasks, *more] if is_canvas(tasks) else [*tasks, *more]
        object.__setattr__(self, "tasks", tuple(items))
        object.__setattr__(self, "options", {})

    def __call__(self, *args: Any, **options: Any) -> Awaitable[GroupHandle]:
        """Celery's `group(...)(*args, **options)`: `apply_async(args, **options)`."""
        return self.apply_async(args, **options)

    def _freeze(self, shared: dict[str, Any]) -> Node:
        return {"t": "group", "tasks": [node(t, shared) for t in self.tasks]}

    async def send(self, **options: Any) -> GroupHandle:
        """Enqueue every member in one round trip; a GroupHandle in member order.

        `task_id` names the group (`GroupHandle.id`), not its members.
        """
        options = _merged(self.options, options)
        group_id = options.pop("task_id", None)
        app = _app_of(self) or _app_of(as_list(options.get("link")))
        if app is None:
            # No task anywhere (group([]), group(group([]))): nothing to send, and the
            # result is its shape, as the same groups beside a task would give.
            return GroupHandle(None, [], group_id, empty=_empty_shape(self))
        node = await _send(app, self, options)
        members = node["header"] if node["t"] == "chord" else node["tasks"]
        handles: list[TaskHandle[Any]] = [TaskHandle(app.client, final_id(m)) for m in members]
        return GroupHandle(app.client, handles, group_id)


class chunks(group):
    """Celery's `task.chunks(items, n)`: a group of `task.starmap` signatures of `n` items
    each. Sent, its result is the list of each chunk's list of results."""

    __slots__ = ()

    def __init__(self, task: Any, items: Iterable[Iterable[Any]], n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"a chunk size is a whole number, got {n!r}")
        if n < 1:
            raise ValueError(f"chunks need a size of at least 1, got {n!r}")
        calls = [list(args) for args in items]
        super().__init__([task.starmap(calls[i : i + n]) for i in range(0, len(calls), n)])

    def group(self) -> group:
        """The chunks as a plain group (Celery's `chunks.group()`)."""
        return group(self.tasks)


@dataclass(frozen=True, slots=True)
class chain(OnError, _Composable):
    """Tasks run one after another, each result the first argument of the next.

    `countdown`/`eta` delay the first step; `task_id` names the last one.
    """

    tasks: tuple[Any, ...]
    options: dict[str, Any] = field(hash=False, repr=False)

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not is_canvas(tasks[0]):
            tasks = tuple(tasks[0])
        object.__setattr__(self, "tasks", tuple(tasks))
        object.__setattr__(self, "options", {})

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[TaskHandle[Any]]:
        """Celery's `chain(...)(*args, **kwargs)`: `apply_async(args, kwargs)`."""
        return self.apply_async(args, kwargs)

    def _freeze(self, shared: dict[str, Any]) -> Node:
        if not self.tasks:
            raise ValueError("chain() needs at least one task")
        return {"t": "chain", "steps": [node(t, shared) for t in self.tasks]}

    async def send(self, **options: Any) -> TaskHandle[Any]:
        """Enqueue the first task; returns the handle of the last one."""
        return await _send_single(self, options)


@dataclass(frozen=True, slots=True)
class chord(_Composable):
    """A header group whose results, in order, are the body's first argument.

    The header task whose result lands last enqueues the body, exactly once (an atomic
    Lua counter). A failed header fails the chord: the body never runs, its handle
    raises ChordError, and `on_error` is enqueued once with a dict describing the failure
    (chord_id, task_id, name, exc_type, exc_message) as its first argument; `on_error`
    fires as well, once, if the body fails. The body may be any canvas.
    """

    header: tuple[Any, ...]
    body: Any
    on_error: Signature | None = None
    options: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    def __init__(
        self, header: Iterable[Any], body: Any = None, on_error: Signature | None = None
    ) -> None:
        if isinstance(header, group):
            if header.options:
                raise ValueError(
                    "send options set on a group are not applied to a chord's header: set "
                    "them on the chord, or on the header's tasks"
                )
            header = header.tasks
        object.__setattr__(self, "header", tuple(header))
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "on_error", on_error)
        object.__setattr__(self, "options", {})

    def __call__(self, body: Any = None, **options: Any) -> Awaitable[TaskHandle[Any]]:
        """Celery's `chord(header)(body)`: send it with this body; await the handle."""
        whole = chord(self.header, body if body is not None else self.body, self.on_error)
        return whole.send(**_merged(self.options, options))

    def _freeze(self, shared: dict[str, Any]) -> Node:
        if self.body is None:
            raise TypeError("a chord needs a body: chord(header, body) or chord(header)(body)")
        return chord_node(list(self.header), self.body, self.on_error, shared)

    async def send(self, **options: Any) -> TaskHandle[Any]:
        """Enqueue the header tasks; returns the handle of the body's final task."""
        return await _send_single(self, options)


async def _send_single(canvas: chain | chord, options: dict[str, Any]) -> TaskHandle[Any]:
    options = _merged(canvas.options, options)
    app = _app_of(canvas)
    if app is None:
        raise ValueError(f"{type(canvas).__name__} holds no task to run")
    node = await _send(app, canvas, options)
    return TaskHandle(app.client, final_id(node))


async def send_canvas(app: App, canvas: Any, options: dict[str, Any]) -> str:
    """Send any canvas (a signature with callbacks included); the final task's id."""
    return final_id(await _send(app, canvas, options))


async def _send(app: App, canvas: Any, options: dict[str, Any]) -> Node:
    policy = options.pop("retry_policy", None)
    drawn: set[str] = set()
    node = freeze(canvas, options, app, drawn=drawn)
    check_args(app, node)
    check_debounced(app, node)
    if app.tracer is None:
        await _apply(app, node, policy, drawn)
        return node
    # The messages are built inside the `send` span: they carry its context.
    kind = node["name"] if node["t"] == "sig" else node["t"]
    final = final_sig(node)
    with app.tracer.send(kind, [str(final["id"])] if final is not None else [], []):
        await _apply(app, node, policy, drawn)
    return node


async def _apply(app: App, node: Node, policy: Any, drawn: set[str]) -> None:
    from .config import RetryPolicy

    client = app.client
    retry = RetryPolicy.of(policy) if policy else client.retry_policy
    if len(client.shards) == 1:
        await client.apply(Compiler(app, client).ops(node), retry)
        return
    # Several shards: what must meet in one atomic call (a chord, a chain, a task and its
    # callbacks) has its ids in one shard; a group's members each go to their own.
    n = len(client.shards)
    parts = node["tasks"] if node["t"] == "group" else [node]
    by_shard: dict[int, list[Node]] = {}
    for part in parts:
        k = _pinned_member(app, part, drawn) if node["t"] == "group" else None
        if k is None:
            check_unpinned(app, part)
            k = canvas_shard(part, n)
        by_shard.setdefault(k, []).append(part)
    calls = []
    for k, members in by_shard.items():
        shard = client.shards[k]
        compiler = Compiler(app, shard)
        calls.append(shard.apply([op for m in members for op in compiler.ops(m)], retry))
    for failed in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(failed, BaseException):
            raise failed  # the first failed shard's; the others' were retrieved


def _pinned_member(app: App, member: Node, drawn: set[str]) -> int | None:
    """A group member that is a plain call of a task with a concurrency limit or
    debounce: its id moves to its key's shard (as a send of its own would); its shard.
    None for any other member."""
    if member["t"] != "sig" or member.get("link") or member.get("link_error"):
        return None
    task = pinned_task(app, member)
    if task is None:
        return None
    args, kwargs = member["args"], member["kwargs"]
    debounce = task.key_of(task.opts.debounce_key, args, kwargs) if task.opts.debounce else None
    given = None if member["id"] in drawn else str(member["id"])
    n = app.settings.shards
    member["id"] = pinned_id(task, given, debounce, args, kwargs, n)
    return shard_of(member["id"], n)


def _empty_shape(canvas: Any) -> list[Any]:
    """The result of a group holding no task: a list per group inside it.

    Raises:
        ValueError: it holds an empty chain (as chain() alone does) or a chord.
    """
    if isinstance(canvas, group):
        return [_empty_shape(t) for t in canvas.tasks]
    if isinstance(canvas, chain) and canvas.tasks:
        return _empty_shape(canvas.tasks[-1])
    if isinstance(canvas, chain):
        raise ValueError("chain() needs at least one task")
    raise ValueError(f"{type(canvas).__name__} holds no task to run")


def _app_of(canvas: Any) -> App | None:
    if isinstance(canvas, Signature):
        return canvas._app()
    parts: list[Any] = []
    if isinstance(canvas, list):
        parts = canvas
    elif isinstance(canvas, group | chain):
        parts = list(canvas.tasks)
    elif isinstance(canvas, chord):
        parts = [canvas.body, *canvas.header]
    for part in parts:
        app = _app_of(part)
        if app is not None:
            return app
    return None
