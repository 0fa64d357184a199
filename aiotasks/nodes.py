"""Nodes: a canvas frozen into plain, runnable dicts, with every task id chosen now.

`freeze()` turns the user's signatures, chains, groups and chords into nodes and
rewrites every shape into one the compiler runs directly (Celery's semantics):

- a chain is flat, and every step is a signature or a chord: a group followed by a step
  becomes a chord with that step as its body; a group that ends a chain becomes a chord
  whose body collects the results into one list;
- a chord body starts with a signature: any other body (a group, a chord, a chain that
  starts with one) runs after a collecting step that passes the header results on;
- a group nested in a group or a chord header yields its results as one nested list.

Canvas-level `link` goes to the canvas's final task, `link_error` to every task in it
(the same errback ids everywhere, so Lua enqueues each once), `countdown`/`eta` to the
tasks that start first, `task_id` names the final task; other send options reach every
task. Nodes travel in messages (a task's chain continuation and callbacks), so they
are plain msgpack/json values:

    {"t": "sig", "id", "name", "args", "kwargs", "opts", "imm"?, "link"?, "link_error"?}
    {"t": "chain", "steps": [node, ...]}
    {"t": "chord", "id", "header": [node, ...], "body": node, "on_error": sig | None}
    {"t": "group", "tasks": [node, ...]}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from .message import check_options

if TYPE_CHECKING:
    from .app import App

Node = dict[str, Any]

COLLECT = "aiotasks.collect"
"""Built-in task that returns its first argument: gathers a group's results into a list."""

#: Send options that shape a canvas rather than reach each of its tasks.
CANVAS_OPTIONS = ("task_id", "countdown", "eta", "link", "link_error")


def sig_node(
    name: str,
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    opts: dict[str, Any] | None = None,
    *,
    immutable: bool = False,
) -> Node:
    """A signature node; its id comes from `opts["task_id"]` or is made now."""
    opts = dict(opts or {})
    node: Node = {
        "t": "sig",
        "id": opts.pop("task_id", None) or uuid4().hex,
        "name": name,
        "args": list(args),
        "kwargs": dict(kwargs or {}),
    }
    links = [_callback(x) for x in _as_list(opts.pop("link", None))]
    errbacks = [_errback(x) for x in _as_list(opts.pop("link_error", None))]
    check_options(opts)
    node["opts"] = opts
    if immutable:
        node["imm"] = True
    if links:
        node["link"] = links
    if errbacks:
        node["link_error"] = errbacks
    return node


def freeze(canvas: Any, options: dict[str, Any] | None = None, app: App | None = None) -> Node:
    """The canvas as runnable nodes, with send `options` applied the way Celery does."""
    options = dict(options or {})
    shaping = {k: options.pop(k) for k in CANVAS_OPTIONS if k in options}
    check_options(options)
    root = _normalize(node(canvas, options), app)
    first = {k: shaping[k] for k in ("countdown", "eta") if k in shaping}
    if first:
        for sig in _starting(root):
            sig["opts"].update(first)
    root = _attach_links(root, [_callback(x) for x in _as_list(shaping.get("link"))], app)
    for errback in [_errback(x) for x in _as_list(shaping.get("link_error"))]:
        for sig in sigs(root):
            sig.setdefault("link_error", []).append(errback)
    if shaping.get("task_id"):
        final = final_sig(root)
        if final is not None:
            final["id"] = str(shaping["task_id"])
    return root


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def is_canvas(value: Any) -> bool:
    """Whether `value` is a signature, chain, group or chord (it can freeze itself)."""
    return bool(callable(getattr(value, "_freeze", None))) and not isinstance(value, type)


def _callback(value: Any) -> Node:
    if not is_canvas(value):
        raise TypeError(f"link must be a signature or a canvas, got {type(value).__name__}")
    return _normalize(node(value, {}), None)


def _errback(value: Any) -> Node:
    frozen = node(value, {}) if is_canvas(value) else None
    if frozen is None or frozen["t"] != "sig":
        raise TypeError(f"link_error must be a signature, got {type(value).__name__}")
    return frozen


def node(c: Any, shared: dict[str, Any]) -> Node:
    """Nodes for a canvas as the user wrote it (before `_normalize`): each signature,
    chain, group and chord freezes itself (`_freeze`), with `shared` send options."""
    if not is_canvas(c):
        raise TypeError(f"not a signature or canvas: {c!r}")
    frozen: Node = c._freeze(shared)
    return frozen


def chord_node(header: list[Any], body: Any, on_error: Any, shared: dict[str, Any]) -> Node:
    """The node of a chord as written."""
    error_node = node(on_error, {}) if on_error is not None else None
    if error_node is not None and error_node["t"] != "sig":
        raise TypeError(f"chord on_error must be a signature, got {type(on_error).__name__}")
    return {
        "t": "chord",
        "id": uuid4().hex,
        "header": [node(t, shared) for t in header],
        "body": node(body, shared),
        "on_error": error_node,
    }


def _normalize(node: Node, app: App | None) -> Node:
    """Rewrite a node into shapes the compiler runs directly (see the module docstring)."""
    kind = node["t"]
    if kind == "sig":
        return node
    if kind == "group":
        return {"t": "group", "tasks": [single(_normalize(m, app), app) for m in node["tasks"]]}
    if kind == "chord":
        header = [single(_normalize(m, app), app) for m in node["header"]]
        body = _normalize(node["body"], app)
        if not _starts_with_sig(body):
            body = _normalize({"t": "chain", "steps": [collect(app, body), body]}, app)
        on_error = node["on_error"]
        if on_error is not None:
            # on_error also fires when the body itself fails (the same id: once).
            errback = {**on_error, "ecid": node["id"]}
            for sig in sigs(body):
                sig.setdefault("link_error", []).append(errback)
            on_error = errback
        return {
            "t": "chord",
            "id": node["id"],
            "header": header,
            "body": body,
            "on_error": on_error,
        }
    return _chain(node, app)


def _chain(node: Node, app: App | None) -> Node:
    steps: list[Node] = []
    for step in node["steps"]:
        step = _normalize(step, app)
        steps += step["steps"] if step["t"] == "chain" else [step]
    out: list[Node] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if step["t"] == "group":
            # A group followed by a step is a chord; one that ends the chain collects.
            body = steps[i + 1] if i + 1 < len(steps) else collect(app, step)
            step = _normalize(
                {
                    "t": "chord",
                    "id": uuid4().hex,
                    "header": step["tasks"],
                    "body": body,
                    "on_error": None,
                },
                app,
            )
            i += 1
        out.append(step)
        i += 1
    return {"t": "chain", "steps": out} if len(out) > 1 else out[0]


def single(node: Node, app: App | None) -> Node:
    """A node with one final task: a group nested where one result is wanted collects."""
    if node["t"] != "group":
        return node
    return _normalize(
        {
            "t": "chord",
            "id": uuid4().hex,
            "header": node["tasks"],
            "body": collect(app, node),
            "on_error": None,
        },
        app,
    )


def _starts_with_sig(node: Node) -> bool:
    first = node["steps"][0] if node["t"] == "chain" else node
    return bool(first["t"] == "sig")


def collect(app: App | None, near: Node) -> Node:
    """A COLLECT step, on the queue of the tasks it follows (so the same workers run it)."""
    opts: dict[str, Any] = {}
    first = next(sigs(near), None)
    if first is not None:
        queue = first["opts"].get("queue")
        if queue is None and app is not None:
            task = app.tasks.get(first["name"])
            queue = (task.opts.queue if task else None) or app.route(first["name"])
        if queue:
            opts["queue"] = queue
    return sig_node(COLLECT, (), {}, opts)


def _attach_links(node: Node, links: list[Node], app: App | None) -> Node:
    if not links:
        return node
    final = final_sig(node)
    if final is None:
        # A group's link gets the list of its results: a chord collects them first. The
        # members keep their ids, so the group's handles are the same.
        members = node["tasks"]
        body = collect(app, node)
        body["link"] = links
        return {
            "t": "chord",
            "id": uuid4().hex,
            "header": members,
            "body": body,
            "on_error": None,
            "group": True,
        }
    final.setdefault("link", []).extend(links)
    return node


def sigs(node: Node) -> Iterator[Node]:
    """Every signature node in a canvas (not its callbacks), depth first."""
    kind = node["t"]
    if kind == "sig":
        yield node
    elif kind == "chain":
        for step in node["steps"]:
            yield from sigs(step)
    elif kind == "group":
        for member in node["tasks"]:
            yield from sigs(member)
    elif kind == "chord":
        for member in node["header"]:
            yield from sigs(member)
        yield from sigs(node["body"])


def _starting(node: Node) -> Iterator[Node]:
    """The signatures that start first when the canvas is sent."""
    kind = node["t"]
    if kind == "sig":
        yield node
    elif kind == "chain":
        yield from _starting(node["steps"][0])
    elif kind == "group":
        for member in node["tasks"]:
            yield from _starting(member)
    elif kind == "chord":
        if not node["header"]:
            yield from _starting(node["body"])
        for member in node["header"]:
            yield from _starting(member)


def final_sig(node: Node) -> Node | None:
    """The signature whose result is the canvas's result (None for a group)."""
    kind = node["t"]
    if kind == "sig":
        return node
    if kind == "chain":
        return final_sig(node["steps"][-1])
    if kind == "chord":
        return final_sig(node["body"])
    return None


def final_id(node: Node) -> str:
    """The id of the task whose result is the canvas's result."""
    final = final_sig(node)
    if final is None:
        raise ValueError("a group has no single final task")
    return str(final["id"])


def check_args(app: App, node: Node, prepended: int = 0) -> None:
    """Raise TypeError naming the task when a call cannot bind to its function.

    `prepended` counts the values the canvas puts before a task's own arguments (the
    previous step's result, a chord's header results); tasks this process does not know
    are not checked.
    """
    kind = node["t"]
    if kind == "sig":
        _check_sig_args(app, node, prepended)
    elif kind == "chain":
        for i, step in enumerate(node["steps"]):
            check_args(app, step, prepended if i == 0 else 1)
    elif kind == "group":
        for member in node["tasks"]:
            check_args(app, member, prepended)
    elif kind == "chord":
        for member in node["header"]:
            check_args(app, member, prepended)
        check_args(app, node["body"], 1)
        if node.get("on_error"):
            check_args(app, node["on_error"], 1)


def _check_sig_args(app: App, node: Node, prepended: int) -> None:
    for callback in [*node.get("link", ()), *node.get("link_error", ())]:
        check_args(app, callback, 1)
    task = app.tasks.get(node["name"])
    if task is None or task.signature is None:
        return
    values = [None] * (0 if node.get("imm") else prepended)
    try:
        task.signature.bind(*values, *node["args"], **node["kwargs"])
    except TypeError as exc:
        raise TypeError(f"task {node['name']}: {exc}") from None


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The call signature of a task function (None when Python cannot tell)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None
