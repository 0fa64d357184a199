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
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .contract import COLLECT, GATHER  # the built-in tasks gathering results
from .keys import new_id, shard_of
from .message import check_options

if TYPE_CHECKING:
    from .app import App
    from .task import Task

Node = dict[str, Any]


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
        "id": opts.pop("task_id", None) or canvas_id(),
        "name": name,
        "args": list(args),
        "kwargs": dict(kwargs or {}),
    }
    links = [_callback(x) for x in as_list(opts.pop("link", None))]
    errbacks = [_errback(x) for x in as_list(opts.pop("link_error", None))]
    check_options(opts)
    node["opts"] = opts
    if immutable:
        node["imm"] = True
    if links:
        node["link"] = links
    if errbacks:
        node["link_error"] = errbacks
    return node


#: While a canvas freezes with several shards: (its shard, the shard count). Every id it
#: draws lands in that shard, so a chord's counter, its headers and its body, a chain's
#: steps and their callbacks all meet in one atomic script call.
_SHARD: ContextVar[tuple[int, int] | None] = ContextVar("aiotasks_canvas_shard", default=None)
#: While freeze() looks for the ids a canvas was given: the ids it drew itself.
_DRAWN: ContextVar[set[str] | None] = ContextVar("aiotasks_canvas_drawn", default=None)


def canvas_id() -> str:
    """A new id for a node of the canvas being frozen (in its shard, see `_SHARD`)."""
    where = _SHARD.get()
    task_id = new_id(where[1], where[0]) if where is not None else new_id()
    drawn = _DRAWN.get()
    if drawn is not None:
        drawn.add(task_id)
    return task_id


def freeze(
    canvas: Any,
    options: dict[str, Any] | None = None,
    app: App | None = None,
    *,
    shard: int | None = None,
    drawn: set[str] | None = None,
) -> Node:
    """The canvas as runnable nodes, with send `options` applied the way Celery does.

    With several shards, every id it draws is in one shard: `shard`, else that of an id
    the canvas was given (its `task_id` option, or one set on a signature), else a
    random one (see `canvas_shard`). `drawn` collects the ids it drew (not given).
    """
    shards = app.settings.shards if app is not None else 1
    if shards <= 1:
        return _freeze(canvas, options, app)
    if shard is None:
        assert app is not None  # several shards come from an App's settings
        shard = _given_shard(canvas, options, app, shards)
    token = _DRAWN.set(drawn)
    try:
        with drawing_in(shard, shards):
            return _freeze(canvas, options, app)
    finally:
        _DRAWN.reset(token)


def _given_shard(canvas: Any, options: dict[str, Any] | None, app: App, shards: int) -> int:
    """The shard of the first id given in the canvas, else a random one (freezing it once
    to find them costs a canvas sent with several shards a second freeze)."""
    drawn: set[str] = set()
    token = _DRAWN.set(drawn)
    try:
        probe = _freeze(canvas, options, app)
    finally:
        _DRAWN.reset(token)
    given = (str(n["id"]) for n in _with_ids(probe) if n["id"] not in drawn)
    first = (options or {}).get("task_id") or next(given, None)
    return shard_of(str(first), shards) if first else shard_of(new_id(), shards)


@contextmanager
def drawing_in(shard: int, shards: int) -> Iterator[None]:
    """Within the block, canvas nodes made (freeze, single) draw their ids in `shard`."""
    token = _SHARD.set((shard, shards) if shards > 1 else None)
    try:
        yield
    finally:
        _SHARD.reset(token)


def canvas_shard(node: Node, shards: int) -> int:
    """The one shard of a frozen canvas's ids.

    Raises:
        ValueError: ids given with `task_id` on its tasks are in different shards.
    """
    found = {shard_of(str(n["id"]), shards) for n in _with_ids(node)}
    if len(found) > 1:
        raise ValueError(
            f"with {shards} shards, the ids given to a canvas's tasks (task_id) must all "
            "be in one shard (aiotasks.keys.shard_of): leave them out, or give only the "
            "final task's"
        )
    return found.pop() if found else 0


def pinned_task(app: App, node: Node) -> Task[Any, Any] | None:
    """The task of a signature node when it has a concurrency limit or debounce."""
    task = app.tasks.get(str(node.get("name")))
    if task is not None and (task.opts.concurrency_limit or task.opts.debounce):
        return task
    return None


def check_unpinned(app: App, node: Node) -> None:
    """With several shards, refuse a canvas holding a task with a concurrency limit or
    debounce: its key's shard is known only once its arguments are (a chain step gets the
    step before's result), and the canvas's ids are all in one shard.

    Raises:
        ValueError: naming the task.
    """
    for n in _with_ids(node):
        task = pinned_task(app, n) if n["t"] == "sig" else None
        if task is not None:
            raise ValueError(
                f"{task.name} has a concurrency limit or debounce, so with "
                f"{app.settings.shards} shards it can be sent on its own or as a plain "
                "member of a group, but not in a chain, chord or callback: see the "
                "README's 'Scaling out'"
            )


def check_debounced(app: App, node: Node) -> None:
    """Refuse a debounced task where a later send could supersede it while something
    waits on it: a chain step, a chord header or body, a callback, or a task with
    callbacks (the superseded send's canvas would never go on). It is sent on its own or
    as a plain member of a group.

    Raises:
        ValueError: naming the task.
    """
    for top in node["tasks"] if node["t"] == "group" else [node]:
        if top["t"] == "sig" and not top.get("link") and not top.get("link_error"):
            continue
        for n in _with_ids(top):
            task = app.tasks.get(str(n.get("name"))) if n["t"] == "sig" else None
            if task is not None and task.opts.debounce:
                raise ValueError(
                    f"{task.name} is debounced, so it can be sent on its own or as a plain "
                    "member of a group, but not in a chain, chord or callback, nor with "
                    "callbacks of its own: a later send would supersede it, and what waits "
                    "on it would never hear"
                )


#: Where a node holds other nodes (never its arguments: those are the user's data).
_CHILDREN = ("header", "body", "tasks", "steps", "link", "link_error", "on_error")


def _with_ids(node: Node | None) -> Iterator[Node]:
    """Every signature and chord node of a canvas, callbacks and errbacks included."""
    if not isinstance(node, dict):
        return
    if node.get("t") in ("sig", "chord"):
        yield node
    for part in _CHILDREN:
        child = node.get(part)
        for sub in child if isinstance(child, list) else [child]:
            yield from _with_ids(sub)


def _freeze(canvas: Any, options: dict[str, Any] | None, app: App | None) -> Node:
    options = dict(options or {})
    shaping = {k: options.pop(k) for k in CANVAS_OPTIONS if k in options}
    check_options(options)
    root = _normalize(node(canvas, options, top=True), app)
    first = {k: shaping[k] for k in ("countdown", "eta") if k in shaping}
    if first:
        for sig in _starting(root):
            sig["opts"].update(first)
    root = _attach_links(root, [_callback(x) for x in as_list(shaping.get("link"))], app)
    for errback in [_errback(x) for x in as_list(shaping.get("link_error"))]:
        for sig in sigs(root):
            sig.setdefault("link_error", []).append(errback)
    if shaping.get("task_id"):
        final = final_sig(root)
        if final is not None:
            final["id"] = str(shaping["task_id"])
    _check_unique_ids(root)
    return root


def _tasks_of(node: Node | None) -> Iterator[Node]:
    """The signature nodes a canvas runs as its own steps (not its callbacks, which may
    be one task shared by several: sent once)."""
    if not isinstance(node, dict):
        return
    if node.get("t") == "sig":
        yield node
    for part in ("header", "body", "tasks", "steps"):
        child = node.get(part)
        for sub in child if isinstance(child, list) else [child]:
            yield from _tasks_of(sub)


def _check_unique_ids(root: Node) -> None:
    """Refuse two tasks of one canvas with the same id: the second would be taken for
    the first (dedup) and silently skipped. A callback shared by several tasks is one
    task, once."""
    seen: dict[str, Node] = {}
    for n in _tasks_of(root):
        first = seen.setdefault(str(n["id"]), n)
        if first is not n:
            raise ValueError(
                f"task id {n['id']!r} is given to two tasks of this canvas "
                f"({first['name']} and {n['name']}): each task needs its own"
            )


def as_list(value: Any) -> list[Any]:
    """An option that takes one or several values (`link`), as a list."""
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


def node(c: Any, shared: dict[str, Any], *, top: bool = False) -> Node:
    """Nodes for a canvas as the user wrote it (before `_normalize`): each signature,
    chain, group and chord freezes itself (`_freeze`), with `shared` send options.
    `top`: the canvas being sent, whose own send options were merged into `shared`."""
    if not is_canvas(c):
        raise TypeError(f"not a signature or canvas: {c!r}")
    own = getattr(c, "_own_options", None)  # a chain's, group's or chord's set()
    if own and not top:
        raise ValueError(
            f"send options set on a {type(c).__name__} inside another canvas "
            f"({', '.join(sorted(own))}) are not applied there: set them on the canvas "
            "you send, or on its tasks"
        )
    frozen: Node = c._freeze(shared)
    return frozen


def chord_node(header: list[Any], body: Any, on_error: Any, shared: dict[str, Any]) -> Node:
    """The node of a chord as written."""
    error_node = node(on_error, {}) if on_error is not None else None
    if error_node is not None and error_node["t"] != "sig":
        raise TypeError(f"chord on_error must be a signature, got {type(on_error).__name__}")
    return {
        "t": "chord",
        "id": canvas_id(),
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
            # A chord one writes: a failed header fails it with ChordError (GATHER, not
            # COLLECT, tells Lua so), whatever canvas its body is.
            gather = collect(app, body, GATHER)
            body = _normalize({"t": "chain", "steps": [gather, body]}, app)
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
                    "id": canvas_id(),
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
            "id": canvas_id(),
            "header": node["tasks"],
            "body": collect(app, node),
            "on_error": None,
        },
        app,
    )


def _starts_with_sig(node: Node) -> bool:
    first = node["steps"][0] if node["t"] == "chain" else node
    return bool(first["t"] == "sig")


def collect(app: App | None, near: Node, name: str = COLLECT) -> Node:
    """A COLLECT (or GATHER) step, on the queue of the tasks it follows (so the same
    workers run it)."""
    opts: dict[str, Any] = {}
    first = next(sigs(near), None)
    if first is not None:
        queue = first["opts"].get("queue")
        if queue is None and app is not None:
            task = app.tasks.get(first["name"])
            queue = (task.opts.queue if task else None) or app.route(first["name"])
        if queue:
            opts["queue"] = queue
    return sig_node(name, (), {}, opts)


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
            "id": canvas_id(),
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
    if task is not None:
        values = [None] * (0 if node.get("imm") else prepended)
        task.check_args([*values, *node["args"]], node["kwargs"])


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The call signature of a task function (None when Python cannot tell)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None
