"""What the dashboard's pages show, read from Redis: no HTTP here, only data.

Each function returns plain values for a template: the overview (queues, workers,
periodic tasks, throughput), a task's page (its record, arguments, timeline and
neighbours), the dead letters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped]

from .. import payloads
from ..admin import Admin, DeadLetter, Status
from ..index import Event, TaskIndex
from ..state import TaskInfo, TaskState

if TYPE_CHECKING:
    from .hub import Hub

#: Feed entries a task's timeline reads at most (its window of the feed).
TIMELINE_ENTRIES = 1000
#: Dead letters shown per queue.
DEAD_SHOWN = 100


@dataclass(frozen=True, slots=True)
class Overview:
    """The overview's panels."""

    status: Status
    throughput: dict[str | None, int]
    totals: dict[str, int]


async def overview(admin: Admin, hub: Hub) -> Overview:
    """Queues, workers, periodic tasks, and tasks finished per queue in the last minute."""
    status = await admin.status()
    throughput = hub.throughput()
    totals = {
        "waiting": sum(q.waiting for q in status.queues),
        "running": sum(q.in_flight for q in status.queues),
        "scheduled": status.scheduled_total,
        "dead": sum(q.dead_letters for q in status.queues),
        "workers": len(status.workers),
        "throughput": sum(throughput.values()),
    }
    return Overview(status, throughput, totals)


@dataclass(frozen=True, slots=True)
class Step:
    """One line of a task's timeline."""

    at: datetime
    state: str
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class Chord:
    """What the chord a task belongs to says about itself."""

    id: str
    size: int | None
    done: int | None
    body_id: str | None
    fired: str | None
    failed_id: str | None


@dataclass(frozen=True, slots=True)
class Detail:
    """Everything the task's page shows."""

    info: TaskInfo
    payload: payloads.Payload | None
    timeline: list[Step]
    timeline_source: str
    chord: Chord | None
    duration: float | None
    retryable: bool


async def task_detail(admin: Admin, task_id: str) -> Detail | None:
    """A task's page, or None when no record of it exists."""
    client = admin.client.for_task(task_id)
    raw: dict[bytes, bytes] = await cast(Any, client.redis).hgetall(client.keys.task(task_id))
    if not raw:
        return None
    info = TaskInfo.from_hash(task_id, raw, client.read_limit)
    payload = await payloads.read(client, task_id, raw)
    timeline, source = await _timeline(TaskIndex(client), info)
    chord_id = payload.chord_id or payload.body_of if payload is not None else None
    duration = None
    if info.started_at and info.finished_at:
        duration = (info.finished_at - info.started_at).total_seconds()
    return Detail(
        info=info,
        payload=payload,
        timeline=timeline,
        timeline_source=source,
        chord=await _chord(admin, chord_id) if chord_id else None,
        duration=duration,
        retryable=info.state == TaskState.FAILURE
        and payload is not None
        and payload.source == payloads.FAILURE
        and payload.error is None,
    )


async def _timeline(index: TaskIndex, info: TaskInfo) -> tuple[list[Step], str]:
    """The task's states from the event feed, else from its record's timestamps."""
    start = info.enqueued_at or info.started_at
    if start is not None:
        end = info.finished_at or datetime.now(UTC)
        events: list[Event] = await index.events_between(
            int(start.timestamp() * 1000) - 1000,
            int(end.timestamp() * 1000) + 2000,
            count=TIMELINE_ENTRIES,
        )
        steps = [
            Step(datetime.fromtimestamp(e.at_ms / 1000, UTC), e.state, e.worker)
            for e in events
            if e.task_id == info.id
        ]
        if steps:
            return steps, "events"
    steps = []
    if info.enqueued_at:
        steps.append(Step(info.enqueued_at, "SENT"))
    if info.started_at:
        steps.append(Step(info.started_at, "STARTED", info.worker))
    if info.finished_at:
        steps.append(Step(info.finished_at, info.state.value))
    return steps, "record"


async def _chord(admin: Admin, chord_id: str) -> Chord:
    c = admin.client.for_task(chord_id)
    raw: dict[bytes, bytes] = await cast(Any, c.redis).hgetall(c.keys.chord(chord_id))

    def num(key: bytes) -> int | None:
        value = raw.get(key)
        return int(value) if value is not None and value.isdigit() else None

    def text(key: bytes) -> str | None:
        value = raw.get(key)
        return value.decode(errors="replace") if value is not None else None

    body_id = None
    if b"body" in raw:
        try:
            record = msgpack.unpackb(raw[b"body"], raw=True, strict_map_key=False)
            body_id = record.get(b"id", b"").decode(errors="replace") or None
        except Exception:  # another version's record: no link
            body_id = None
    return Chord(chord_id, num(b"n"), num(b"done"), body_id, text(b"fired"), text(b"failed_id"))


@dataclass(frozen=True, slots=True)
class DeadQueue:
    """A queue's dead letters (the oldest DEAD_SHOWN of `count`)."""

    queue: str
    count: int
    letters: list[DeadLetter]


async def dead_letters(admin: Admin) -> list[DeadQueue]:
    """Every queue that has dead letters, with the oldest of them."""
    out = []
    for queue in await admin.known_queues():
        count = 0
        for c in admin.shards:
            count += int(await c.redis.xlen(c.keys.dead(queue)))
        if count:
            out.append(DeadQueue(queue, count, await admin.dead_letters(queue, DEAD_SHOWN)))
    return out


def show_value(value: Any) -> str:
    """A value as readable text: JSON where it can be (on one line when short), repr
    where it cannot."""
    try:
        line = json.dumps(value, ensure_ascii=False, default=_fallback)
        if len(line) <= 72:
            return line
        return json.dumps(value, indent=2, ensure_ascii=False, default=_fallback)
    except (TypeError, ValueError):
        return repr(value)


def _fallback(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


__all__ = [
    "Chord",
    "DeadQueue",
    "Detail",
    "Overview",
    "Step",
    "dead_letters",
    "overview",
    "show_value",
    "task_detail",
]
