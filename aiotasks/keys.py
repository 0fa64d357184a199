"""Keys: every Redis key and channel name, from one definition for Python and Lua.

`LAYOUT` is the only place a key name is spelled. `Keys` builds names from it in
Python; `lua_functions()` renders the same templates as Lua functions for
`lua/_contract.lua` (see contract.py), and a test checks that both sides build the
same names.

Every key carries its shard's hash tag, `{namespace}` for shard 0 and `{namespace#k...}`
for shard k (see shard_tag), so all keys of a shard hash to one cluster slot and every
Lua script (which touches one shard) stays cluster-safe; `Keys.guard` keeps scripts
from running while that slot migrates. A task lives in shard `shard_of(id)`.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

#: Priority buckets: one stream per priority level 0..9 (9 most urgent).
PRIORITIES = range(9, -1, -1)
DEFAULT_PRIORITY = 5

GROUP = "workers"
"""Name of the one consumer group on every stream."""

#: Key and channel templates below the `{namespace}:` prefix; `{x}` are the parts.
LAYOUT: dict[str, str] = {
    "stream": "q:{queue}:{priority}",  # stream of ready tasks of a queue at one priority
    "task": "t:{id}",  # hash: a task's state, result and metadata
    "done_channel": "done:{id}",  # channel: a task's state changes
    "reply_channel": "reply:{client}",  # channel: final states of one client's tasks
    "delayed": "delayed",  # zset: scheduled task ids by due time (ms)
    "dead": "dead:{queue}",  # stream: a queue's dead letters
    "chord": "chord:{id}",  # hash: a chord's counter, body and failure
    "chord_results": "chord:{id}:r",  # hash: a chord's header results by index
    "queues": "queues",  # set: queue names ever sent to
    "workers": "workers",  # zset: worker names by last heartbeat (ms)
    "worker": "worker:{name}",  # hash: one live worker's description
    "control_channel": "control",  # channel: broadcasts to every worker
    "periodic": "periodic",  # hash: periodic name -> next run (ms)
    "periodic_tick": "tick:{name}:{tick}",  # string: one-shot claim of a periodic tick
    "rate": "rate:{name}",  # string: GCRA state of one task name's rate limit
    "meta": "meta",  # hash: namespace settings scripts read (index_cap, events_cap)
    "index_done": "idx:done",  # zset: the most recent finished task ids by finish (ms)
    "events": "events",  # stream: state changes and worker joins/leaves, one entry a batch
    "slots": "slots:{key}",  # zset: ids holding a concurrency slot of a key, by lease end (ms)
    "slot_waiters": "slots:{key}:w",  # list: entries waiting for a slot of a key
    "slot_keys": "slots",  # set: concurrency keys that have waiters
    "paused": "paused",  # set: paused queue names
    "schedules": "schedules",  # hash: schedule name -> msgpack schedule
    "debounce": "debounce:{key}",  # string: the id of the latest send for a debounce key
    "group": "group:{id}",  # string: a saved group's member ids (GroupHandle.save)
    "guard": "guard",  # never written: every script's KEYS[2] (see Keys.guard)
}

_PART = re.compile(r"\{(\w+)\}")


def _parts(template: str) -> list[str]:
    return _PART.findall(template)


def shard_of(task_id: str, shards: int) -> int:
    """The shard a task id lives in, of `shards` (a handle needs only the id)."""
    if shards <= 1:
        return 0
    return zlib.crc32(task_id.encode()) % shards


def new_id(shards: int = 1, shard: int | None = None) -> str:
    """A task id: 32 random hex digits (as uuid4().hex, at a fifth of the cost); with
    `shard`, drawn again until it lands in that shard (`shards` tries on average)."""
    while True:
        task_id = os.urandom(16).hex()
        if shard is None or shard_of(task_id, shards) == shard:
            return task_id


#: What a namespace must be: it is the keys' hash tag, `{namespace}`.
NAMESPACE_RULE = "a non-empty name without '{' or '}'"


def is_namespace(value: object) -> bool:
    """Whether `value` can be a namespace (NAMESPACE_RULE): a brace would end the hash
    tag early, and an empty one is no tag at all (a Cluster spreads its keys)."""
    return isinstance(value, str) and value != "" and "{" not in value and "}" not in value


def namespace_pattern(namespace: str) -> str:
    """A SCAN pattern matching every key of a namespace, in all its shards."""
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", namespace)
    return "{" + escaped + "[}#]*"


@lru_cache(maxsize=256)
def shard_tag(namespace: str, shard: int, shards: int) -> str:
    """The hash tag of one shard: `namespace` for shard 0 (one shard is the classic
    layout), else `namespace#k` or `namespace#k.j`, j the first number that puts it in
    its own 1/shards of the cluster's 16384 slots, counted from shard 0's.

    A cluster made by `redis-cli --cluster create` gives each of its M masters one run of
    16384/M slots, so with shards = M (or a multiple) every master holds as many shards.
    """
    if shard == 0:
        return namespace
    width = REDIS_CLUSTER_HASH_SLOTS / shards
    first = int(key_slot(namespace.encode()) // width)
    want = (first + shard) % shards
    j = 0
    while True:
        tag = f"{namespace}#{shard}" + (f".{j}" if j else "")
        if int(key_slot(tag.encode()) // width) == want:
            return tag
        j += 1


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one shard of a namespace (shard 0 also holds the namespace-wide keys:
    registry, schedules, pauses, periodic ticks, rate limits, control channel)."""

    namespace: str
    shard: int = 0
    shards: int = 1

    @property
    def prefix(self) -> str:
        """Common prefix, `{tag}:` (see shard_tag: `{namespace}:` for shard 0); scripts
        take it as KEYS[1] and build from it."""
        if self.shard == 0:
            return "{" + self.namespace + "}:"
        return "{" + shard_tag(self.namespace, self.shard, self.shards) + "}:"

    def _key(self, kind: str, **parts: object) -> str:
        return self.prefix + LAYOUT[kind].format(**parts)

    def stream(self, queue: str, priority: int = DEFAULT_PRIORITY) -> str:
        """The stream holding ready tasks of one queue at one priority."""
        return self._key("stream", queue=queue, priority=priority)

    def streams(self, queue: str) -> list[str]:
        """A queue's streams, most urgent first."""
        return [self.stream(queue, p) for p in PRIORITIES]

    def task(self, task_id: str) -> str:
        """Hash with a task's state, result and metadata."""
        return self._key("task", id=task_id)

    def done_channel(self, task_id: str) -> str:
        """Pub/sub channel announcing a task's state changes."""
        return self._key("done_channel", id=task_id)

    def reply_channel(self, client_id: str) -> str:
        """Pub/sub channel on which one client hears the final states of its tasks."""
        return self._key("reply_channel", client=client_id)

    @property
    def delayed(self) -> str:
        """Sorted set of task ids waiting for countdown/eta/retry, scored by due time (ms)."""
        return self._key("delayed")

    def dead(self, queue: str) -> str:
        """Dead-letter stream of one queue."""
        return self._key("dead", queue=queue)

    def chord(self, chord_id: str) -> str:
        """Hash with a chord's size, counter, body and failure."""
        return self._key("chord", id=chord_id)

    def chord_results(self, chord_id: str) -> str:
        """Hash of a chord's header results by header index."""
        return self._key("chord_results", id=chord_id)

    @property
    def queues(self) -> str:
        """Set of queue names that have ever been sent to."""
        return self._key("queues")

    @property
    def workers(self) -> str:
        """Sorted set of worker names scored by last heartbeat (ms)."""
        return self._key("workers")

    def worker(self, name: str) -> str:
        """Hash describing one live worker (expires unless refreshed)."""
        return self._key("worker", name=name)

    @property
    def control_channel(self) -> str:
        """Pub/sub channel for broadcasts to all workers (revoke with terminate)."""
        return self._key("control_channel")

    @property
    def periodic(self) -> str:
        """Hash of periodic schedule name -> next run (ms), for `aiotasks status`."""
        return self._key("periodic")

    def periodic_tick(self, name: str, tick: int) -> str:
        """One-shot key claimed by the worker that fires a periodic tick."""
        return self._key("periodic_tick", name=name, tick=tick)

    def rate(self, task_name: str) -> str:
        """Rate-limit state (GCRA theoretical arrival time) of one task name."""
        return self._key("rate", name=task_name)

    @property
    def meta(self) -> str:
        """Hash of namespace settings the scripts read (the index and event caps)."""
        return self._key("meta")

    @property
    def index_done(self) -> str:
        """Sorted set of the most recent finished task ids, scored by finish time (ms)."""
        return self._key("index_done")

    def slots(self, key: str) -> str:
        """Sorted set of the task ids holding a concurrency slot of `key`, by lease end."""
        return self._key("slots", key=key)

    def slot_waiters(self, key: str) -> str:
        """List of the entries waiting for a concurrency slot of `key`."""
        return self._key("slot_waiters", key=key)

    @property
    def slot_keys(self) -> str:
        """Set of the concurrency keys that have waiting entries."""
        return self._key("slot_keys")

    @property
    def paused(self) -> str:
        """Set of paused queue names."""
        return self._key("paused")

    @property
    def schedules(self) -> str:
        """Hash of schedule name -> msgpack schedule (run-time and declared ones)."""
        return self._key("schedules")

    def debounce(self, key: str) -> str:
        """The id of the latest send for a debounce key (expires after its window)."""
        return self._key("debounce", key=key)

    def group(self, group_id: str) -> str:
        """A saved group's member task ids, a msgpack array (GroupHandle.save)."""
        return self._key("group", id=group_id)

    @property
    def guard(self) -> str:
        """A key no one writes, every script's KEYS[2] (KEYS[1], the prefix, is no key
        either). Redis checks a script's declared keys before it runs: while the slot
        migrates, a call naming missing keys gets ASK from the old master and TRYAGAIN
        from the new one, so a script never runs beside half-moved keys (creating a
        second copy of a stream the migration then cannot move: BUSYKEY). Clients retry
        TRYAGAIN; the slot's scripts pause for as long as the move takes."""
        return self._key("guard")

    @property
    def events(self) -> str:
        """Stream of the namespace's events: one entry per script call, capped."""
        return self._key("events")


def _lua_function(kind: str, template: str) -> str:
    parts = _parts(template)
    pieces: list[str] = []
    for literal, part in zip(_PART.split(template)[::2], [*parts, None], strict=True):
        if literal:
            pieces.append(repr(literal).replace('"', "'"))
        if part is not None:
            pieces.append(part)
    body = " .. ".join(["P", *pieces])
    return f"function K.{kind}({', '.join(parts)}) return {body} end"


def lua_functions() -> list[str]:
    """The LAYOUT as Lua: `K.<kind>(parts...)` builds a name from the prefix P (KEYS[1])."""
    return ["local K = {}", *(_lua_function(k, t) for k, t in LAYOUT.items())]
