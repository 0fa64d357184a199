"""The task index and the event feed of a namespace, as the scripts write them.

Every script call that changes task states adds the ids to two sorted sets (unfinished
tasks by last change; the most recent finished ones by finish time, capped) and one
entry to an events stream (capped): a few commands per batch, never one per task. The
dashboard, `aiotasks tasks list` and anyone else read them here.

```python
index = TaskIndex(app.client)
rows = await index.recent(state="FAILURE", name="mail.send", limit=50)
async for event in index.follow():          # live, without polling task records
    print(event)
```
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgpack  # type: ignore[import-untyped]

from .state import TaskInfo, TaskState

if TYPE_CHECKING:
    from .client import Client

#: Default caps: finished tasks kept in the index, and event batches kept in the feed.
DEFAULT_INDEX_SIZE = 10_000
DEFAULT_EVENTS_SIZE = 10_000

#: Task records read per round trip while searching.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Event:
    """One change: a task's new state, or a worker that joined or left (`worker`)."""

    id: str
    at_ms: int
    state: str
    task_id: str | None = None
    name: str | None = None
    queue: str | None = None
    worker: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The event as a JSON-able dict."""
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


def _text(value: Any) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class TaskIndex:
    """Reads a namespace's task index and event feed."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def configure(self, index_size: int, events_size: int) -> None:
        """Set the caps every script of the namespace applies (0 turns either off)."""
        await cast(Any, self.client.redis).hset(
            self.client.keys.meta, mapping={"index_cap": index_size, "events_cap": events_size}
        )

    async def recent(
        self,
        *,
        state: str | TaskState | None = None,
        name: str | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """The most recent tasks, unfinished first, filtered; `name` may be a glob."""
        if task_id:
            info = await self.client.task_info(task_id)
            return [info] if _matches(info, state, name, queue) else []
        out: list[TaskInfo] = []
        for key in (self.client.keys.index_live, self.client.keys.index_done):
            async for batch in self._ids(key):
                for info in await self._infos(batch):
                    if _matches(info, state, name, queue):
                        out.append(info)
                        if len(out) >= limit:
                            return out
        return out

    async def _ids(self, key: str) -> AsyncIterator[list[str]]:
        start = 0
        while True:
            raw: list[bytes] = await cast(Any, self.client.redis).zrevrange(
                key, start, start + _CHUNK - 1
            )
            if not raw:
                return
            yield [r.decode() for r in raw]
            start += _CHUNK

    async def _infos(self, ids: Sequence[str]) -> list[TaskInfo]:
        keys = self.client.keys
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(keys.task(task_id))
            hashes = await pipe.execute()
        gone = [i for i, h in zip(ids, hashes, strict=True) if not h]
        if gone:  # expired records: the index forgets them too
            async with self.client.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.index_live, *gone)
                pipe.zrem(keys.index_done, *gone)
                await pipe.execute()
        limit = self.client.read_limit
        return [TaskInfo.from_hash(i, h, limit) for i, h in zip(ids, hashes, strict=True) if h]

    async def size(self) -> tuple[int, int]:
        """(unfinished, finished) tasks in the index."""
        keys = self.client.keys
        async with self.client.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.index_live)
            pipe.zcard(keys.index_done)
            live, done = await pipe.execute()
        return int(live), int(done)

    async def events(self, after: str = "0", count: int = 1000) -> list[Event]:
        """Events after the feed entry id `after` ("0": the oldest kept)."""
        raw: list[Any] = await cast(Any, self.client.redis).xrange(
            self.client.keys.events, min=f"({after}" if after != "0" else "-", count=count
        )
        return [e for entry_id, fields in raw for e in _events(entry_id, fields)]

    async def events_between(self, start_ms: int, end_ms: int, count: int = 1000) -> list[Event]:
        """Events of the feed entries written from `start_ms` to `end_ms` (the first `count`)."""
        raw: list[Any] = await cast(Any, self.client.redis).xrange(
            self.client.keys.events, min=str(max(start_ms, 0)), max=str(end_ms), count=count
        )
        return [e for entry_id, fields in raw for e in _events(entry_id, fields)]

    async def last_id(self) -> str:
        """The id of the feed's newest entry ("0-0" when it is empty): follow after it."""
        raw: list[Any] = await cast(Any, self.client.redis).xrevrange(
            self.client.keys.events, count=1
        )
        return raw[0][0].decode() if raw else "0-0"

    async def follow(self, after: str = "$", block_ms: int = 5000) -> AsyncIterator[Event]:
        """Yield events as they come (a blocking read, no polling); `after="$"`: new only."""
        last = after
        while True:
            reply: list[Any] = await cast(Any, self.client.redis).xread(
                {self.client.keys.events: last}, block=block_ms, count=1000
            )
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    for event in _events(entry_id, fields):
                        yield event


def _events(entry_id: bytes, fields: dict[bytes, bytes]) -> list[Event]:
    eid = entry_id.decode()
    at_ms = int(fields.get(b"t", b"0"))
    try:
        items = msgpack.unpackb(fields.get(b"e", b"\x90"), raw=False)
    except Exception:  # a foreign or damaged entry: nothing to show
        return []
    return [
        Event(
            id=eid,
            at_ms=at_ms,
            state=str(item.get("state", "")),
            task_id=_text(item.get("id")),
            name=_text(item.get("name")),
            queue=_text(item.get("queue")),
            worker=_text(item.get("worker")),
        )
        for item in items
        if isinstance(item, dict)
    ]


def _matches(
    info: TaskInfo, state: str | TaskState | None, name: str | None, queue: str | None
) -> bool:
    if state and info.state != TaskState(str(state).upper()):
        return False
    if name and not fnmatch.fnmatchcase(info.name or "", name):
        return False
    return not (queue and info.queue != queue)
