"""Message: one task invocation, its task record, and the one decode that validates it.

A stream entry has plain fields that Lua reads (`v`, `id`, `ct`, `exp`, `r`, `cid`,
`cix`, `tail`; see contract.ENTRY_FIELDS) and one payload `m`, encoded with the content
type `ct`, that only Python reads: name, args, kwargs, per-send options, the chain
continuation and the chord a body or callback belongs to. `decode_entry` checks every
field once, so a malformed entry is dead-lettered before anything runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack  # type: ignore[import-untyped]

from . import codec
from .contract import PROTOCOL, TaskRecord
from .errors import SerializationError
from .keys import DEFAULT_PRIORITY

#: Set in opts of a message deferred by its rate limit: it holds a reserved start slot.
RATE_RESERVED = "_rate_reserved"

#: Options any `send` takes (API.md "Send options").
SEND_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "expires",
        "queue",
        "priority",
        "task_id",
        "ignore_result",
        "serializer",
        "compression",
        "soft_timeout",
        "hard_timeout",
        "max_retries",
        "retry_policy",
        "result_ttl",
        "link",
        "link_error",
    }
)


class DecodeError(SerializationError):
    """A stream entry is malformed: it is dead-lettered on its first delivery, never run."""


@dataclass(frozen=True, slots=True)
class ChordRef:
    """Where a task reports its final state: chord `id`, header position `idx`."""

    id: str
    idx: int


@dataclass(frozen=True, slots=True)
class Message:
    """One task invocation.

    `opts` holds per-send overrides of the task's run options (`soft_timeout`,
    `hard_timeout`, `max_retries`, `ignore_result`, `result_ttl`). `chain` is the rest of
    its chain (canvas nodes, see nodes.py): on success the first gets this task's result
    prepended to its args. `link` holds success callbacks, sent with the result too.
    `chord` is the chord this task (or, when it has a chain, the chain's end) reports to.
    `tail` is the id of the chain's last task, failed too when this task fails.
    `chord_body` marks a chord body (the header results are prepended). `err` is the
    failure an errback was sent for (prepended to its args).
    """

    id: str
    name: str
    args: tuple[Any, ...] | list[Any] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = DEFAULT_PRIORITY
    retries: int = 0
    opts: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None
    serializer: str = "msgpack"
    compression: str | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)
    link: list[dict[str, Any]] = field(default_factory=list)
    chord: ChordRef | None = None
    tail: str | None = None
    chord_body: str | None = None
    err: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        """The map encoded into the entry's `m` field."""
        p: dict[str, Any] = {"name": self.name, "args": list(self.args), "kwargs": self.kwargs}
        if self.opts:
            p["opts"] = self.opts
        if self.chain:
            p["chain"] = self.chain
        if self.link:
            p["link"] = self.link
        if self.chord_body:
            p["chord_body"] = self.chord_body
        return p

    def encode(self, min_size: int = 1024, max_size: int = codec.MAX_SIZE) -> tuple[bytes, str]:
        """Encode the payload.

        Raises:
            SerializationError: an argument cannot be encoded, or the body is larger
                than `max_size` bytes.
        """
        data, ct = codec.encode(self.payload(), self.serializer, self.compression, min_size)
        if len(data) > max_size:
            raise SerializationError(
                f"task {self.name} body is {len(data)} bytes, over max_message_size "
                f"({max_size} bytes)"
            )
        return data, ct

    def record(
        self,
        ttl: int,
        *,
        min_size: int = 1024,
        max_size: int = codec.MAX_SIZE,
        reply: str | None = None,
        delay_ms: int | None = None,
        errbacks: list[TaskRecord] | None = None,
        immutable: bool = False,
        err_chord: str | None = None,
    ) -> TaskRecord:
        """The task record Lua enqueues for this message (contract.TaskRecord)."""
        data, ct = self.encode(min_size, max_size)
        return TaskRecord(
            id=self.id,
            name=self.name,
            queue=self.queue,
            priority=self.priority,
            m=data,
            ct=ct,
            ttl=ttl,
            due_ms=int(self.eta * 1000) if self.eta is not None else None,
            delay_ms=delay_ms,
            exp_ms=int(self.expires * 1000) if self.expires is not None else None,
            retries=self.retries,
            chord_id=self.chord.id if self.chord else None,
            chord_idx=self.chord.idx if self.chord else None,
            tail=self.tail,
            reply=reply,
            errbacks=errbacks or [],
            immutable=immutable,
            err_chord=err_chord,
        )

    def with_retry(self, eta: float | None) -> Message:
        """The same message, to run again at `eta` as its next retry."""
        opts = {k: v for k, v in self.opts.items() if k != RATE_RESERVED}
        return replace(self, retries=self.retries + 1, eta=eta, opts=opts)

    def deferred(self, eta: float, rate_reserved: bool = True) -> Message:
        """The same message, to start at `eta` (holding the start slot it reserved under
        its rate limit, when `rate_reserved`)."""
        opts = {**self.opts, RATE_RESERVED: 1} if rate_reserved else self.opts
        return replace(self, eta=eta, opts=opts)


def check_options(options: dict[str, Any]) -> None:
    """Raise TypeError for an unknown send option, ValueError for a bad value."""
    unknown = set(options) - SEND_OPTIONS
    if unknown:
        raise TypeError(f"unknown send option(s): {', '.join(sorted(unknown))}")
    prio = options.get("priority")
    if prio is not None and not (isinstance(prio, int) and 0 <= prio <= 9):
        raise ValueError(f"priority must be an int from 0 to 9, got {prio!r}")
    for name in ("soft_timeout", "hard_timeout"):
        value = options.get(name)
        if value is not None and not _positive_number(value):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    soft, hard = options.get("soft_timeout"), options.get("hard_timeout")
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(f"soft_timeout ({soft}) must be less than hard_timeout ({hard})")


# -- decoding: every field checked once -------------------------------------------------

_EMPTY: dict[str, Any] = {}


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: Checks of the per-send run options a payload's `opts` may carry.
_OPTS: dict[str, Any] = {
    "soft_timeout": _positive_number,
    "hard_timeout": _positive_number,
    "max_retries": _count,
    "ignore_result": lambda v: isinstance(v, bool),
    "result_ttl": lambda v: _count(v) and v > 0,
    RATE_RESERVED: lambda v: v in (1, True),
}

#: Deepest canvas a chain continuation may nest.
MAX_DEPTH = 64


def _required(fields: dict[bytes, bytes], name: str) -> str:
    text = _text(fields, name)
    if text is None:
        raise DecodeError(f"entry field {name!r} is missing")
    return text


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DecodeError(f"entry field {name!r} is not UTF-8 text") from None


def _int(fields: dict[bytes, bytes], name: str) -> int | None:
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DecodeError(f"entry field {name!r} is not an integer: {raw[:40]!r}") from None


def _check_version(fields: dict[bytes, bytes]) -> None:
    raw = fields.get(b"v")
    if raw is None:
        raise DecodeError(
            f"entry has no protocol version (field 'v'; this worker speaks {PROTOCOL})"
        )
    if raw != str(PROTOCOL).encode():
        shown = raw[:20].decode(errors="replace")
        raise DecodeError(f"unknown protocol version {shown!r} (this worker speaks {PROTOCOL})")


def _check_opts(opts: Any) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise DecodeError(f"payload 'opts' must be a map, got {type(opts).__name__}")
    for key, value in opts.items():
        check = _OPTS.get(key)
        if check is None:
            raise DecodeError(f"payload 'opts' has an unknown option {key!r}")
        if not check(value):
            raise DecodeError(f"payload 'opts' has a bad value for {key!r}: {value!r:.60}")
    soft, hard = opts.get("soft_timeout"), opts.get("hard_timeout")
    if soft is not None and hard is not None and soft >= hard:
        raise DecodeError(f"payload 'opts': soft_timeout {soft} is not below hard_timeout {hard}")
    return opts


def check_node(node: Any, depth: int = 0) -> None:
    """Raise DecodeError unless `node` is a well-formed canvas node (see canvas.py)."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"canvas nested deeper than {MAX_DEPTH}")
    if not isinstance(node, dict):
        raise DecodeError(f"canvas node must be a map, got {type(node).__name__}")
    kind = node.get("t")
    if kind == "sig":
        _check_sig(node, depth)
        return
    if kind == "chord":
        if not isinstance(node.get("id"), str):
            raise DecodeError("canvas chord needs an 'id'")
        members = [*_members(node, "header"), node.get("body")]
        if node.get("on_error") is not None:
            members.append(node["on_error"])
    elif kind in ("chain", "group"):
        members = _members(node, "steps" if kind == "chain" else "tasks")
    else:
        raise DecodeError(f"unknown canvas node type {kind!r:.40}")
    for member in members:
        check_node(member, depth + 1)


def _members(node: dict[str, Any], key: str) -> list[Any]:
    members = node.get(key)
    if not isinstance(members, list):
        raise DecodeError(f"canvas {node.get('t')} needs a list {key!r}")
    return members


def _check_sig(node: dict[str, Any], depth: int) -> None:
    for key, kind in (("id", str), ("name", str), ("args", list), ("kwargs", dict), ("opts", dict)):
        if not isinstance(node.get(key), kind):
            raise DecodeError(f"canvas signature needs {key!r} as a {kind.__name__}")
    if not node["id"] or not node["name"]:
        raise DecodeError("canvas signature has an empty 'id' or 'name'")
    try:
        check_options(node["opts"])
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"canvas signature {node['name']!r:.60}: {exc}") from None
    for key in ("link", "link_error"):
        for callback in _members(node, key) if key in node else ():
            if key == "link_error" and (
                not isinstance(callback, dict) or callback.get("t") != "sig"
            ):
                raise DecodeError("canvas link_error must hold signatures")
            check_node(callback, depth + 1)


def _payload(fields: dict[bytes, bytes], ct: str, max_size: int) -> dict[str, Any]:
    data = fields.get(b"m")
    if data is None:
        raise DecodeError("entry field 'm' (the payload) is missing")
    if len(data) > max_size:
        raise DecodeError(f"payload is {len(data)} bytes, over max_message_size ({max_size})")
    try:
        p = codec.decode(data, ct, max_size)
    except SerializationError as exc:
        raise DecodeError(str(exc)) from None
    if not isinstance(p, dict):
        raise DecodeError(f"payload must be a map, got {type(p).__name__}")
    name = p.get("name")
    if not isinstance(name, str) or not name:
        raise DecodeError("payload has no task 'name'")
    args, kwargs = p.get("args", ()), p.get("kwargs", _EMPTY)
    if not isinstance(args, list | tuple):
        raise DecodeError(f"payload 'args' must be an array, got {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DecodeError("payload 'kwargs' must be a map with string keys")
    if "chord_body" in p and not isinstance(p["chord_body"], str):
        raise DecodeError("payload 'chord_body' must be a string")
    return p


def _nodes(p: dict[str, Any], key: str) -> list[dict[str, Any]]:
    nodes = p.get(key) or []
    if not isinstance(nodes, list):
        raise DecodeError(f"payload {key!r} must be an array of canvas nodes")
    for node in nodes:
        check_node(node)
    return nodes


def _err(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    raw = fields.get(b"err")
    if not raw:
        return None
    try:
        err = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise DecodeError(f"entry field 'err' is not a msgpack map: {exc}") from None
    if not isinstance(err, dict) or not all(isinstance(k, str) for k in err):
        raise DecodeError("entry field 'err' is not a msgpack map")
    return err


def decode_entry(
    fields: dict[bytes, bytes], queue: str, priority: int, max_size: int = codec.MAX_SIZE
) -> Message:
    """Rebuild and validate the Message of a stream entry read from (`queue`, `priority`).

    Raises:
        DecodeError: any field is missing, of the wrong type or out of range, the
            protocol version is unknown, or the body is over `max_size` bytes.
    """
    _check_version(fields)
    task_id, ct = _required(fields, "id"), _required(fields, "ct")
    if "\n" in task_id:
        raise DecodeError("entry field 'id' contains a newline")
    serializer, _, compression = ct.partition("+")
    p = _payload(fields, ct, max_size)
    retries, exp, cix = _int(fields, "r"), _int(fields, "exp"), _int(fields, "cix")
    cid = _text(fields, "cid")
    if (cid is None) != (cix is None) or (cix is not None and cix < 0):
        raise DecodeError("entry fields 'cid' and 'cix' must come together, cix >= 0")
    if retries is not None and retries < 0:
        raise DecodeError("entry field 'r' must not be negative")
    return Message(
        task_id,
        p["name"],
        p.get("args", ()),
        p.get("kwargs", _EMPTY),
        queue,
        priority,
        retries or 0,
        _check_opts(p["opts"]) if "opts" in p else _EMPTY,
        None,
        exp / 1000 if exp is not None else None,
        serializer,
        compression or None,
        _nodes(p, "chain"),
        _nodes(p, "link"),
        ChordRef(cid, cix) if cid is not None and cix is not None else None,
        _text(fields, "tail"),
        p.get("chord_body"),
        _err(fields),
    )


def now() -> float:
    """Wall-clock seconds since the epoch (the clock every stored timestamp uses)."""
    return time.time()
