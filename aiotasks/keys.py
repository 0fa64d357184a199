"""Keys: the only place a Redis key or channel name is spelled.

Every key carries the `{namespace}` hash tag, so all of an app's keys hash to one
cluster slot and every Lua script stays cluster-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Priority buckets: one stream per priority level 0..9 (9 most urgent).
PRIORITIES = range(9, -1, -1)
DEFAULT_PRIORITY = 5


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names of one namespace."""

    namespace: str

    @property
    def prefix(self) -> str:
        """Common prefix, passed to Lua scripts that derive per-task keys."""
        return "{" + self.namespace + "}:"

    def stream(self, queue: str, priority: int = DEFAULT_PRIORITY) -> str:
        """The stream holding ready tasks of one queue at one priority."""
        return f"{self.prefix}q:{queue}:{priority}"

    def streams(self, queue: str) -> list[str]:
        """A queue's streams, most urgent first."""
        return [self.stream(queue, p) for p in PRIORITIES]

    def task(self, task_id: str) -> str:
        """Hash with a task's state, result and metadata."""
        return f"{self.prefix}t:{task_id}"

    def done_channel(self, task_id: str) -> str:
        """Pub/sub channel announcing a task's state changes."""
        return f"{self.prefix}done:{task_id}"

    def reply_channel(self, client_id: str) -> str:
        """Pub/sub channel on which one App process hears the final states of its tasks."""
        return f"{self.prefix}reply:{client_id}"

    @property
    def delayed(self) -> str:
        """Sorted set of task ids waiting for countdown/eta/retry, scored by due time (ms)."""
        return f"{self.prefix}delayed"

    def dead(self, queue: str) -> str:
        """Dead-letter stream of one queue."""
        return f"{self.prefix}dead:{queue}"

    def chord(self, chord_id: str) -> str:
        """Hash with a chord's size, counter, body and failure."""
        return f"{self.prefix}chord:{chord_id}"

    def chord_results(self, chord_id: str) -> str:
        """Hash of a chord's header results by header index."""
        return f"{self.prefix}chord:{chord_id}:r"

    @property
    def queues(self) -> str:
        """Set of queue names that have ever been sent to."""
        return f"{self.prefix}queues"

    @property
    def workers(self) -> str:
        """Sorted set of worker names scored by last heartbeat (ms)."""
        return f"{self.prefix}workers"

    def worker(self, name: str) -> str:
        """Hash describing one live worker (expires unless refreshed)."""
        return f"{self.prefix}worker:{name}"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel for broadcasts to all workers (revoke with terminate)."""
        return f"{self.prefix}control"

    @property
    def periodic(self) -> str:
        """Hash of periodic schedule name -> next run (ms), for `aiotasks status`."""
        return f"{self.prefix}periodic"

    def periodic_tick(self, name: str, tick: int) -> str:
        """One-shot key claimed by the worker that fires a periodic tick."""
        return f"{self.prefix}tick:{name}:{tick}"

    def rate(self, task_name: str) -> str:
        """Rate-limit state (GCRA theoretical arrival time) of one task name."""
        return f"{self.prefix}rate:{task_name}"


GROUP = "workers"
"""Name of the one consumer group on every stream."""
