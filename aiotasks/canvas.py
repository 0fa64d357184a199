"""Canvas: group, chain and chord, compiled into finish.lua ops (see contract.py).

A canvas is frozen into plain dicts with every task id chosen up front, so that the
handle of the last task is known at send time and a continuation that is enqueued
twice (a replayed commit) is recognised by its id and skipped:

    {"t": "sig", "id", "name", "args", "kwargs", "opts"}
    {"t": "chain", "steps": [node, ...]}
    {"t": "chord", "id", "header": [node, ...], "body": node, "on_error": sig | None}

A task's message carries the rest of its chain (`link`) and the chord it reports to;
the worker compiles the next step when the task succeeds, in the same atomic commit
that stores the result. Chords count their headers in Lua (see _lib.lua).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from .contract import FOLLOW, SEND, chord_op, enqueue_op
from .handle import GroupHandle, TaskHandle
from .message import ChordRef, Message
from .task import Signature, build_message

if TYPE_CHECKING:
    from .app import App
    from .client import Client

Op = dict[str, Any]  # one finish.lua op (contract.py)
Node = dict[str, Any]

COLLECT = "aiotasks.collect"
"""Built-in task that returns its first argument: the body of a group nested in a canvas."""


@dataclass(frozen=True, slots=True)
class group:
    """Tasks that run in parallel: `await group([add.s(1, 1), add.s(2, 2)]).send()`."""

    tasks: tuple[Any, ...]

    def __init__(self, tasks: Iterable[Any], *more: Any) -> None:
        items = (
            [tasks, *more]
            if isinstance(tasks, Signature | chain | chord | group)
            else [*tasks, *more]
        )
        object.__setattr__(self, "tasks", tuple(items))

    async def send(self, **options: Any) -> GroupHandle:
        """Enqueue every member in one round trip; a GroupHandle in member order."""
        app = _app_of(self)
        nodes = [_freeze(t, options) for t in self.tasks]
        ops: list[Op] = []
        for node in nodes:
            ops += compile_node(app, app.client, node, mode=SEND)
        await _send_ops(app, ops)
        return GroupHandle(app.client, [TaskHandle(app.client, final_id(n)) for n in nodes])


@dataclass(frozen=True, slots=True)
class chain:
    """Tasks run one after another, each result the first argument of the next."""

    tasks: tuple[Any, ...]

    def __init__(self, *tasks: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Signature | chain | chord | group):
            tasks = tuple(tasks[0])
        object.__setattr__(self, "tasks", tuple(tasks))

    async def send(self, **options: Any) -> TaskHandle[Any]:
        """Enqueue the first task; returns the handle of the last one."""
        app = _app_of(self)
        node = _freeze(self, options)
        await _send_ops(app, compile_node(app, app.client, node, mode=SEND))
        return TaskHandle(app.client, final_id(node))


@dataclass(frozen=True, slots=True)
class chord:
    """A header group whose results, in order, are the body's first argument.

    The header task whose result lands last enqueues the body, exactly once (an atomic
    Lua counter). A failed header fails the chord: the body never runs, its handle
    raises ChordError, and `on_error` is enqueued once with a dict describing the failure
    (chord_id, task_id, exc_type, exc_message) as its first argument.
    """

    header: tuple[Any, ...]
    body: Any
    on_error: Signature | None = None

    def __init__(self, header: Iterable[Any], body: Any, on_error: Signature | None = None) -> None:
        if isinstance(header, group):
            header = header.tasks
        object.__setattr__(self, "header", tuple(header))
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "on_error", on_error)

    async def send(self, **options: Any) -> TaskHandle[Any]:
        """Enqueue the header tasks; returns the body's handle."""
        app = _app_of(self)
        node = _freeze(self, options)
        await _send_ops(app, compile_node(app, app.client, node, mode=SEND))
        return TaskHandle(app.client, final_id(node))


def _app_of(canvas: Any) -> App:
    if isinstance(canvas, Signature):
        return canvas._app()
    parts: list[Any] = []
    if isinstance(canvas, group | chain):
        parts = list(canvas.tasks)
    elif isinstance(canvas, chord):
        parts = [canvas.body, *canvas.header]
    for part in parts:
        try:
            return _app_of(part)
        except RuntimeError:
            continue
    raise RuntimeError("this canvas holds no signature made with task.s()")


def _freeze(c: Any, options: dict[str, Any] | None = None) -> Node:
    """A canvas as dicts, with ids chosen now."""
    options = options or {}
    if isinstance(c, Signature):
        opts = {**c.options, **options}
        return {
            "t": "sig",
            "id": opts.pop("task_id", None) or uuid4().hex,
            "name": c.name,
            "args": list(c.args),
            "kwargs": c.kwargs,
            "opts": opts,
        }
    if isinstance(c, chain):
        steps = [_freeze(t, options) for t in c.tasks]
        if not steps:
            raise ValueError("chain() needs at least one task")
        # A group followed by more steps is a chord (as in Celery); a trailing group
        # collects its results into one list.
        for i, step in enumerate(steps):
            if step["t"] == "group":
                body = steps[i + 1] if i + 1 < len(steps) else _collect()
                steps[i : i + 2] = [
                    {
                        "t": "chord",
                        "id": uuid4().hex,
                        "header": step["tasks"],
                        "body": body,
                        "on_error": None,
                    }
                ]
                break
        return {"t": "chain", "steps": steps} if len(steps) > 1 else steps[0]
    if isinstance(c, chord):
        header = [_nested(_freeze(t, options)) for t in c.header]
        return {
            "t": "chord",
            "id": uuid4().hex,
            "header": header,
            "body": _nested(_freeze(c.body, options)),
            "on_error": _freeze(c.on_error) if c.on_error is not None else None,
        }
    if isinstance(c, group):
        return {"t": "group", "tasks": [_nested(_freeze(t, options)) for t in c.tasks]}
    raise TypeError(f"not a signature or canvas: {c!r}")


def _collect() -> Node:
    return {"t": "sig", "id": uuid4().hex, "name": COLLECT, "args": [], "kwargs": {}, "opts": {}}


def _nested(node: Node) -> Node:
    """A group inside a chord or chain runs as a chord that collects its results."""
    if node["t"] == "group":
        return {
            "t": "chord",
            "id": uuid4().hex,
            "header": node["tasks"],
            "body": _collect(),
            "on_error": None,
        }
    return node


def final_id(node: Node) -> str:
    """The id of the task whose result is the canvas's result."""
    t = node["t"]
    if t == "sig":
        return str(node["id"])
    if t == "chain":
        return final_id(node["steps"][-1])
    if t == "chord":
        return final_id(node["body"])
    raise ValueError("a group has no single final task")


def compile_node(
    app: App,
    client: Client,
    node: Node,
    *,
    mode: str,
    prepend: Sequence[Any] = (),
    link: Sequence[Node] = (),
    report: ChordRef | None = None,
) -> list[Op]:
    """finish.lua ops that start `node` with `prepend` args, continuing with `link`."""
    t = node["t"]
    if t == "chain":
        steps = node["steps"]
        return compile_node(
            app,
            client,
            steps[0],
            mode=mode,
            prepend=prepend,
            link=[*steps[1:], *link],
            report=report,
        )
    if t == "chord":
        return _compile_chord(
            app, client, node, mode=mode, prepend=prepend, link=link, report=report
        )
    if t == "group":
        ops: list[Op] = []
        for member in node["tasks"]:
            ops += compile_node(app, client, member, mode=mode, prepend=prepend)
        return ops
    msg, ttl = _message(app, node, prepend, link, report)
    reply = client.notifier.reply_channel if mode == SEND else None
    return [enqueue_op(mode, _record(app, msg, ttl, reply=reply))]


def _record(app: App, msg: Message, ttl: int, **extra: Any) -> Any:
    s = app.settings
    return msg.record(ttl, min_size=s.compress_min_size, max_size=s.max_message_size, **extra)


def _message(
    app: App,
    node: Node,
    prepend: Sequence[Any],
    link: Sequence[Node],
    report: ChordRef | None,
    **extra: Any,
) -> tuple[Message, int]:
    opts = {**node["opts"], "task_id": node["id"]}
    msg, ttl = build_message(
        app,
        node["name"],
        [*prepend, *node["args"]],
        node["kwargs"],
        opts,
        app.tasks.get(node["name"]),
    )
    msg = replace(
        msg,
        link=list(link),
        chord=report,
        tail=final_id({"t": "chain", "steps": list(link)}) if link else None,
        **extra,
    )
    return msg, ttl


def _compile_chord(
    app: App,
    client: Client,
    node: Node,
    *,
    mode: str,
    prepend: Sequence[Any],
    link: Sequence[Node],
    report: ChordRef | None,
) -> list[Op]:
    cid = node["id"]
    header = node["header"]
    body = node["body"]
    if not header:
        return compile_node(app, client, body, mode=mode, prepend=[[]], link=link, report=report)
    body_link = list(link)
    if body["t"] == "chain":
        body_link = [*body["steps"][1:], *body_link]
        body = body["steps"][0]
    if body["t"] != "sig":
        raise TypeError("a chord body must be a signature or a chain starting with one")
    b, ttl = _message(app, body, (), body_link, report, chord_body=cid)
    # The body's countdown counts from when its headers are done (as a chain step's
    # does from the step before); an eta stays the time it names.
    countdown = body["opts"].get("countdown") if body["opts"].get("eta") is None else None
    delay_ms = None
    if countdown:
        b, delay_ms = replace(b, eta=None), int(float(countdown) * 1000)
    reply = client.notifier.reply_channel if mode == SEND else None
    body_record = _record(app, b, ttl, reply=reply, delay_ms=delay_ms)
    errback = None
    if node.get("on_error"):
        e, e_ttl = _message(app, node["on_error"], (), (), None, chord_errback=cid)
        errback = _record(app, e, e_ttl)
    ops: list[Op] = [chord_op(cid, ttl, len(header), body_record, errback)]
    for idx, member in enumerate(header):
        ops += compile_node(
            app, client, member, mode=mode, prepend=prepend, report=ChordRef(cid, idx)
        )
    return ops


def continuation(app: App, client: Client, msg: Message, value: Any) -> list[Op]:
    """Ops that start the next step of `msg`'s chain with its result `value`."""
    nxt, *rest = msg.link
    return compile_node(app, client, nxt, mode=FOLLOW, prepend=[value], link=rest, report=msg.chord)


async def _send_ops(app: App, ops: list[Op]) -> None:
    await app.client.apply(ops, app.settings.retry_policy)
