"""The contract between Python and Lua: every record that crosses the boundary, by name.

Scripts receive batches as one msgpack argument; Redis' `cmsgpack.unpack` turns each
map below into a Lua table, read by field name (`t.id`, `op.state`). Nothing crossing
the boundary is positional but one thing on the hot path, each side's layout declared in
one place: a done op (done_op, read by finish.lua's flat_done), whose table per op cost
Redis a sixth of a finish call. `lua/_contract.lua` is generated from this module and
`keys.LAYOUT` (`python -m aiotasks.contract --write`; a test checks
that it is current), so both languages share one definition of the key names, the
protocol version and the stream entry fields.

A **task record** (`TaskRecord.wire()`) is one task to put on a stream or in the
delayed set; scripts store it whole (`_rec` of a scheduled task, `body`/`on_error` of a
chord) and enqueue it later. A **stream entry** carries the record's `ENTRY_FIELDS`.
An **op** is one step of a finish.lua batch. See docs/protocol.md for every field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .keys import GROUP, lua_functions

#: Version of this contract, written in every stream entry (field `v`). A worker meeting
#: a version it does not know dead-letters the entry as DecodeError.
PROTOCOL = 2

#: How scripts publish notifications, as `_contract.lua` spells it; on a Cluster the
#: scripts are loaded with SHARDED_PUBLISH instead (see scripts.py).
PUBLISH = "PUBLISH"
SHARDED_PUBLISH = "SPUBLISH"

#: The built-in task that returns its first argument: a group followed by anything (or
#: nested) runs as a chord whose body is this task, gathering the results into a list.
#: A member's failure fails it as the member failed (not as ChordError), as in Celery.
COLLECT = "aiotasks.collect"
#: The built-in task passing a chord's header results on to a body that is a canvas (a
#: group, a chord): as COLLECT, but its chord fails with ChordError, as chords one writes do.
GATHER = "aiotasks.gather"
#: The built-in tasks of Celery's `task.map(items)` and `task.starmap(items)`: called as
#: (task name, items), each calls that task on every item in turn (maps.py).
MAP = "aiotasks.map"
STARMAP = "aiotasks.starmap"

#: Fields of a stream entry, in the order Lua writes them. Lua reads them by name.
ENTRY_FIELDS = ("v", "id", "ct", "m", "exp", "r", "cid", "cix", "tail", "err", "sig")

#: The entry fields a signature covers, in order (see signing.py).
SIGNED_FIELDS = ("v", "id", "ct", "m", "exp", "r", "cid", "cix", "tail")

#: Enqueue modes (see enqueue_task in _lib.lua).
SEND, FOLLOW, RETRY, DEFER = "send", "follow", "retry", "defer"

# Maps go to Lua with the old msgpack raw type for bytes: cmsgpack wants strings.
_packer = msgpack.Packer(use_bin_type=False)


def pack(value: Any) -> bytes:
    """Encode a record or a batch for a script's `cmsgpack.unpack`."""
    return _packer.pack(value)  # type: ignore[no-any-return]


def unpack_reply(data: bytes) -> Any:
    """Decode a script's `cmsgpack.pack` reply (strings stay bytes)."""
    return msgpack.unpackb(data, raw=True, strict_map_key=False)


# Not frozen: a frozen dataclass sets its fields through object.__setattr__, and
# that __init__ costs ~2 µs on the send path. Nothing mutates one after it is built.
@dataclass(slots=True)
class TaskRecord:
    """One task for enqueue_task (Lua): what goes on its stream entry, and its record.

    `due_ms` keeps it in the delayed set until then; `delay_ms` (a chord body's
    countdown) counts from when the script enqueues it. `ttl` is the seconds its task
    hash lives; `reply` the sender's reply channel. `errbacks` are records Lua stores
    with the task and enqueues if it fails for good, each with the failure in its entry
    field `err` unless `immutable`; `err_chord` adds a chord id to that failure.
    `debounce`: a key; the record supersedes a still-scheduled one of the same key.
    """

    id: str
    name: str
    queue: str
    priority: int
    m: bytes
    ct: str
    ttl: int
    due_ms: int | None = None
    delay_ms: int | None = None
    exp_ms: int | None = None
    retries: int = 0
    chord_id: str | None = None
    chord_idx: int | None = None
    tail: str | None = None
    reply: str | None = None
    errbacks: list[TaskRecord] = field(default_factory=list)
    immutable: bool = False
    err_chord: str | None = None
    debounce: str | None = None
    sig: str | None = None

    def _rare(self, w: dict[str, Any]) -> None:
        """The fields only errbacks and debounced sends carry."""
        if self.errbacks:
            w["eb"] = [e.wire() for e in self.errbacks]
        if self.immutable:
            w["imm"] = 1
        if self.err_chord:
            w["ecid"] = self.err_chord
        if self.debounce:
            w["db"] = self.debounce

    def wire(self) -> dict[str, Any]:
        """The record as the map Lua reads (absent fields are left out)."""
        w: dict[str, Any] = {
            "v": PROTOCOL,
            "id": self.id,
            "name": self.name,
            "queue": self.queue,
            "priority": self.priority,
            "m": self.m,
            "ct": self.ct,
            "ttl": self.ttl,
        }
        if self.due_ms is not None:
            w["due"] = self.due_ms
        if self.delay_ms is not None:
            w["delay"] = self.delay_ms
        if self.exp_ms is not None:
            w["exp"] = self.exp_ms
        if self.retries:
            w["r"] = self.retries
        if self.chord_id is not None:
            w["cid"], w["cix"] = self.chord_id, self.chord_idx
        if self.tail:
            w["tail"] = self.tail
        if self.reply:
            w["reply"] = self.reply
        if self.errbacks or self.immutable or self.err_chord or self.debounce:
            self._rare(w)
        if self.sig is not None:
            w["sig"] = self.sig
        return w


# -- finish.lua ops ----------------------------------------------------------------------


#: A finish.lua op: a map naming its `op`, or a done op in its flat form (done_op).
Op = Mapping[str, Any] | tuple[Any, ...]


def done_op(
    stream: str,
    entry: bytes,
    task_id: str,
    state: str,
    ttl: int,
    fields: dict[str, Any] | list[Any],
    *,
    ignore_result: bool = False,
    linked: bool = False,
    chord: tuple[str, int] | None = None,
    tail: str | None = None,
    chord_value: bytes | None = None,
    slot: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Store a run's final state and `fields` (a map, or flat: name, value, ...; no
    None values in a flat one), ack the entry, settle what depends on it.

    `linked`: a chain goes on from this task (its chord reports through the chain's
    last step). `chord_value`: the result as the chord body will read it.

    In finish.lua's flat form, which wire_ops puts inline in the batch: stream, entry,
    id, state, ttl, flags (1 ignore_result, 2 linked), cid, cix, tail, value, slot (each
    False when absent), the fields' count, the fields. A map per done op cost Redis a
    sixth of a finish call to unpack into Lua tables (a map, and its fields' array).
    """
    # Flat (name, value, ...): finish.lua hands them to HSET as they are. None is left
    # out: it would end the array.
    flat = (
        fields
        if isinstance(fields, list)
        else [x for k, v in fields.items() if v is not None for x in (k, v)]
    )
    cid, cix = chord if chord is not None else (False, False)
    return (
        stream,
        entry,
        task_id,
        state,
        ttl,
        ignore_result + 2 * linked,
        cid,
        cix,
        tail or False,
        False if chord_value is None else chord_value,
        False if slot is None else slot,
        len(flat),
        *flat,
    )


def wire_ops(ops: Iterable[Op]) -> list[Any]:
    """A batch of ops as finish.lua takes it: done ops inline, any other as its map."""
    out: list[Any] = []
    for op in ops:
        if type(op) is tuple:
            out += op
        else:
            out.append(op)
    return out


def ack_op(
    stream: str, entry: bytes, task_id: str = "", slot: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Ack and delete an entry whose task goes on elsewhere (a retry, a deferral),
    giving back the concurrency `slot` ({key, limit, lease}) it held."""
    op: dict[str, Any] = {"op": "ack", "stream": stream, "entry": entry}
    if slot is not None:
        op["id"], op["slot"] = task_id, slot
    return op


def wait_op(
    stream: str,
    entry: bytes,
    task_id: str,
    key: str,
    limit: int,
    lease_ms: int,
    deliveries: int = 1,
) -> dict[str, Any]:
    """Park an entry over its key's concurrency limit until a slot frees. `deliveries`:
    the task's deliveries so far, this one included (the new entry carries the others)."""
    return {
        "op": "wait",
        "stream": stream,
        "entry": entry,
        "id": task_id,
        "key": key,
        "limit": limit,
        "lease": lease_ms,
        "deliveries": deliveries,
    }


def dead_op(
    stream: str,
    entry: bytes,
    task_id: str,
    queue: str,
    exc_type: str,
    exc_message: str,
    ttl: int,
    fields: dict[bytes, bytes],
) -> dict[str, Any]:
    """Move an entry that must not run to its queue's dead letters and fail its task.

    `fields` are the entry's fields as the worker read them: Lua uses them when the
    entry is gone from its stream meanwhile.
    """
    return {
        "op": "dead",
        "stream": stream,
        "entry": entry,
        "id": task_id,
        "queue": queue,
        "exc_type": exc_type,
        "exc_message": exc_message,
        "ttl": ttl,
        "fields": fields,
    }


def enqueue_op(mode: str, record: TaskRecord) -> dict[str, Any]:
    """Enqueue one task record (mode: SEND, FOLLOW, RETRY or DEFER)."""
    return {"op": "enqueue", "mode": mode, "task": record.wire()}


def chord_op(
    chord_id: str, ttl: int, size: int, body: TaskRecord, on_error: TaskRecord | None
) -> dict[str, Any]:
    """Create a chord's counter; the last of its `size` headers enqueues `body`."""
    op: dict[str, Any] = {"op": "chord", "id": chord_id, "ttl": ttl, "n": size}
    op["body"] = body.wire()
    if on_error is not None:
        op["on_error"] = on_error.wire()
    return op


def replaced_op(task_id: str) -> dict[str, Any]:
    """Mark a running task as replaced: the replacement's final task takes its id."""
    return {"op": "replaced", "id": task_id}


def entry_ref(
    stream: str, entry: bytes, task_id: str = "", slot: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An entry this worker holds, for start/heartbeat/release (with the concurrency
    slot its task holds, whose lease the heartbeat renews)."""
    ref: dict[str, Any] = {"stream": stream, "entry": entry}
    if slot is not None:
        ref["id"], ref["slot"] = task_id, slot
    return ref


def lua_source() -> str:
    """`lua/_contract.lua`: key builders, protocol version and entry fields for Lua."""
    fields = ", ".join(f"'{f}'" for f in ENTRY_FIELDS)
    lines = [
        "-- GENERATED from aiotasks/contract.py and keys.py; do not edit. Regenerate with",
        "--   python -m aiotasks.contract --write",
        "-- Every script takes the key prefix, e.g. '{aiotasks}:', as KEYS[1] and the guard",
        "-- key (P .. 'guard', see keys.Keys.guard) as KEYS[2]; K.<kind>(...) builds a key or",
        "-- channel name exactly as aiotasks.keys.Keys does in Python.",
        "-- P: the key prefix, KEYS[1], set by begin() (_lib.lua) as every call starts.",
        "local P",
        "-- The publish command: scripts.py makes it SPUBLISH on a Cluster (sharded pub/sub).",
        f"local PUBLISH = '{PUBLISH}'",
        f"local GROUP = '{GROUP}'",
        f"local PROTOCOL = {PROTOCOL}",
        f"local ENTRY_FIELDS = {{{fields}}}",
        "-- The built-in task gathering a group's results (contract.COLLECT).",
        f"local COLLECT = '{COLLECT}'",
        *lua_functions(),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    # --write, not a shell redirect: `>` empties the file before this module (which the
    # package imports, scripts and all) is read.
    if sys.argv[1:] == ["--write"]:
        (Path(__file__).parent / "lua" / "_contract.lua").write_text(lua_source())
    else:
        print(lua_source(), end="")  # noqa: T201
