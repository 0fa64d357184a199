"""The task index and the event feed of a namespace, as the scripts write them.

Every script call that changes task states adds the finished ones to a sorted set (by
finish time, capped) and its events to a capped stream: a few commands per batch, never
one per task. Unfinished tasks are found where they wait: their queue's streams and the
delayed set. The
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

from .state import TaskInfo, TaskState

if TYPE_CHECKING:
    from .client import Client

#: Default caps: finished tasks kept in the index, and event batches kept in the feed.
DEFAULT_INDEX_SIZE = 10_000
DEFAULT_EVENTS_SIZE = 1_000

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
        sources: list[list[str] | AsyncIterator[list[str]]] = [
            await self._unfinished(),
            self._ids(self.client.keys.index_done),
        ]
        for ids in sources:
            async for batch in _batches(ids):
                for info in await self._infos(batch):
                    if _matches(info, state, name, queue):
                        out.append(info)
                        if len(out) >= limit:
                            return out
        return out

    async def _unfinished(self) -> list[str]:
        """Ids of unfinished tasks, where they wait: each queue's streams (queued and
        running ones, newest first) and the delayed set (scheduled ones)."""
        keys, redis = self.client.keys, cast(Any, self.client.redis)
        queues = sorted(q.decode() for q in await redis.smembers(keys.queues))
        async with redis.pipeline(transaction=False) as pipe:
            for q in queues:
                for stream in keys.streams(q):
                    pipe.xrevrange(stream, count=_CHUNK)
            pipe.zrange(keys.delayed, 0, _CHUNK - 1)
            replies = await pipe.execute()
        ids: list[str] = []
        for reply in replies[:-1]:
            ids += [f[b"id"].decode() for _, f in reply if b"id" in f]
        ids += [i.decode() for i in replies[-1]]
        return list(dict.fromkeys(ids))

    async def _ids(self, key: str) -> AsyncIterator[list[str]]:  # newest first
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
            await self.client.redis.zrem(keys.index_done, *gone)
        limit = self.client.read_limit
        return [TaskInfo.from_hash(i, h, limit) for i, h in zip(ids, hashes, strict=True) if h]

    async def size(self) -> tuple[int, int]:
        """(unfinished, finished) tasks the index can list."""
        live = len(await self._unfinished())
        done = int(await self.client.redis.zcard(self.client.keys.index_done))
        return live, done

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
    """An entry's events: lines "state<TAB>id[<TAB>name<TAB>queue[<TAB>worker]]"."""
    eid = entry_id.decode()
    at_ms = int(fields.get(b"t", b"0"))
    out = []
    for line in fields.get(b"e", b"").decode(errors="replace").splitlines():
        parts = [*line.split("\t"), "", "", "", ""]
        out.append(
            Event(
                id=eid,
                at_ms=at_ms,
                state=parts[0],
                task_id=parts[1] or None,
                name=parts[2] or None,
                queue=parts[3] or None,
                worker=parts[4] or None,
            )
        )
    return out


async def _batches(ids: list[str] | AsyncIterator[list[str]]) -> AsyncIterator[list[str]]:
    if isinstance(ids, list):
        for i in range(0, len(ids), _CHUNK):
            yield ids[i : i + _CHUNK]
    else:
        async for batch in ids:
            yield batch


def _matches(
    info: TaskInfo, state: str | TaskState | None, name: str | None, queue: str | None
) -> bool:
    if state and info.state != TaskState(str(state).upper()):
        return False
    if name and not fnmatch.fnmatchcase(info.name or "", name):
        return False
    return not (queue and info.queue != queue)
