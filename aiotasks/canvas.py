"""Canvas: group, chain and chord, compiled into finish.lua ops.

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

from .handle import GroupHandle, TaskHandle
from .message import ChordRef, Message, now
from .task import Signature, build_message

if TYPE_CHECKING:
    from .app import App

Arg = str | bytes | int | float
Op = list[Any]  # one finish.lua op, e.g. ["enqueue", mode, values]
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
            ops += compile_node(app, node, mode="send")
        await _send_ops(app, ops)
        return GroupHandle(app, [TaskHandle(app, final_id(n)) for n in nodes])


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
        await _send_ops(app, compile_node(app, node, mode="send"))
        return TaskHandle(app, final_id(node))


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
        await _send_ops(app, compile_node(app, node, mode="send"))
        return TaskHandle(app, final_id(node))


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
            app, steps[0], mode=mode, prepend=prepend, link=[*steps[1:], *link], report=report
        )
    if t == "chord":
        return _compile_chord(app, node, mode=mode, prepend=prepend, link=link, report=report)
    if t == "group":
        ops: list[Op] = []
        for member in node["tasks"]:
            ops += compile_node(app, member, mode=mode, prepend=prepend)
        return ops
    msg, ttl = _message(app, node, prepend, link, report)
    reply = app.broker.notifier.reply_channel if mode == "send" else ""
    args = msg.enqueue_args(app.broker.keys, ttl, app.settings.compress_min_size, reply)
    return [["enqueue", mode, args]]


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
        return compile_node(app, body, mode=mode, prepend=[[]], link=link, report=report)
    body_link = list(link)
    if body["t"] == "chain":
        body_link = [*body["steps"][1:], *body_link]
        body = body["steps"][0]
    if body["t"] != "sig":
        raise TypeError("a chord body must be a signature or a chain starting with one")
    b, ttl = _message(app, body, (), body_link, report, chord_body=cid)
    b_data, b_ct = b.encode(app.settings.compress_min_size)
    keys = app.broker.keys
    # The body's countdown counts from when its headers are done (as a chain step's
    # does from the step before); an eta stays the time it names.
    countdown = body["opts"].get("countdown") if body["opts"].get("eta") is None else None
    b_eta: Arg = int(b.eta * 1000) if b.eta is not None and not countdown else ""
    b_delay: Arg = int(float(countdown) * 1000) if countdown else ""
    body_values: list[Arg] = [
        b.id,
        b.name,
        b.queue,
        keys.stream(b.queue, b.priority),
        b_data,
        b_ct,
        int(b.expires * 1000) if b.expires else "",
        report.id if report else "",
        report.idx if report else "",
        b.tail or "",
        b_eta,
        b_delay,
    ]
    errback: list[Arg] = []
    if node.get("on_error"):
        e, _ = _message(app, node["on_error"], (), (), None, chord_errback=cid)
        e_data, e_ct = e.encode(app.settings.compress_min_size)
        errback = [e.id, e.name, e.queue, keys.stream(e.queue, e.priority), e_data, e_ct]
    ops: list[Op] = [["chord", cid, ttl, len(header), body_values, errback]]
    for idx, member in enumerate(header):
        ops += compile_node(app, member, mode=mode, prepend=prepend, report=ChordRef(cid, idx))
    return ops


def continuation(app: App, msg: Message, value: Any) -> list[Op]:
    """Ops that start the next step of `msg`'s chain with its result `value`."""
    nxt, *rest = msg.link
    return compile_node(app, nxt, mode="follow", prepend=[value], link=rest, report=msg.chord)


async def _send_ops(app: App, ops: list[Op]) -> None:
    broker = app.broker
    prefix = broker.keys.prefix

    async def call() -> int:
        return await broker.scripts.finish(
            prefix=prefix, streams=[], now_ms=int(now() * 1000), ops=ops
        )

    await broker.with_retry(app.settings.retry_policy, call)
