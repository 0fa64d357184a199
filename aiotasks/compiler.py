"""Compiler: canvas nodes (see nodes.py) into finish.lua ops.

A signature becomes one `enqueue` op; its message carries the rest of its chain
(`chain`), its success callbacks (`link`) and the chord it reports to, and its record
carries its errbacks, which Lua stores with the task and enqueues once if it fails for
good. A chord becomes a `chord` op (the counter, with its body and on_error records)
plus its headers. Later steps are compiled by the worker that finishes the step before,
in the same finish.lua call that stores that step's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .contract import FOLLOW, SEND, TaskRecord, chord_op, enqueue_op, replaced_op
from .keys import shard_of
from .message import ChordRef, Message
from .nodes import (
    Node,
    canvas_shard,
    check_unpinned,
    drawing_in,
    final_id,
    final_sig,
    freeze,
    single,
)
from .task import build_message

if TYPE_CHECKING:
    from .app import App
    from .client import Client

Op = dict[str, Any]  # one finish.lua op (contract.py)


class Compiler:
    """Compiles nodes for one App and client (mode: contract.SEND or FOLLOW)."""

    def __init__(
        self, app: App, client: Client, mode: str = SEND, trace: dict[str, str] | None = None
    ) -> None:
        self.app = app
        self.client = client
        self.mode = mode
        #: The trace context its messages carry (a worker's: the running task's span);
        #: None keeps the one build_message took from the current context.
        self.trace = trace

    def ops(
        self,
        node: Node,
        *,
        prepend: Sequence[Any] = (),
        rest: Sequence[Node] = (),
        report: ChordRef | None = None,
    ) -> list[Op]:
        """Ops that start `node` with `prepend` args, then go on with the chain `rest`."""
        kind = node["t"]
        if kind == "chain":
            steps = node["steps"]
            return self.ops(steps[0], prepend=prepend, rest=[*steps[1:], *rest], report=report)
        if kind == "chord":
            return self._chord(node, prepend, rest, report)
        if kind == "group":
            ops: list[Op] = []
            for member in node["tasks"]:
                ops += self.ops(member, prepend=prepend)
            return ops
        return [enqueue_op(self.mode, self.record(node, prepend, rest, report))]

    def record(
        self,
        node: Node,
        prepend: Sequence[Any] = (),
        rest: Sequence[Node] = (),
        report: ChordRef | None = None,
        *,
        chord_body: str | None = None,
        delay_ms: int | None = None,
    ) -> TaskRecord:
        """The task record of a signature node."""
        msg, ttl = self.message(node, prepend, rest, report, chord_body=chord_body)
        s = self.app.settings
        reply = self.client.notifier.reply_channel if self.mode == SEND else None
        return msg.record(
            ttl,
            **s.encoding,
            reply=reply,
            delay_ms=delay_ms,
            errbacks=[self._errback(e) for e in node.get("link_error", ())],
        )

    def message(
        self,
        node: Node,
        prepend: Sequence[Any],
        rest: Sequence[Node],
        report: ChordRef | None,
        **extra: Any,
    ) -> tuple[Message, int]:
        """The Message of a signature node, and its record's ttl."""
        args = list(node["args"]) if node.get("imm") else [*prepend, *node["args"]]
        msg, ttl = build_message(
            self.app,
            node["name"],
            args,
            node["kwargs"],
            {**node["opts"], "task_id": node["id"]},
            self.app.tasks.get(node["name"]),
        )
        msg = replace(
            msg,
            chain=list(rest),
            link=list(node.get("link", ())),
            chord=report,
            tail=final_id({"t": "chain", "steps": list(rest)}) if rest else None,
            **extra,
        )
        if self.trace is not None:
            msg = replace(msg, trace=self.trace)
        return msg, ttl

    def _errback(self, node: Node) -> TaskRecord:
        # Stored with the task: Lua enqueues it, with the failure as its first argument
        # unless it is immutable, when the task fails for good.
        msg, ttl = self.message(node, (), (), None)
        s = self.app.settings
        return msg.record(
            ttl,
            **s.encoding,
            immutable=bool(node.get("imm")),
            err_chord=node.get("ecid"),
        )

    def _chord(
        self, node: Node, prepend: Sequence[Any], rest: Sequence[Node], report: ChordRef | None
    ) -> list[Op]:
        cid, header, body = node["id"], node["header"], node["body"]
        if not header:
            return self.ops(body, prepend=[[]], rest=rest, report=report)
        body_rest = list(rest)
        if body["t"] == "chain":
            body_rest = [*body["steps"][1:], *body_rest]
            body = body["steps"][0]
        # The body's countdown counts from when its headers are done (as a chain step's
        # does from the step before); an eta stays the time it names.
        opts = body["opts"]
        countdown = opts.get("countdown") if opts.get("eta") is None else None
        if countdown:
            body = {**body, "opts": {k: v for k, v in opts.items() if k != "countdown"}}
        body_record = self.record(
            body,
            (),
            body_rest,
            report,
            # An immutable body (`.si`) does not get the header results.
            chord_body=None if body.get("imm") else cid,
            delay_ms=int(float(countdown) * 1000) if countdown else None,
        )
        on_error = self._errback(node["on_error"]) if node.get("on_error") else None
        ops: list[Op] = [chord_op(cid, body_record.ttl, len(header), body_record, on_error)]
        for idx, member in enumerate(header):
            ops += self.ops(member, prepend=prepend, report=ChordRef(cid, idx))
        return ops


def continuation(
    app: App, client: Client, msg: Message, value: Any, trace: dict[str, str] | None = None
) -> list[Op]:
    """Ops that start the next step of `msg`'s chain, and its callbacks, with `value`
    (carrying `trace`, the finished run's context, when tracing)."""
    compiler = Compiler(app, client, FOLLOW, trace)
    ops: list[Op] = []
    if msg.chain:
        nxt, *rest = msg.chain
        ops += compiler.ops(nxt, prepend=[value], rest=rest, report=msg.chord)
    for callback in msg.link:
        ops += compiler.ops(callback, prepend=[value])
    return ops


def replacement(
    app: App, client: Client, msg: Message, canvas: Any, trace: dict[str, str] | None = None
) -> list[Op]:
    """Ops that replace the task of `msg` by `canvas`: its final task takes the task's id,
    callbacks, chord and chain continuation (errbacks stay stored with the id)."""
    # The replacement's ids are drawn in the replaced task's shard (this finish call's).
    shards = app.settings.shards
    # Send options set on the canvas (`chain(...).set(link=...)`) apply as at a send.
    own = dict(getattr(canvas, "_own_options", None) or {})
    with drawing_in(shard_of(msg.id, shards), shards):
        node = single(freeze(canvas, own, app, shard=shard_of(msg.id, shards)), app)
    if shards > 1:  # refused as a send would be: the replaced task fails with the reason
        check_unpinned(app, node)
        if canvas_shard(node, shards) != shard_of(msg.id, shards):
            raise ValueError(
                f"the replacement of task {msg.id} names task ids outside its shard "
                f"({shards} shards): leave task_id out of it"
            )
    final = final_sig(node)
    assert final is not None, "single() leaves one final task"
    final["id"] = msg.id
    if msg.link:
        final["link"] = [*final.get("link", ()), *msg.link]
    compiler = Compiler(app, client, FOLLOW, trace)
    return [replaced_op(msg.id), *compiler.ops(node, rest=msg.chain, report=msg.chord)]
