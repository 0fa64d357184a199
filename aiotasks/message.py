"""Message: one task invocation as it travels on the wire (see docs/protocol.md).

A stream entry has plain fields that Lua scripts read (`id`, `ct`, `exp`, `r`, `cid`,
`cix`, `tail`) and one payload `m`, encoded with the content type `ct`, that only
Python reads (name, args, kwargs and options).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from . import codec
from .errors import SerializationError
from .keys import DEFAULT_PRIORITY, Keys

#: Set in opts of a message deferred by its rate limit: it holds a reserved start slot.
RATE_RESERVED = "_rate_reserved"

#: Per-send options carried in the payload's "opts" map (absent = the task's default).
RUN_OPTIONS = ("soft_timeout", "hard_timeout", "max_retries", "ignore_result", "result_ttl")


@dataclass(frozen=True, slots=True)
class ChordRef:
    """Where a task reports its final state: chord `id`, header position `idx`."""

    id: str
    idx: int


@dataclass(frozen=True, slots=True)
class Message:
    """One task invocation.

    `link` is the chain continuation (signature dicts, see canvas.py): on success the
    first gets this task's result prepended to its args. `chord` is the chord this task
    (or, when linked, its continuation) reports to. `tail` is the id of the last task of
    the continuation, failed too when this task fails. `chord_body` marks a chord body
    (the header results are prepended); `chord_errback` an on_error callback.
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
    link: list[dict[str, Any]] = field(default_factory=list)
    chord: ChordRef | None = None
    tail: str | None = None
    chord_body: str | None = None
    chord_errback: str | None = None

    def payload(self) -> dict[str, Any]:
        """The map encoded into the entry's `m` field."""
        p: dict[str, Any] = {"name": self.name, "args": list(self.args), "kwargs": self.kwargs}
        p["queue"] = self.queue
        p["priority"] = self.priority
        if self.retries:
            p["retries"] = self.retries
        if self.opts:
            p["opts"] = self.opts
        if self.link:
            p["link"] = self.link
        if self.chord:
            p["chord"] = [self.chord.id, self.chord.idx]
        if self.tail:
            p["tail"] = self.tail
        if self.chord_body:
            p["chord_body"] = self.chord_body
        if self.chord_errback:
            p["chord_errback"] = self.chord_errback
        if self.expires is not None:
            p["expires"] = self.expires
        return p

    def encode(self, min_size: int = 1024) -> tuple[bytes, str]:
        """Encode the payload; raises SerializationError for unencodable arguments."""
        return codec.encode(self.payload(), self.serializer, self.compression, min_size)

    def enqueue_args(
        self, keys: Keys, ttl: int, min_size: int = 1024, reply: str = ""
    ) -> list[str | bytes | int]:
        """The 14 enqueue.lua values for this message (`reply`: the sender's reply channel)."""
        data, ct = self.encode(min_size)
        due_ms = int(self.eta * 1000) if self.eta is not None else 0
        return [
            self.id,
            self.name,
            self.queue,
            keys.stream(self.queue, self.priority),
            data,
            ct,
            due_ms,
            ttl,
            int(self.expires * 1000) if self.expires is not None else "",
            self.retries or "",
            self.chord.id if self.chord else "",
            self.chord.idx if self.chord else "",
            self.tail or "",
            reply,
        ]

    def with_retry(self, eta: float | None) -> Message:
        """The same message, to run again at `eta` as its next retry."""
        opts = {k: v for k, v in self.opts.items() if k != RATE_RESERVED}
        return replace(self, retries=self.retries + 1, eta=eta, opts=opts)

    def deferred(self, eta: float) -> Message:
        """The same message, to start at `eta`, a start slot it reserved under its rate limit."""
        return replace(self, eta=eta, opts={**self.opts, RATE_RESERVED: 1})


_EMPTY: dict[str, Any] = {}


def decode_entry(task_id: str, data: bytes, content_type: str) -> Message:
    """Rebuild a Message from a stream entry's payload; raises SerializationError."""
    p = codec.decode(data, content_type)
    if not isinstance(p, dict) or not isinstance(p.get("name"), str):
        raise SerializationError("payload is not a task message (no 'name')")
    serializer, _, compression = content_type.partition("+")
    get = p.get
    chord = get("chord")
    args = get("args") or ()
    kwargs = get("kwargs") or _EMPTY
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise SerializationError("payload 'args' must be an array and 'kwargs' a map")
    return Message(
        task_id,
        p["name"],
        args,
        kwargs,
        get("queue", "default"),
        int(get("priority", DEFAULT_PRIORITY)),
        int(get("retries", 0)),
        get("opts") or _EMPTY,
        None,
        get("expires"),
        serializer,
        compression or None,
        get("link") or [],
        ChordRef(str(chord[0]), int(chord[1])) if chord else None,
        get("tail"),
        get("chord_body"),
        get("chord_errback"),
    )


def now() -> float:
    """Wall-clock seconds since the epoch (the clock every stored timestamp uses)."""
    return time.time()
