"""Durability: whether the Redis server keeps what aiotasks writes, and saying so when not.

```
server_risks(redis)       what may make this server drop tasks (no persistence, eviction)
DataLoss                  one worker's report of data the server lost: an ERROR line, once
                          per loss, naming the queues, plus the `data_lost` hooks (metrics)
warn_if_unsafe(redis, url)  one WARNING when server_risks finds something
```

A server that keeps nothing on disk loses every queued task and result when it restarts;
one whose `maxmemory-policy` evicts keys drops them when memory runs short. Both look
like tasks that never finish. BullMQ and Sidekiq warn about the same at startup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from .errors import CONNECTION_ERRORS

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .client import Client
    from .hooks import Hooks

log = logging.getLogger("aiotasks.worker")

_READ_ERRORS: tuple[type[BaseException], ...] = (ResponseError, *CONNECTION_ERRORS)

#: Where the README explains what to change.
SEE = "see the README, 'Running Redis for aiotasks'"


async def server_risks(redis: Redis) -> list[str]:
    """What may make this server lose tasks, one phrase each (empty: nothing known).

    Reads CONFIG GET; a user without that permission (or a managed server that renames
    CONFIG) is read through INFO instead, which does not tell whether RDB snapshots
    are on: then only an evicting policy is reported.
    """
    conf = await _config(redis)
    risks = []
    if conf.get("appendonly") == "no" and conf.get("save") == "":
        risks.append(
            "it keeps nothing on disk (save '' and appendonly no): a restart loses every "
            "queued and scheduled task and every result"
        )
    policy = conf.get("maxmemory-policy", "noeviction")
    if policy.startswith("allkeys"):
        risks.append(
            f"its maxmemory-policy is {policy}: when memory runs short it evicts any key, "
            "queued tasks and their streams included"
        )
    elif policy != "noeviction":
        risks.append(
            f"its maxmemory-policy is {policy}: when memory runs short it evicts keys "
            "with a TTL, so task records, scheduled tasks and results may vanish"
        )
    return risks


async def _config(redis: Redis) -> dict[str, str]:
    """save, appendonly and maxmemory-policy, from CONFIG GET or else from INFO."""
    names = ("save", "appendonly", "maxmemory-policy")
    try:
        # One name per call: CONFIG GET takes several only from Redis 7. Not pipelined:
        # a cluster client cannot pipeline a command without a key (a worker's start
        # pays three round trips).
        replies = [await redis.config_get(name) for name in names]
        return {_text(k): _text(v) for reply in replies for k, v in dict(reply).items()}
    except ResponseError:  # NOPERM, or CONFIG renamed away
        pass
    persistence = await redis.info("persistence")
    memory = await redis.info("memory")
    conf = {"maxmemory-policy": _text(memory.get("maxmemory_policy", "noeviction"))}
    conf["appendonly"] = "yes" if str(persistence.get("aof_enabled", "1")) == "1" else "no"
    return conf


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def warn_if_unsafe(redis: Redis, url: str) -> None:
    """Log one WARNING when the server at `url` may lose tasks (see server_risks)."""
    try:
        risks = await server_risks(redis)
    except _READ_ERRORS as exc:
        log.debug("cannot read the persistence settings of Redis at %s: %s", url, exc)
        return
    if risks:
        log.warning(
            "Redis at %s may lose tasks: %s (%s; silence with App(warn_on_unsafe_server=False))",
            url,
            "; ".join(risks),
            SEE,
            extra={"event": "unsafe_server", "risks": risks},
        )


#: How a loss shows: a worker creates its groups at start, so a missing one was lost.
GROUPS_GONE = "the consumer groups were gone"
#: How a loss shows to a worker whose groups another worker recreated first.
REGISTRATION_GONE = "this worker's registration vanished before it expired"


class DataLoss:
    """Reports what one worker finds lost: an ERROR line once per loss, and the hooks.

    A loss shows as consumer groups gone (a worker creates them at start, so a group
    that is missing later was lost with the data) or as the worker's registration gone
    before it could expire. One loss may show both ways, in either order: a sign found
    within `window` seconds of the last report belongs to the same loss, unless it names
    a queue no report in that window named (so a second loss of the same queues within
    the window is not reported again).

    Args:
        worker: the worker's name.
        client: its Client (the groups are recreated through it).
        served: the worker's streams, each with the queue it belongs to.
        hooks: the App's hooks (`data_lost` is called with the queues).
        window: seconds within which two signs are one loss.
    """

    def __init__(
        self, worker: str, client: Client, served: dict[str, str], hooks: Hooks, window: float
    ) -> None:
        self.worker = worker
        self.client = client
        self.served = served
        self.hooks = hooks
        self.window = window
        self.count = 0
        self._last = float("-inf")
        self._named: set[str] = set()

    async def found(self, streams: Sequence[str], sign: str) -> None:
        """The server lost data (the groups of `streams` were recreated, or `sign` shows
        it): recreate every missing group now, so that the loss is reported once, naming
        all its queues."""
        lost = [*streams, *await self.client.ensure_groups(list(self.served))]
        queues = sorted({self.served[s] for s in lost if s in self.served})
        if queues and sign != GROUPS_GONE:
            sign = f"{sign}, and {GROUPS_GONE}"
        named = queues or sorted(set(self.served.values()))
        # Within the window, only a queue the last report did not name is news: the
        # heartbeat and a fetch in flight may each find the same loss.
        if time.monotonic() - self._last < self.window and set(named) <= self._named:
            return
        await self._report(named, sign)

    async def _report(self, queues: list[str], sign: str) -> None:
        now = time.monotonic()
        self._named = set(queues) | (self._named if now - self._last < self.window else set())
        self._last = now
        self.count += 1
        log.error(
            "worker %s: Redis at %s LOST DATA: %s (queue %s); tasks that were queued, "
            "scheduled or running there are gone and their waiters get TaskLost. Was the "
            "server restarted without persistence, or are keys evicted%s? (%s)",
            self.worker,
            self.client.url,
            sign,
            ", ".join(repr(q) for q in queues),
            ", or did a failover lose writes its replica had not received"
            if self.client.topology.failover
            else "",
            SEE,
            extra={"event": "data_lost", "queues": queues, "worker": self.worker},
        )
        await self.hooks.call(self.hooks.data_lost, queues)
