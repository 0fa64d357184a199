"""TaskState and TaskInfo: what is stored about a task, read by handles, admin and workers.

They live apart from the handles so that the I/O layer (client.py) can build them
without importing the user-facing handle module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from . import codec
from .errors import ChordError, SerializationError, TaskFailed, TaskRevoked, UnknownTask


class TaskState(StrEnum):
    """Where a task is in its life. PENDING also means unknown."""

    PENDING = "PENDING"
    SCHEDULED = "SCHEDULED"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"

    @property
    def is_final(self) -> bool:
        """True for SUCCESS, FAILURE and REVOKED."""
        return self in _FINAL


_FINAL = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})


def _ts(raw: bytes | None) -> datetime | None:
    return datetime.fromtimestamp(int(raw) / 1000, UTC) if raw else None


def _text(raw: bytes | None) -> str | None:
    return raw.decode() if raw is not None else None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """Everything stored about a task. Timestamps are aware UTC datetimes."""

    id: str
    name: str | None
    state: TaskState
    result: Any
    exc_type: str | None
    exc_message: str | None
    traceback: str | None
    progress: dict[str, Any] | None
    attempts: int
    queue: str | None
    worker: str | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    failed_task_id: str | None = None

    @classmethod
    def from_hash(
        cls, task_id: str, h: dict[bytes, bytes], max_size: int = codec.MAX_SIZE
    ) -> TaskInfo:
        """Build from the task hash (an empty hash reads as PENDING)."""
        state = TaskState(h[b"state"].decode()) if b"state" in h else TaskState.PENDING
        result = progress = None
        if b"result" in h:
            try:
                ct = h.get(b"ct", b"msgpack").decode()
                result = codec.decode(h[b"result"], ct, max_size)
            except SerializationError as exc:
                result = exc
        if b"progress" in h:
            try:
                progress = codec.decode(h[b"progress"], "msgpack")
            except SerializationError:  # a type registered only where it ran: not shown
                progress = None
        return cls(
            id=task_id,
            name=_text(h.get(b"name")),
            state=state,
            result=result,
            exc_type=_text(h.get(b"exc_type")),
            exc_message=_text(h.get(b"exc_message")),
            traceback=_text(h.get(b"traceback")),
            progress=progress,
            attempts=int(h.get(b"attempts", 0)),
            queue=_text(h.get(b"queue")),
            worker=_text(h.get(b"worker")),
            enqueued_at=_ts(h.get(b"enqueued_at")),
            started_at=_ts(h.get(b"started_at")),
            finished_at=_ts(h.get(b"finished_at")),
            failed_task_id=_text(h.get(b"failed_task_id")),
        )

    def outcome(self) -> Any:
        """The result of a final state: the value, or the matching exception raised."""
        if self.state == TaskState.SUCCESS:
            if isinstance(self.result, SerializationError):
                raise self.result
            return self.result
        if self.state == TaskState.REVOKED:
            raise TaskRevoked(self.id)
        if self.exc_type == "ChordError":
            raise ChordError(
                self.id,
                "ChordError",
                self.exc_message or "",
                self.traceback,
                failed_task_id=self.failed_task_id or "",
            )
        error = UnknownTask if self.exc_type == "UnknownTask" else TaskFailed
        raise error(self.id, self.exc_type or "Exception", self.exc_message or "", self.traceback)


def with_success(
    info: TaskInfo, ct: bytes, data: bytes, max_size: int = codec.MAX_SIZE
) -> TaskInfo:
    """The info of a task whose success (and result) came in a notification."""
    try:
        result: Any = codec.decode(data, ct.decode(), max_size)
    except SerializationError as exc:
        result = exc
    return replace(info, state=TaskState.SUCCESS, result=result)


#: The task hash field keeping what `aiotasks retry` sends again: a failed task's payload
#: (written with its FAILURE) or a revoked one's (kept by the revoke), as its entry had it.
PAYLOAD = "payload"


def pack_payload(m: bytes, ct: bytes | str, priority: int) -> bytes:
    """The PAYLOAD field: the entry's encoded payload, its content type and priority."""
    ct = ct.decode() if isinstance(ct, bytes) else ct
    return codec.encode({"m": m, "ct": ct, "priority": priority}, "msgpack")[0]


def entry_payload(fields: dict[bytes, bytes], priority: int) -> bytes | None:
    """The PAYLOAD field for a stream entry's fields (None when they hold no payload):
    with the chord and chain the entry names, for the dashboard's links."""
    m, ct = fields.get(b"m"), fields.get(b"ct")
    if m is None or ct is None:
        return None
    kept: dict[str, Any] = {"m": m, "ct": ct.decode(), "priority": priority}
    for name in ("cid", "cix", "tail"):
        if name.encode() in fields:
            kept[name] = fields[name.encode()]
    return codec.encode(kept, "msgpack")[0]


@dataclass(frozen=True, slots=True)
class Payload:
    """A kept payload, decoded: what to send again and where."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    opts: dict[str, Any]
    priority: int
    #: The chord whose header results were the first argument when it ran, if a body.
    chord_body: str | None = None


def unpack_payload(raw: bytes, max_size: int = codec.MAX_SIZE) -> Payload:
    """Decode a PAYLOAD field.

    Raises:
        SerializationError: it cannot be decoded, or holds no task call.
    """
    kept = codec.decode(raw, "msgpack")
    body = codec.decode(kept["m"], kept["ct"], max_size)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise SerializationError("the kept payload holds no task name")
    opts = {k: v for k, v in (body.get("opts") or {}).items() if not k.startswith("_")}
    return Payload(
        body["name"],
        list(body.get("args") or []),
        dict(body.get("kwargs") or {}),
        opts,
        int(kept["priority"]),
        body["chord_body"] if isinstance(body.get("chord_body"), str) else None,
    )
