"""Message: one task invocation, its task record, and the send options it accepts.

A stream entry has plain fields that Lua reads (`v`, `id`, `ct`, `exp`, `r`, `cid`,
`cix`, `tail`; see contract.ENTRY_FIELDS) and one payload `m`, encoded with the content
type `ct`, that only Python reads: name, args, kwargs, per-send options, the chain
continuation and the chord a body or callback belongs to. decode.py reads an entry
back into a Message, checking every field once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import codec
from .contract import TaskRecord
from .errors import SerializationError
from .keys import DEFAULT_PRIORITY
from .signing import sign

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


@dataclass(frozen=True, slots=True)
class ChordRef:
    """Where a task reports its final state: chord `id`, header position `idx`."""

    id: str
    idx: int


# Not frozen: a frozen dataclass sets its fields through object.__setattr__, and
# that __init__ costs ~2 µs on the send path. Nothing mutates one after it is built.
@dataclass(slots=True)
class Message:
    """One task invocation.

    `opts` holds per-send overrides of the task's run options (`soft_timeout`,
    `hard_timeout`, `max_retries`, `ignore_result`, `result_ttl`). `chain` is the rest of
    its chain (canvas nodes, see nodes.py): on success the first gets this task's result
    prepended to its args. `link` holds success callbacks, sent with the result too.
    `chord` is the chord this task (or, when it has a chain, the chain's end) reports to.
    `tail` is the id of the chain's last task, failed too when this task fails.
    `chord_body` marks a chord body (the header results are prepended). `err` is the
    failure an errback was sent for (prepended to its args). `trace` is the sender's
    W3C trace context (`traceparent`, `tracestate`) when tracing is on. `debounce` is
    the debounce key of a send that supersedes the pending one of the same key.
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
    trace: dict[str, str] | None = None
    debounce: str | None = None

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
        if self.trace:
            p["trace"] = self.trace
        return p

    def encode(self, min_size: int = 1024, max_size: int = codec.MAX_SIZE) -> tuple[bytes, str]:
        """Encode the payload.

        Raises:
            SerializationError: an argument cannot be encoded, or the body is larger
                than `max_size` bytes.
        """
        try:
            return codec.encode(
                self.payload(), self.serializer, self.compression, min_size, max_size
            )
        except SerializationError as exc:
            raise SerializationError(f"task {self.name}: {exc}") from exc

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
        signing_key: bytes | None = None,
    ) -> TaskRecord:
        """The task record Lua enqueues for this message (contract.TaskRecord), signed
        with `signing_key` when one is given."""
        data, ct = self.encode(min_size, max_size)
        record = TaskRecord(
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
            debounce=self.debounce,
        )
        if signing_key is None:
            return record
        return replace(record, sig=sign(signing_key, record.wire()))

    def with_retry(self, eta: float | None) -> Message:
        """The same message, to run again at `eta` as its next retry."""
        opts = {k: v for k, v in self.opts.items() if k != RATE_RESERVED}
        return replace(self, retries=self.retries + 1, eta=eta, opts=opts)

    def deferred(self, eta: float, rate_reserved: bool = True) -> Message:
        """The same message, to start at `eta` (holding the start slot it reserved under
        its rate limit, when `rate_reserved`)."""
        opts = {**self.opts, RATE_RESERVED: 1} if rate_reserved else self.opts
        return replace(self, eta=eta, opts=opts)


#: Upper bounds that keep every number a 64-bit integer on the way to Lua and back.
MAX_SECONDS = 10 * 365 * 86400  # timeouts, countdowns, ttls: ten years
MAX_COUNT = 1_000_000  # retries


def earlier_deliveries(raw: bytes) -> int | None:
    """An entry's `dl` field (the deliveries of its run's earlier entries, set by
    finish.lua), or None when it is not a whole number 0..MAX_COUNT in digits."""
    if len(raw) <= 7 and raw.isdigit() and int(raw) <= MAX_COUNT:
        return int(raw)
    return None


def positive_number(value: Any, maximum: float = MAX_SECONDS) -> bool:
    """A real number (not a bool) above 0, at most `maximum`."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= maximum
    )


def count(value: Any, maximum: int = MAX_COUNT) -> bool:
    """A whole number (an int, or a float without fraction) from 0 to `maximum`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value == int(value) and 0 <= value <= maximum


def _when(value: Any) -> bool:
    from datetime import datetime, timedelta

    if isinstance(value, datetime | timedelta):
        return True
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (math.isfinite(value) and abs(value) <= MAX_SECONDS * 10)
    )


_TEN_YEARS = f"{MAX_SECONDS:,} (ten years)"


#: What `is_queue_name` asks, as the errors that refuse a name for it word it.
QUEUE_NAME_RULE = "a queue name (no commas, no surrounding spaces)"


def is_queue_name(value: Any) -> bool:
    """Whether a worker could take from a queue of this name: a worker's queues are
    named without commas or surrounding spaces (`--queues a,b`)."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and "," not in value
        and (value == value.strip())
    )


def _checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
    return {
        "priority": (lambda v: count(v, 9) and isinstance(v, int), "an int from 0 to 9"),
        "soft_timeout": (positive_number, f"a positive number of seconds up to {_TEN_YEARS}"),
        "hard_timeout": (positive_number, f"a positive number of seconds up to {_TEN_YEARS}"),
        "countdown": (
            lambda v: v == 0 or positive_number(v),
            f"a number of seconds from 0 to {_TEN_YEARS}",
        ),
        "eta": (_when, "a datetime"),
        "expires": (_when, "seconds after the send, or a datetime"),
        "queue": (lambda v: isinstance(v, str) and bool(v), "a queue name"),
        "task_id": (lambda v: isinstance(v, str) and bool(v) and "\n" not in v, "a string"),
        "ignore_result": (lambda v: v in (True, False), "True or False"),
        "serializer": (lambda v: v in codec.SERIALIZERS, "'msgpack' or 'json'"),
        "compression": (lambda v: v in codec.COMPRESSIONS, "zlib, lzma, bz2 or zstd"),
        "max_retries": (count, "a whole number >= 0"),
        "result_ttl": (
            lambda v: count(v, MAX_SECONDS) and v > 0,
            f"a whole number of seconds from 1 to {_TEN_YEARS}",
        ),
    }


_CHECKS = _checks()


def check_options(options: dict[str, Any], *, sending: bool = True) -> None:
    """Raise TypeError for an unknown send option, ValueError for a bad value.

    `sending`: options of a send being made (the default), where a queue must also be a
    name a worker's `--queues` can give; False for the options of a message already
    sent (a canvas step a worker decodes), which go where they were sent to.
    """
    unknown = set(options) - SEND_OPTIONS
    if unknown:
        raise TypeError(f"unknown send option(s): {', '.join(sorted(unknown))}")
    for name, value in options.items():
        check = _CHECKS.get(name)
        if check is not None and value is not None and not check[0](value):
            raise ValueError(f"{name} must be {check[1]}, got {value!r:.60}")
    queue = options.get("queue")
    if sending and queue is not None and not is_queue_name(queue):
        raise ValueError(f"queue must be {QUEUE_NAME_RULE}, got {queue!r:.60}")
    soft, hard = options.get("soft_timeout"), options.get("hard_timeout")
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(f"soft_timeout ({soft}) must be less than hard_timeout ({hard})")


def now() -> float:
    """Wall-clock seconds since the epoch (the clock every stored timestamp uses)."""
    return time.time()
