"""Admin: read and operate a namespace's queues, workers and tasks (what the ops CLI uses).

```python
admin = Admin(app)
st = await admin.status()                 # queues, workers, periodic tasks
info = await admin.inspect(task_id)       # TaskInfo; TaskNotFound when no record exists
await admin.purge("default")              # waiting tasks deleted (and settled REVOKED)
await admin.requeue_dead("default")       # dead letters back on their streams
```
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from . import codec, payloads
from .contract import pack
from .errors import AiotasksError, SerializationError
from .handle import TaskHandle
from .keys import DEFAULT_PRIORITY, GROUP, Keys
from .message import now
from .state import PAYLOAD, TaskInfo, TaskState, unpack_payload

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .app import App
    from .client import Client

#: Above this many delayed tasks, `status()` reports only the total, not per queue
#: (counting per queue reads every scheduled task's queue name).
SCHEDULED_SCAN_LIMIT = 10_000
#: Tasks one purge.lua call deletes: bounds how long a purge blocks Redis per call.
PURGE_CHUNK = 500

_ENTRY_ID = re.compile(r"^\d+(-\d+)?$")
#: Where `arguments()` found them, by where payloads.read read them.
_WHERE = {
    payloads.SCHEDULED: "scheduled",
    payloads.ENTRY: "queued",
    payloads.DEAD: "dead letter",
    payloads.FAILURE: "kept payload",
}


class TaskNotFound(AiotasksError, LookupError):
    """No record of this task id exists (never sent, or its result expired)."""


class QueueNotFound(AiotasksError, LookupError):
    """No task was ever sent to this queue and none of its streams exist."""


class TaskUnreadable(AiotasksError, ValueError):
    """A task's record exists but cannot be read (an unknown state, a malformed field)."""


class CannotRetry(AiotasksError, ValueError):
    """A task cannot be sent again: it has not failed or been revoked, or its arguments
    are no longer known."""


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One queue: tasks waiting, running, scheduled and dead-lettered, and who consumes it.

    `length` counts the entries of its streams: `waiting` ones plus `in_flight` ones
    (delivered to a worker and not yet acknowledged). `consumers` is the
    consumer group's count, which keeps the names of workers that have died; `workers`
    counts live registered workers that serve the queue. `scheduled` is None when there
    are too many delayed tasks to count per queue (see Status.scheduled_total).
    """

    name: str
    length: int
    waiting: int
    in_flight: int
    scheduled: int | None
    dead_letters: int
    consumers: int
    workers: int
    paused: bool = False


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A live worker, as it last described itself in the registry."""

    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: datetime | None
    last_beat: datetime | None
    running: int
    done: int
    failed: int


@dataclass(frozen=True, slots=True)
class PeriodicStatus:
    """A periodic task and when it next fires (None when unknown)."""

    name: str
    next_run: datetime | None
    paused: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of one namespace."""

    namespace: str
    queues: list[QueueStatus]
    scheduled_total: int
    workers: list[WorkerStatus]
    periodic: list[PeriodicStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (datetimes as ISO 8601 strings)."""
        return cast(dict[str, Any], _jsonable(asdict(self)))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry of a dead-letter stream.

    `task_name` is None when the message cannot be decoded; `stream` is the stream the
    entry came from, where `requeue_dead` puts it back.
    """

    entry_id: str
    task_id: str | None
    task_name: str | None
    reason: str
    stream: str | None
    dead_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return cast(dict[str, Any], _jsonable(asdict(self)))


@dataclass(frozen=True, slots=True)
class Arguments:
    """A task's arguments, read back from its message: `where` it was found (`scheduled`,
    `queued`, `dead letter` or `kept payload`: a failed or revoked task's), or `error`
    when that message cannot be decoded."""

    where: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _text(raw: Any) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _ms_datetime(raw: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(raw) / 1000, UTC)
    except (TypeError, ValueError):
        return None


class Admin:
    """Operations on an App's namespace: status, inspect, revoke, purge, send, dead letters.

    Args:
        app: the App whose Redis and namespace are operated on.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.client = app.client

    @property
    def keys(self) -> Keys:
        """The namespace's key names."""
        return self.client.keys

    @property
    def redis(self) -> Redis:
        """The App's Redis client."""
        return self.client.redis

    # -- reading ------------------------------------------------------------------------

    @property
    def shards(self) -> list[Client]:
        """The client of each shard of the namespace (one unless `shards` > 1)."""
        return self.client.shards

    async def known_queues(self) -> list[str]:
        """Names of every queue ever sent to, sorted."""
        names: set[str] = set()
        for c in self.shards:
            members: set[bytes] = await cast(Any, c.redis).smembers(c.keys.queues)
            names.update(_text(m) for m in members)
        return sorted(names)

    async def check_queue(self, queue: str) -> None:
        """Raise QueueNotFound unless the queue was sent to, has a stream, or is paused.

        Raises:
            QueueNotFound: never sent to, not paused, and neither its streams nor dead
                letters exist.
        """
        for c in self.shards:
            keys = c.keys
            async with c.redis.pipeline(transaction=False) as pipe:
                pipe.sismember(keys.queues, queue)
                pipe.exists(*keys.streams(queue), keys.dead(queue))
                member, existing = await pipe.execute()
            if member or existing:
                return
        if queue in await self.app.queues.paused():  # status shows it: it can be purged
            return
        raise QueueNotFound(f"no queue named {queue!r} in namespace {self.keys.namespace!r}")

    async def status(self, queues: Sequence[str] = ()) -> Status:
        """A snapshot: every known queue (plus `queues`), live workers, periodic tasks.

        The queues are those sent to, paused, or served by a live worker, and `queues`.

        Args:
            queues: queue names to include even if nothing was ever sent to them.
        """
        workers = await self.workers()
        paused = await self.app.queues.paused()
        served = {q for w in workers for q in w.queues}
        names = sorted(set(await self.known_queues()) | set(queues) | set(paused) | served)
        scheduled_total, per_queue = await self._scheduled()
        stats = [
            replace(await self._queue(q, per_queue, workers), paused=q in paused) for q in names
        ]
        return Status(
            namespace=self.keys.namespace,
            queues=stats,
            scheduled_total=scheduled_total,
            workers=workers,
            periodic=await self.periodic(),
        )

    async def queue_status(self, queue: str) -> QueueStatus:
        """The status of one queue (whether or not it exists)."""
        _, scheduled = await self._scheduled()
        return await self._queue(queue, scheduled, await self.workers())

    async def _queue(
        self, queue: str, scheduled: dict[str, int] | None, workers: list[WorkerStatus]
    ) -> QueueStatus:
        length = in_flight = consumers = dead_letters = 0
        for c in self.shards:
            streams = c.keys.streams(queue)
            async with c.redis.pipeline(transaction=False) as pipe:
                for s in streams:
                    pipe.xlen(s)
                for s in streams:
                    pipe.xinfo_groups(s)
                pipe.xlen(c.keys.dead(queue))
                res = await pipe.execute(raise_on_error=False)
            lengths, infos, dead = res[: len(streams)], res[len(streams) : -1], res[-1]
            for groups in infos:
                if isinstance(groups, Exception):  # the stream does not exist (yet)
                    continue
                for g in groups:
                    if _text(g.get("name")) == GROUP:
                        in_flight += int(g.get("pending") or 0)
                        # Every worker reads all ten streams: the same consumers on each.
                        consumers = max(consumers, int(g.get("consumers") or 0))
            length += sum(n for n in lengths if isinstance(n, int))
            dead_letters += dead if isinstance(dead, int) else 0
        return QueueStatus(
            name=queue,
            length=length,
            waiting=max(length - in_flight, 0),
            in_flight=in_flight,
            scheduled=None if scheduled is None else scheduled.get(queue, 0),
            dead_letters=dead_letters,
            consumers=consumers,
            workers=sum(1 for w in workers if queue in w.queues),
        )

    async def _scheduled(self) -> tuple[int, dict[str, int] | None]:
        """Delayed tasks: the total, and per queue when there are few enough to read."""
        total = 0
        for c in self.shards:
            total += int(await cast(Any, c.redis).zcard(c.keys.delayed))
        if total > SCHEDULED_SCAN_LIMIT:
            return total, None
        counts: dict[str, int] = {}
        for c in self.shards:
            ids: list[bytes] = await cast(Any, c.redis).zrange(c.keys.delayed, 0, -1)
            for i in range(0, len(ids), 1000):
                async with c.redis.pipeline(transaction=False) as pipe:
                    for task_id in ids[i : i + 1000]:
                        cast(Any, pipe).hget(c.keys.task(_text(task_id)), "queue")
                    queues = await pipe.execute()
                for q in queues:
                    if q is not None:
                        counts[_text(q)] = counts.get(_text(q), 0) + 1
        return total, counts

    async def workers(self) -> list[WorkerStatus]:
        """Live workers (their registry hash has not expired), most recent beat first."""
        redis = cast(Any, self.redis)
        names: list[bytes] = await redis.zrevrange(self.keys.workers, 0, -1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                cast(Any, pipe).hgetall(self.keys.worker(_text(n)))
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        out = []
        for name, h in zip(names, hashes, strict=True):
            if not h:  # expired: the worker died without unregistering
                continue
            d = {_text(k): _text(v) for k, v in h.items()}
            out.append(
                WorkerStatus(
                    name=d.get("name", _text(name)),
                    host=d.get("host", ""),
                    pid=int(d.get("pid") or 0),
                    queues=[q for q in d.get("queues", "").split(",") if q],
                    concurrency=int(d.get("concurrency") or 0),
                    started_at=_ms_datetime(d.get("started_at")),
                    last_beat=_ms_datetime(d.get("last_beat")),
                    running=int(d.get("running") or 0),
                    done=int(d.get("done") or 0),
                    failed=int(d.get("failed") or 0),
                )
            )
        return out

    async def periodic(self) -> list[PeriodicStatus]:
        """Periodic tasks and their next run.

        The stored next run (hash `{ns}:periodic`, name -> epoch ms) wins; a periodic
        task of the App that has none yet is computed from its schedule.
        """
        raw: dict[bytes, bytes] = await cast(Any, self.redis).hgetall(self._periodic_key())
        stored = {_text(k): _ms_datetime(v) for k, v in raw.items()}
        out: dict[str, PeriodicStatus] = {}
        for p in self.app.periodic_tasks:
            name = str(getattr(p, "name", p))
            nxt = stored.get(name)
            if nxt is None and hasattr(p, "next_run"):
                nxt = p.next_run(datetime.now(UTC))
            out[name] = PeriodicStatus(name, nxt)
        for name, nxt in stored.items():
            out.setdefault(name, PeriodicStatus(name, nxt))
        for info in await self.app.schedules.list():
            nxt = None if info.paused else stored.get(info.name)
            out[info.name] = PeriodicStatus(info.name, nxt, info.paused)
        return sorted(out.values(), key=lambda p: p.name)

    def _periodic_key(self) -> str:
        return self.keys.periodic

    async def exists(self, task_id: str) -> bool:
        """Whether a record of the task exists (a hash holding only a waiter's watch mark,
        for an id never sent, is none)."""
        c = self.client.for_task(task_id)
        return bool(await cast(Any, c.redis).hexists(c.keys.task(task_id), "state"))

    async def inspect(self, task_id: str) -> TaskInfo:
        """Everything stored about a task.

        Raises:
            TaskNotFound: no record of the id (never sent, or expired).
            TaskUnreadable: the record has an unknown state or a malformed field.
        """
        if not await self.exists(task_id):
            raise TaskNotFound(f"no task with id {task_id!r} in namespace {self.keys.namespace!r}")
        try:
            return await self.app.handle(task_id).info()
        except ValueError as exc:
            raise await self._unreadable(task_id, exc) from exc

    async def arguments(self, task_id: str) -> Arguments | None:
        """The arguments of a task, from wherever its message still is.

        A scheduled task's record (`_rec`), a queued or running task's stream entry, a
        dead-lettered task's dead letter (among the newest DEAD_SCAN_LIMIT), or the
        payload a failed or revoked task's record keeps. None for a task that succeeded:
        its message is deleted then, and aiotasks keeps no copy.
        """
        p = await payloads.read(self.client, task_id)
        if p is None:
            return None
        where = _WHERE[p.source]
        if p.error is not None:
            return Arguments(where, error=p.error)
        return Arguments(where, p.args, p.kwargs)

    # -- acting -------------------------------------------------------------------------

    async def revoke(self, task_id: str, terminate: bool = False) -> TaskState:
        """Revoke a task (with terminate, cancel it if running); returns its prior state.

        A task already in a final state is left as it is.

        Raises:
            TaskNotFound: no record of the id (revoking it would only create one).
            TaskUnreadable: the record has an unknown state or a malformed field.
        """
        if not await self.exists(task_id):
            raise TaskNotFound(f"no task with id {task_id!r} in namespace {self.keys.namespace!r}")
        try:
            before = await self.app.handle(task_id).state()
        except ValueError as exc:
            raise await self._unreadable(task_id, exc) from exc
        if not before.is_final:
            await self.app.handle(task_id).revoke(terminate=terminate)
        return before

    async def _unreadable(self, task_id: str, exc: ValueError) -> TaskUnreadable:
        c = self.client.for_task(task_id)
        raw: Any = await cast(Any, c.redis).hget(c.keys.task(task_id), "state")
        state = None if raw is None else _text(raw)
        if state not in set(TaskState):
            problem = f"has an unknown state {state!r} (known: {', '.join(TaskState)})"
        else:
            problem = f"cannot be read ({exc})"
        return TaskUnreadable(
            f"the record of task {task_id!r} {problem}: "
            "written by another program or aiotasks version?"
        )

    async def retry(self, task_id: str) -> str:
        """Send a FAILURE or REVOKED task again, under its id, with its arguments.

        A dead-lettered task goes back from its dead letter as it was (chain and chord
        links included); any other is sent again alone, from the payload its record
        kept (name, arguments, queue, priority and run options). Returns what was done.

        Raises:
            TaskNotFound: no record of the id.
            TaskUnreadable: the record cannot be read.
            CannotRetry: the task is not FAILURE or REVOKED, or its arguments are gone.
        """
        info = await self.inspect(task_id)
        if info.state not in (TaskState.FAILURE, TaskState.REVOKED):
            raise CannotRetry(
                f"task {task_id} is {info.state}: only a FAILURE or REVOKED task can be retried"
            )
        queue = info.queue or self.app.settings.default_queue
        c = self.client.for_task(task_id)
        dead = await self._dead_entry(c, queue, task_id)
        if dead is not None:
            if await self._requeue(c, queue, [dead]):
                return f"put back from its dead letter {dead} on queue {queue!r}"
            raise CannotRetry(
                f"the dead letter {dead} of task {task_id} holds no message to run (a "
                "scheduled task whose record could not be read): nothing to send"
            )
        raw: bytes | None = await cast(Any, c.redis).hget(c.keys.task(task_id), PAYLOAD)
        if raw is None:
            raise CannotRetry(
                f"the arguments of task {task_id} ({info.state}) are no longer known "
                "(it never ran, or it ended before aiotasks kept them): nothing to send"
            )
        try:
            p = unpack_payload(raw, self.client.read_limit)
        except SerializationError as exc:
            raise CannotRetry(
                f"the kept arguments of task {task_id} cannot be read: {exc}"
            ) from None
        args = p.args
        if p.chord_body is not None:
            # A chord's body ran with its header results first, which its payload does not
            # hold: they are read again from the chord, while it is kept.
            results = await self.client.chord_results(p.chord_body)
            if not results:
                raise CannotRetry(
                    f"task {task_id} is the body of chord {p.chord_body}, whose header results "
                    "are no longer kept: its arguments cannot be rebuilt (send the chord again)"
                )
            args = [results, *args]
        await self.app.send_task(
            p.name, args, p.kwargs, task_id=task_id, queue=queue, priority=p.priority, **p.opts
        )
        return f"sent again to queue {queue!r} with its arguments"

    async def _dead_entry(self, c: Client, queue: str, task_id: str) -> str | None:
        """The id of the newest dead letter of `task_id` on `queue` (in shard `c`), if any."""
        dead, end = c.keys.dead(queue), "+"
        want = task_id.encode()
        while True:
            batch: list[Any] = await cast(Any, c.redis).xrevrange(dead, max=end, count=500)
            for entry_id, fields in batch:
                if fields.get(b"id") == want:
                    return _text(entry_id)
            if len(batch) < 500:
                return None
            end = "(" + _text(batch[-1][0])

    async def send(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
        **options: Any,
    ) -> TaskHandle[Any]:
        """Send a task by name (see App.send_task); `queue` None means its usual route."""
        if queue is not None:
            options["queue"] = queue
        return await self.app.send_task(name, args, kwargs, **options)

    async def purge(self, queue: str) -> int:
        """Delete every waiting task of a queue, and its scheduled ones; returns how many.

        Tasks a worker is running are left alone. Each deleted task is settled REVOKED so
        that whoever waits on it (a handle, a chord, a chain) does not wait forever. The
        streams and their consumer group stay. Work is done in chunks of PURGE_CHUNK, so
        a large purge does not block Redis; tasks sent after the purge began are kept.

        Raises:
            QueueNotFound: see check_queue.
        """
        await self.check_queue(queue)
        total = 0
        for c in self.shards:
            total += await self._purge(c, queue)
        return total

    async def _purge(self, c: Client, queue: str) -> int:
        """purge() in one shard."""
        streams = c.keys.streams(queue)
        ttl = self.app.settings.result_ttl

        async def chunk(mode: str, bound: bytes) -> tuple[int, bytes]:
            return await c.scripts.purge(
                streams=streams,
                queue=queue,
                now_ms=int(now() * 1000),
                ttl=ttl,
                limit=PURGE_CHUNK,
                mode=mode,
                bound=bound,
            )

        total = 0
        # Streams: the script answers whether more remain below the bounds taken now.
        bounds = pack(await self._last_ids(c, streams))
        more = b"1"
        while more != b"0":
            n, more = await chunk("streams", bounds)
            total += n
        # The delayed set: a scan cursor, done when it comes back to "0".
        cursor = b"0"
        while True:
            n, cursor = await chunk("delayed", cursor)
            total += n
            if cursor == b"0":
                return total

    async def _last_ids(self, c: Client, streams: list[str]) -> dict[str, bytes]:
        """Each stream's newest entry id now: a purge deletes nothing added after it."""
        async with c.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrevrange(stream, count=1)
            found = await pipe.execute()
        return {s: last[0][0] for s, last in zip(streams, found, strict=True) if last}

    # -- dead letters -------------------------------------------------------------------

    async def dead_letters(self, queue: str, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` dead letters of a queue.

        Raises:
            QueueNotFound: see check_queue.
        """
        await self.check_queue(queue)
        entries: list[Any] = []
        for c in self.shards:
            entries += await cast(Any, c.redis).xrange(c.keys.dead(queue), count=count)
        if len(self.shards) > 1:  # oldest first over every shard
            entries = sorted(entries, key=lambda e: _entry_order(e[0]))[:count]
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

    async def requeue_dead(self, queue: str, entry_ids: Sequence[str] | None = None) -> int:
        """Move dead letters back to the stream they came from; returns how many moved.

        Each goes back with its original fields, and its task reads PENDING again. A
        chord or chain that the dead letter failed stays failed.

        Args:
            queue: the queue whose dead letters to requeue.
            entry_ids: dead-letter entry ids; None means all of them.

        Raises:
            QueueNotFound: see check_queue.
            ValueError: an entry id is malformed.
        """
        await self.check_queue(queue)
        ids = None if entry_ids is None else parse_entry_ids(entry_ids)
        moved = 0
        for c in self.shards:  # an id names an entry of whichever shard holds it
            moved += await self._requeue_all(c, queue, ids)
        return moved

    async def _requeue_all(self, c: Client, queue: str, ids: list[str] | None) -> int:
        if ids is not None:
            return await self._requeue(c, queue, ids)
        # Only the letters there now: a worker may dead-letter a requeued task again
        # while this runs, and taking those too requeued each letter many times over.
        newest: list[Any] = await cast(Any, c.redis).xrevrange(c.keys.dead(queue), count=1)
        if not newest:
            return 0
        moved, start, last = 0, "-", _text(newest[0][0])
        while True:
            batch: list[Any] = await cast(Any, c.redis).xrange(
                c.keys.dead(queue), min=start, max=last, count=100
            )
            if not batch:
                return moved
            moved += await self._requeue(c, queue, [_text(e) for e, _ in batch])
            start = "(" + _text(batch[-1][0])

    async def _requeue(self, c: Client, queue: str, entry_ids: list[str]) -> int:
        dead = c.keys.dead(queue)
        moved = 0
        for i in range(0, len(entry_ids), 100):
            chunk = entry_ids[i : i + 100]
            names = await self._names(c, dead, chunk)
            requeued = await c.scripts.requeue(
                dead=dead,
                fallback=c.keys.stream(queue, DEFAULT_PRIORITY),
                queue=queue,
                now_ms=int(now() * 1000),
                ttl=self.app.settings.result_ttl,
                entries=[{"entry": e, "name": names.get(e, "")} for e in chunk],
            )
            moved += len(requeued)
        return moved

    async def _names(self, c: Client, dead: str, entry_ids: list[str]) -> dict[str, str]:
        """Task names of dead letters (to restore a task record that has expired)."""
        async with c.redis.pipeline(transaction=False) as pipe:
            for e in entry_ids:
                pipe.xrange(dead, min=e, max=e, count=1)
            found = await pipe.execute()
        out = {}
        for entry_id, entries in zip(entry_ids, found, strict=True):
            if entries:
                name = _dead_letter(*entries[0]).task_name
                out[entry_id] = name or ""
        return out

    async def drop_dead(self, queue: str, entry_ids: Sequence[str] | None = None) -> int:
        """Delete dead letters for good; returns how many were deleted.

        Args:
            queue: the queue whose dead letters to delete.
            entry_ids: dead-letter entry ids; None means all of them.

        Raises:
            QueueNotFound: see check_queue.
            ValueError: an entry id is malformed.
        """
        await self.check_queue(queue)
        ids = None if entry_ids is None else parse_entry_ids(entry_ids)
        dropped = 0
        for c in self.shards:
            dead = c.keys.dead(queue)
            if ids is None:
                dropped += int(await c.redis.xtrim(dead, maxlen=0, approximate=False))
            elif ids:
                dropped += int(await c.redis.xdel(dead, *ids))
        return dropped


def parse_entry_ids(entry_ids: Sequence[str]) -> list[str]:
    """Check stream entry ids (e.g. 1712345678901-0), dropping repeats; ValueError if malformed."""
    bad = [e for e in entry_ids if not _ENTRY_ID.match(e)]
    if bad:
        raise ValueError(f"malformed entry id(s): {', '.join(bad)} (expected e.g. 1712345678901-0)")
    return list(dict.fromkeys(entry_ids))


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _dead_letter(entry_id: bytes, raw: dict[bytes, bytes]) -> DeadLetter:
    f = {_text(k): v for k, v in raw.items()}
    name: str | None = None
    try:
        payload = codec.decode(f["m"], _text(f["ct"]))
        if isinstance(payload, dict) and isinstance(payload.get("name"), str):
            name = payload["name"]
    except Exception:  # undecodable is a reason entries land here: show what we can
        name = None
    eid = _text(entry_id)
    return DeadLetter(
        entry_id=eid,
        task_id=_text(f["id"]) if "id" in f else None,
        task_name=name,
        reason=_text(f.get("reason", b"")),
        stream=_text(f["stream"]) if "stream" in f else None,
        dead_at=datetime.fromtimestamp(int(eid.split("-")[0]) / 1000, UTC),
    )


__all__ = [
    "Admin",
    "Arguments",
    "CannotRetry",
    "DeadLetter",
    "PeriodicStatus",
    "QueueNotFound",
    "QueueStatus",
    "Status",
    "TaskNotFound",
    "TaskUnreadable",
    "WorkerStatus",
    "parse_entry_ids",
]
