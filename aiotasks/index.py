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

import asyncio
import fnmatch
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .cancel import keep_cancel
from .scripts import longest_block_ms
from .state import TaskInfo, TaskState

if TYPE_CHECKING:
    from .client import Client

#: Default caps: finished tasks kept in the index, and event batches kept in the feed.
DEFAULT_INDEX_SIZE = 10_000
DEFAULT_EVENTS_SIZE = 1_000

_ENTRY_ID = re.compile(r"^\d+(-\d+)?$")

#: Task records read per round trip while searching.
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Event:
    """One change: a task's new state, or a worker that joined or left (`worker`).

    `id` is the feed entry that holds it; `cursor` is where to go on from after it
    (`follow(after=event.cursor)`): the entry id itself with one shard, one id per shard
    (comma-separated) with several, each shard's feed having ids of its own.
    """

    id: str
    at_ms: int
    state: str
    task_id: str | None = None
    name: str | None = None
    queue: str | None = None
    worker: str | None = None
    cursor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The event as a JSON-able dict."""
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


def _text(value: Any) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class TaskIndex:
    """Reads a namespace's task index and event feed (of every shard, merged)."""

    def __init__(self, client: Client) -> None:
        self.client = client.root
        self.shards = self.client.shards

    async def configure(self, index_size: int, events_size: int) -> None:
        """Set the caps every script of the namespace applies (0 turns either off); with
        several shards each keeps its share, so the namespace keeps about as many."""
        n = len(self.shards)
        caps = {"index_cap": -(-index_size // n), "events_cap": -(-events_size // n)}
        for shard in self.shards:
            await cast(Any, shard.redis).hset(shard.keys.meta, mapping=caps)

    async def recent(
        self,
        *,
        state: str | TaskState | None = None,
        name: str | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        search: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """The most recent tasks, unfinished first, filtered; `name` may be a glob.
        `search`: a name that holds it or matches it as a glob, ignoring case, or an id
        that starts with it."""
        if task_id:
            info = await self.client.task_info(task_id)
            return [info] if _matches(info, state, name, queue) else []
        found = _searcher(search) if search else None
        out: list[TaskInfo] = []
        sources: list[list[str] | AsyncIterator[list[str]]] = [
            await self._unfinished(),
            self._done_ids(),
        ]
        # An id in both (a finished task sent again: a retry under its id) shows once.
        seen: set[str] = set()
        for ids in sources:
            async for batch in _batches(ids):
                batch = [i for i in batch if i not in seen]
                seen.update(batch)
                for info in await self._infos(batch):
                    if _matches(info, state, name, queue) and (not found or found(info)):
                        out.append(info)
                        if len(out) >= limit:
                            return out
        return out

    async def _unfinished(self) -> list[str]:
        """Ids of unfinished tasks, where they wait: each queue's streams (queued and
        running ones, newest first) and the delayed set (scheduled ones)."""
        redis = cast(Any, self.client.redis)
        async with redis.pipeline(transaction=False) as pipe:
            for shard in self.shards:
                pipe.smembers(shard.keys.queues)
            named = await pipe.execute()
        queues = sorted({q.decode() for members in named for q in members})
        async with redis.pipeline(transaction=False) as pipe:
            for shard in self.shards:
                for q in queues:
                    for stream in shard.keys.streams(q):
                        pipe.xrevrange(stream, count=_CHUNK)
            for shard in self.shards:
                pipe.zrange(shard.keys.delayed, 0, _CHUNK - 1)
            replies = await pipe.execute()
        n = len(self.shards)
        ids: list[str] = []
        for reply in replies[:-n]:
            ids += [f[b"id"].decode() for _, f in reply if b"id" in f]
        for reply in replies[-n:]:
            ids += [i.decode() for i in reply]
        return list(dict.fromkeys(ids))

    async def _done_ids(self) -> AsyncIterator[list[str]]:
        """Finished task ids, newest first, over every shard's index (merged by finish)."""
        if len(self.shards) == 1:
            async for batch in self._ids(self.client, 0):
                yield [i for i, _ in batch]
            return
        readers = [self._ids(shard, 0) for shard in self.shards]
        heads: list[list[tuple[str, float]]] = [[] for _ in readers]
        live = list(range(len(readers)))
        out: list[str] = []
        while live:
            for k in list(live):
                if not heads[k]:
                    try:
                        heads[k] = await anext(readers[k])
                    except StopAsyncIteration:
                        live.remove(k)
            if not live:
                break
            k = max(live, key=lambda j: heads[j][0][1])
            out.append(heads[k].pop(0)[0])
            if len(out) >= _CHUNK:
                yield out
                out = []
        if out:
            yield out

    async def _ids(self, shard: Client, start: int) -> AsyncIterator[list[tuple[str, float]]]:
        while True:  # newest first
            raw: list[tuple[bytes, float]] = await cast(Any, shard.redis).zrevrange(
                shard.keys.index_done, start, start + _CHUNK - 1, withscores=True
            )
            if not raw:
                return
            yield [(r.decode(), score) for r, score in raw]
            start += _CHUNK

    async def _infos(self, ids: Sequence[str]) -> list[TaskInfo]:
        client = self.client
        async with client.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(client.for_task(task_id).keys.task(task_id))
            hashes = await pipe.execute()
        gone = [i for i, h in zip(ids, hashes, strict=True) if not h]
        for task_id in gone:  # expired records: the index forgets them too
            shard = client.for_task(task_id)
            await shard.redis.zrem(shard.keys.index_done, task_id)
        limit = client.read_limit
        return [TaskInfo.from_hash(i, h, limit) for i, h in zip(ids, hashes, strict=True) if h]

    async def size(self) -> tuple[int, int]:
        """(unfinished, finished) tasks the index can list."""
        live = len(await self._unfinished())
        done = 0
        for shard in self.shards:
            done += int(await shard.redis.zcard(shard.keys.index_done))
        return live, done

    async def events(self, after: str = "0", count: int = 1000) -> list[Event]:
        """Events after the feed position `after` ("0": the oldest kept): an entry id, or
        a cursor from `last_id()` or `Event.cursor`."""
        lows = [f"({a}" if a != "0" else "-" for a in self._positions(after)]
        return await self._range(lows, "+", count)

    async def events_between(self, start_ms: int, end_ms: int, count: int = 1000) -> list[Event]:
        """Events of the feed entries written from `start_ms` to `end_ms` (the first `count`)."""
        return await self._range([str(max(start_ms, 0))] * len(self.shards), str(end_ms), count)

    async def _range(self, lows: list[str], high: str, count: int) -> list[Event]:
        """Feed entries of every shard from its `lows` entry to `high`, in entry id order
        (time), each event with the cursor after its entry."""
        raw: list[tuple[int, bytes, Any]] = []
        for k, shard in enumerate(self.shards):
            entries = await cast(Any, shard.redis).xrange(
                shard.keys.events, min=lows[k], max=high, count=count
            )
            raw += [(k, entry_id, fields) for entry_id, fields in entries]
        if len(self.shards) > 1:
            raw = sorted(raw, key=lambda e: _entry_order(e[1]))[:count]
        positions = [_position_before(low) for low in lows]
        out: list[Event] = []
        for k, entry_id, fields in raw:
            positions[k] = entry_id.decode()
            out += _events(entry_id, fields, ",".join(positions))
        return out

    async def last_id(self) -> str:
        """The cursor of the feed's newest entry ("0-0" when it is empty): follow after
        it. With several shards, one entry id per shard, comma-separated."""
        newest: list[str] = []
        for shard in self.shards:
            raw: list[Any] = await cast(Any, shard.redis).xrevrange(shard.keys.events, count=1)
            newest.append(raw[0][0].decode() if raw else "0-0")
        return ",".join(newest)

    def _positions(self, after: str) -> list[str]:
        """Each shard's feed position in `after`: one for all ("0", "$" or an entry id),
        or one per shard. A cursor of another shard count (the namespace was re-spread)
        restarts every shard from its oldest position: events seen twice, none missed."""
        parts = after.split(",")
        n = len(self.shards)
        if len(parts) == n:
            return parts
        if len(parts) == 1:
            return parts * n
        if all(_ENTRY_ID.match(p) for p in parts):
            return [min(parts, key=_entry_order)] * n
        return ["0"] * n

    async def follow(self, after: str = "$", block_ms: int = 5000) -> AsyncIterator[Event]:
        """Yield events as they come (a blocking read, no polling); `after="$"`: new only,
        or a cursor (`last_id()`, `Event.cursor`) to go on from.

        With several shards, each shard's feed is read by a blocking read of its own
        (a Cluster refuses one read over keys of several slots).
        """
        streams = [shard.keys.events for shard in self.shards]
        positions = self._positions(after)
        if "$" in positions:  # "new only": each shard's newest entry, so a cursor holds ids
            newest = (await keep_cancel(self.last_id())).split(",")
            positions = [n if p == "$" else p for p, n in zip(positions, newest, strict=True)]
        last = dict(zip(streams, positions, strict=True))
        redis = {shard.keys.events: shard.redis for shard in self.shards}
        reads: dict[asyncio.Future[Any], str] = {}
        try:
            while True:
                for stream in set(last) - set(reads.values()):
                    client = redis[stream]
                    longest = longest_block_ms(client)  # 0 (forever) is as long as any
                    block = min(block_ms, longest) if block_ms > 0 else longest
                    read = cast(Any, client).xread({stream: last[stream]}, block=block, count=1000)
                    reads[asyncio.ensure_future(read)] = stream
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: reads[f]):
                    stream = reads.pop(future)
                    for _stream, entries in future.result() or ():
                        for entry_id, fields in entries:
                            last[stream] = entry_id.decode()
                            cursor = ",".join(last[s] for s in streams)
                            for event in _events(entry_id, fields, cursor):
                                yield event
        finally:
            for future in reads:
                future.cancel()


def _position_before(low: str) -> str:
    """The cursor position just before an XRANGE start: "-", "(<id>" or "<ms>"."""
    if low == "-":
        return "0-0"
    if low.startswith("("):
        return low[1:]
    ms = int(low.partition("-")[0])
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0-0"  # the last id of ms - 1


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


def _events(entry_id: bytes, fields: dict[bytes, bytes], cursor: str) -> list[Event]:
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
                cursor=cursor,
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


def _searcher(text: str) -> Callable[[TaskInfo], bool]:
    """The dashboard's search box: what a user typing part of a name or an id means."""
    # `*` and `?` are wildcards, `[` is itself: as app.js matches rows added live.
    lowered = text.lower().replace("[", "[[]")
    pattern = lowered if "*" in text or "?" in text else f"*{lowered}*"
    return lambda info: (
        info.id.startswith(text) or fnmatch.fnmatchcase((info.name or "").lower(), pattern)
    )


def _matches(
    info: TaskInfo, state: str | TaskState | None, name: str | None, queue: str | None
) -> bool:
    if state and info.state != TaskState(str(state).upper()):
        return False
    if name and not fnmatch.fnmatchcase(info.name or "", name):
        return False
    return not (queue and info.queue != queue)
