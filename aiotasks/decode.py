"""Decoding a stream entry into a Message, checking every field once.

Anything malformed (a field's type or range, a canvas node's shape, an option, the
protocol version, the size before or after decompression) raises DecodeError, and the
worker dead-letters the entry on its first delivery, before anything runs. Nothing that
passes here can fail later for its shape: the canvas nodes a message carries are
checked in the shapes `nodes.freeze()` produces.
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from . import codec
from .contract import PROTOCOL
from .errors import SerializationError, SignatureError
from .message import (
    MAX_COUNT,
    MAX_SECONDS,
    RATE_RESERVED,
    ChordRef,
    Message,
    check_options,
    count,
    earlier_deliveries,
    positive_number,
)
from .signing import verify

__all__ = ["DecodeError", "check_node", "decode_entry"]


class DecodeError(SerializationError):
    """A stream entry is malformed: it is dead-lettered on its first delivery, never run."""


_EMPTY: dict[str, Any] = {}

#: The fields every entry has (v, id, ct, m): more means optional ones to read.
_PLAIN = 4

#: Largest integer an entry field may hold: exact as a Lua number (a double).
MAX_INT = 2**53

#: Checks of the per-send run options a payload's `opts` may carry.
_OPTS: dict[str, Any] = {
    "soft_timeout": positive_number,
    "hard_timeout": positive_number,
    "max_retries": count,
    "ignore_result": lambda v: isinstance(v, bool),
    "result_ttl": lambda v: count(v, MAX_SECONDS) and v > 0,
    RATE_RESERVED: lambda v: v in (1, True),
}

#: Deepest canvas a message may carry.
MAX_DEPTH = 64

#: Which node types may stand where (nodes.freeze() produces only these shapes).
_ALLOWED = {
    "step": ("sig", "chord"),  # a chain step, or an item of a message's `chain`
    "member": ("sig", "chain", "chord"),  # a group member or a chord header
    "callback": ("sig", "chain", "chord", "group"),  # a `link`
    "errback": ("sig",),  # a `link_error`, a chord's on_error
    "body": ("sig", "chain"),  # a chord body (a chain must start with a signature)
}


def _text(fields: dict[bytes, bytes], name: str) -> str | None:
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise DecodeError(f"entry field {name!r} is not UTF-8 text") from None


def _required(fields: dict[bytes, bytes], name: str) -> str:
    text = _text(fields, name)
    if text is None:
        state = "empty" if fields.get(name.encode()) == b"" else "missing"
        raise DecodeError(f"entry field {name!r} is {state}")
    return text


def _int(fields: dict[bytes, bytes], name: str, low: int = 0) -> int | None:
    raw = fields.get(name.encode())
    if raw is None or raw == b"":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise DecodeError(f"entry field {name!r} is not an integer: {raw[:40]!r}") from None
    if not low <= value <= MAX_INT:
        raise DecodeError(f"entry field {name!r} is out of range: {value}")
    return value


_VERSION = str(PROTOCOL).encode()


def _check_version(fields: dict[bytes, bytes]) -> None:
    raw = fields.get(b"v")
    if raw is None:
        raise DecodeError(
            f"entry has no protocol version (field 'v'; this worker speaks {PROTOCOL})"
        )
    if raw != _VERSION:
        shown = raw[:20].decode(errors="replace")
        raise DecodeError(f"unknown protocol version {shown!r} (this worker speaks {PROTOCOL})")


def _check_opts(opts: Any) -> dict[str, Any]:
    if not isinstance(opts, dict):
        raise DecodeError(f"payload 'opts' must be a map, got {type(opts).__name__}")
    for key, value in opts.items():
        check = _OPTS.get(key)
        if check is None:
            raise DecodeError(f"payload 'opts' has an unknown option {key!r:.60}")
        if not check(value):
            raise DecodeError(f"payload 'opts' has a bad value for {key!r}: {value!r:.60}")
    soft, hard = opts.get("soft_timeout"), opts.get("hard_timeout")
    if soft is not None and hard is not None and soft >= hard:
        raise DecodeError(f"payload 'opts': soft_timeout {soft} is not below hard_timeout {hard}")
    return opts


def check_node(node: Any, role: str = "callback", depth: int = 0) -> None:
    """Raise DecodeError unless `node` is a well-formed canvas node for its `role`."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"canvas nested deeper than {MAX_DEPTH}")
    if not isinstance(node, dict):
        raise DecodeError(f"canvas node must be a map, got {type(node).__name__}")
    kind = node.get("t")
    if kind not in _ALLOWED[role]:
        raise DecodeError(f"canvas node {kind!r:.40} cannot stand as a {role}")
    if kind == "sig":
        _check_sig(node, depth)
        return
    for member, member_role in _children(node, role):
        check_node(member, member_role, depth + 1)


def _children(node: dict[str, Any], role: str) -> list[tuple[Any, str]]:
    """The nodes inside a chain, group or chord, with the role each must fit."""
    kind = node["t"]
    if kind == "chain":
        steps = _members(node, "steps")
        if role == "body" and not (isinstance(steps[0], dict) and steps[0].get("t") == "sig"):
            raise DecodeError("a chord body chain must start with a signature")
        return [(step, "step") for step in steps]
    if kind == "group":
        return [(m, "member") for m in _members(node, "tasks", allow_empty=True)]
    if not isinstance(node.get("id"), str) or not node["id"]:
        raise DecodeError("canvas chord needs an 'id'")
    children = [(m, "member") for m in _members(node, "header", allow_empty=True)]
    children.append((node.get("body"), "body"))
    if node.get("on_error") is not None:
        children.append((node["on_error"], "errback"))
    return children


def _members(node: dict[str, Any], key: str, allow_empty: bool = False) -> list[Any]:
    members = node.get(key)
    if not isinstance(members, list) or not (members or allow_empty):
        raise DecodeError(f"canvas {node.get('t')} needs a non-empty list {key!r}")
    return members


def _check_sig(node: dict[str, Any], depth: int) -> None:
    for key, kind in (("id", str), ("name", str), ("args", list), ("kwargs", dict), ("opts", dict)):
        if not isinstance(node.get(key), kind):
            raise DecodeError(f"canvas signature needs {key!r} as a {kind.__name__}")
    if not node["id"] or not node["name"] or "\n" in node["id"]:
        raise DecodeError("canvas signature has an empty or malformed 'id' or 'name'")
    if not all(isinstance(k, str) for k in node["kwargs"]):
        raise DecodeError("canvas signature 'kwargs' must have string keys")
    try:
        check_options(node["opts"], sending=False)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"canvas signature {node['name']!r:.60}: {exc}") from None
    for callback in _members(node, "link") if "link" in node else ():
        check_node(callback, "callback", depth + 1)
    for errback in _members(node, "link_error") if "link_error" in node else ():
        check_node(errback, "errback", depth + 1)


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
    return _shape(p)


def checked_payload(p: Any) -> dict[str, Any]:
    """A decoded payload, checked as a worker checks it before running it, canvas and
    options included (what a page says of a dead letter).

    Raises:
        DecodeError: naming what is wrong.
    """
    checked = _shape(p)
    if "opts" in checked:
        _check_opts(checked["opts"])
    _nodes(checked, "chain", "step")
    _nodes(checked, "link", "callback")
    return checked


def _shape(p: Any) -> dict[str, Any]:
    if not isinstance(p, dict):
        raise DecodeError(f"payload must be a map, got {type(p).__name__}")
    name = p.get("name")
    if not isinstance(name, str) or not name:
        wrong = f"'name' must be a non-empty string, got {name!r:.60}"
        raise DecodeError(f"payload {wrong if name is not None else 'has no task name'}")
    args, kwargs = p.get("args", ()), p.get("kwargs", _EMPTY)
    if not isinstance(args, list | tuple):
        raise DecodeError(f"payload 'args' must be an array, got {type(args).__name__}")
    if not isinstance(kwargs, dict) or (kwargs and not all(isinstance(k, str) for k in kwargs)):
        raise DecodeError("payload 'kwargs' must be a map with string keys")
    if "chord_body" in p and not isinstance(p["chord_body"], str):
        raise DecodeError("payload 'chord_body' must be a string")
    trace = p.get("trace")
    if trace is not None and not (
        isinstance(trace, dict)
        and len(trace) <= 8
        and all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= 512 for k, v in trace.items()
        )
    ):
        raise DecodeError("payload 'trace' must be a small map of strings (W3C trace context)")
    return p


def _nodes(p: dict[str, Any], key: str, role: str) -> list[dict[str, Any]]:
    if key not in p:
        return []
    nodes = p[key]
    if not isinstance(nodes, list):
        raise DecodeError(f"payload {key!r} must be an array of canvas nodes")
    for node in nodes:
        check_node(node, role)
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
    fields: dict[bytes, bytes],
    queue: str,
    priority: int,
    max_size: int = codec.MAX_SIZE,
    keys: tuple[bytes, ...] = (),
) -> Message:
    """Rebuild and validate the Message of a stream entry read from (`queue`, `priority`).

    Raises:
        SignatureError: `keys` are given and the entry is not signed with one of them.
        DecodeError: any field is missing, of the wrong type or out of range, the
            protocol version is unknown, or the body is over `max_size` bytes.
    """
    _check_version(fields)
    if keys and not verify(keys, fields):
        given = "no signature" if not fields.get(b"sig") else "a signature no key matches"
        raise SignatureError(f"the message has {given}: refused unrun")
    raw_id, raw_ct = fields.get(b"id"), fields.get(b"ct")
    if raw_id and raw_ct and raw_id.isascii() and raw_ct.isascii():  # the common case, quick
        task_id, ct = raw_id.decode(), raw_ct.decode()
    else:
        task_id, ct = _required(fields, "id"), _required(fields, "ct")
    if "\n" in task_id:
        raise DecodeError("entry field 'id' contains a newline")
    serializer, _, compression = ct.partition("+")
    p = _payload(fields, ct, max_size)
    retries = exp = cix = None
    cid = tail = None
    if len(fields) > _PLAIN:  # the optional fields: most entries have none
        retries, exp, cix = _int(fields, "r"), _int(fields, "exp"), _int(fields, "cix")
        cid, tail = _text(fields, "cid"), _text(fields, "tail")
        if (cid is None) != (cix is None):
            raise DecodeError("entry fields 'cid' and 'cix' must come together")
        if retries is not None and retries > MAX_COUNT:
            raise DecodeError(f"entry field 'r' is out of range: {retries}")
        before = fields.get(b"dl")
        if before is not None and earlier_deliveries(before) is None:
            raise DecodeError(f"entry field 'dl' must be a whole number 0..{MAX_COUNT}")
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
        _nodes(p, "chain", "step"),
        _nodes(p, "link", "callback"),
        ChordRef(cid, cix) if cid is not None and cix is not None else None,
        tail,
        p.get("chord_body"),
        _err(fields) if b"err" in fields else None,
        p.get("trace"),
    )
