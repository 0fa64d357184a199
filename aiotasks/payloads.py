"""A task's payload read back: its name, arguments, options and canvas neighbours.

The arguments of a task live where its message is: a queued or running task's stream
entry (the task hash names it: `_st`, `_e`), a scheduled task's stored record (`_rec`),
or, once a task has failed after it began (or was revoked), the copy kept in the task
hash (`payload`: a msgpack map of the entry's `m`, `ct` and priority, plus `cid`, `cix`,
`tail` when it had them) so that it can be read and sent again. A dead letter keeps
its whole entry (looked for among the newest DEAD_SCAN_LIMIT of its queue's). After a
success they are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped]

from . import codec
from .decode import DecodeError, checked_payload
from .errors import SerializationError
from .message import RATE_RESERVED

if TYPE_CHECKING:
    from .client import Client

#: Where a payload was read from.
ENTRY, SCHEDULED, FAILURE, DEAD = "entry", "scheduled", "failure", "dead letter"

#: Dead letters read, newest first, to find a task's: a long dead stream is not read whole.
DEAD_SCAN_LIMIT = 1000
#: The errors a task ends with when the worker dead-lettered its message.
DEAD_LETTERED = frozenset({"UnknownTask", "DecodeError", "SignatureError", "MaxDeliveriesExceeded"})


@dataclass(frozen=True, slots=True)
class Payload:
    """What a task was sent with, and the tasks its message names.

    `next_ids` are the tasks its chain goes on with, `link_ids` its success callbacks,
    `chain_end` the chain's last task, `chord_id`/`chord_index` the chord it reports to,
    `body_of` the chord whose body it is. `source` is where it was read (ENTRY, SCHEDULED,
    FAILURE or DEAD); `error` says why the arguments could not be decoded (then empty).
    """

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    opts: dict[str, Any] = field(default_factory=dict)
    source: str = ENTRY
    next_ids: list[str] = field(default_factory=list)
    link_ids: list[str] = field(default_factory=list)
    chain_end: str | None = None
    chord_id: str | None = None
    chord_index: int | None = None
    body_of: str | None = None
    retries: int = 0
    error: str | None = None

    @property
    def send_options(self) -> dict[str, Any]:
        """The per-send run options it carried, as `send` takes them again."""
        return {k: v for k, v in self.opts.items() if k != RATE_RESERVED}


def _text(raw: Any) -> str | None:
    if raw is None:
        return None
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def first_ids(node: Any, limit: int = 20) -> list[str]:
    """Ids of the tasks a canvas node starts with (a chord: its headers)."""
    if not isinstance(node, dict):
        return []
    kind = node.get("t")
    if kind == "sig":
        return [str(node.get("id"))]
    if kind == "chain" and node.get("steps"):
        return first_ids(node["steps"][0], limit)
    members = node.get("header") if kind == "chord" else node.get("tasks")
    out: list[str] = []
    for member in members or ():
        out += first_ids(member, limit)
        if len(out) >= limit:
            break
    return out[:limit]


def decode(m: bytes, ct: str, fields: dict[str, Any], source: str, limit: int) -> Payload:
    """A payload from its encoded bytes and entry fields (`cid`, `cix`, `tail`, `r`)."""
    cix, retries = _text(fields.get("cix")), _text(fields.get("r"))
    base = Payload(
        name="?",
        source=source,
        chord_id=_text(fields.get("cid")),
        chord_index=int(cix) if cix and cix.isdigit() else None,
        chain_end=_text(fields.get("tail")),
        retries=int(retries) if retries and retries.isdigit() else 0,
    )
    try:
        raw = codec.decode(m, ct, limit)
    except SerializationError as exc:
        return replace(base, error=str(exc))
    try:
        # As a worker checks it: dead letters are where payloads typed anyhow end up.
        p = checked_payload(raw)
    except DecodeError as exc:
        named = isinstance(raw, dict) and isinstance(raw.get("name"), str)
        return replace(base, name=raw["name"] if named else "?", error=str(exc))
    chain = p.get("chain") or []
    return replace(
        base,
        name=p["name"],
        args=list(p.get("args") or []),
        kwargs=dict(p.get("kwargs") or {}),
        opts=dict(p.get("opts") or {}),
        next_ids=first_ids(chain[0]) if chain else [],
        link_ids=[i for node in p.get("link") or () for i in first_ids(node)],
        body_of=_text(p.get("chord_body")),
    )


def _fields(raw: dict[Any, Any]) -> dict[str, Any]:
    return {_text(k) or "": v for k, v in raw.items()}


async def read(client: Client, task_id: str, h: dict[bytes, bytes] | None = None) -> Payload | None:
    """The payload of a task (`h`: its hash, when already read), or None where none is kept."""
    client = client.for_task(task_id)
    if h is None:
        h = await cast(Any, client.redis).hgetall(client.keys.task(task_id))
    if not h:
        return None
    limit = client.read_limit
    if b"payload" in h:
        try:
            kept = _fields(msgpack.unpackb(h[b"payload"], raw=True, strict_map_key=False))
        except Exception as exc:  # written by hand, or by another version: say so
            return Payload(name="?", source=FAILURE, error=f"{type(exc).__name__}: {exc}")
        ct = _text(kept.get("ct")) or "msgpack"
        return decode(kept.get("m", b""), ct, kept, FAILURE, limit)
    if b"_rec" in h:
        try:
            rec = msgpack.unpackb(h[b"_rec"], raw=True, strict_map_key=False)
        except Exception:  # written by another version: nothing to show
            return None
        rec = _fields(rec)
        return decode(rec.get("m", b""), _text(rec.get("ct")) or "msgpack", rec, SCHEDULED, limit)
    stream, entry = h.get(b"_st"), h.get(b"_e")
    if stream and entry:
        found: list[Any] = await cast(Any, client.redis).xrange(stream, min=entry, max=entry)
        if found:
            f = _fields(found[0][1])
            return decode(f.get("m", b""), _text(f.get("ct")) or "msgpack", f, ENTRY, limit)
    queue = _text(h.get(b"queue"))
    if queue and _text(h.get(b"exc_type")) in DEAD_LETTERED:
        return await _dead_letter(client, task_id, queue)
    return None


async def _dead_letter(client: Client, task_id: str, queue: str) -> Payload | None:
    """The payload in a task's dead letter (dead-lettered in its own shard)."""
    entries: list[Any] = await cast(Any, client.redis).xrevrange(
        client.keys.dead(queue), count=DEAD_SCAN_LIMIT
    )
    for _entry_id, raw in entries:
        if raw.get(b"id") == task_id.encode():
            f = _fields(raw)
            if "m" not in f:  # a scheduled task whose record could not be read
                reason = _text(f.get("reason")) or "no reason given"
                return Payload(name="?", source=DEAD, error=f"it holds no message: {reason}")
            ct = _text(f.get("ct")) or "msgpack"
            return decode(f["m"], ct, f, DEAD, client.read_limit)
    return None


__all__ = ["DEAD", "ENTRY", "FAILURE", "SCHEDULED", "Payload", "decode", "first_ids", "read"]
