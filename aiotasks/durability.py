"""Durability: whether the Redis server keeps what aiotasks writes, and saying so when not.

```
server_risks(redis)       what may make this server drop tasks (no persistence, eviction)
DataLoss                  one worker's report of data the server lost: an ERROR line, once
                          per loss, naming the queues, plus the `data_lost` hooks (metrics)
```

A server that keeps nothing on disk loses every queued task and result when it restarts;
one whose `maxmemory-policy` evicts keys drops them when memory runs short. Both look
like tasks that never finish. BullMQ and Sidekiq warn about the same at startup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from .errors import CONNECTION_ERRORS

if TYPE_CHECKING:
    from redis.asyncio import Redis

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
        # One name per call: CONFIG GET takes several only from Redis 7.
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.config_get(name)
            replies = await pipe.execute()
        return {k: _text(v) for reply in replies for k, v in dict(reply).items()}
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


class DataLoss:
    """Reports what one worker finds lost: an ERROR line once per loss, and the hooks.

    A loss shows as consumer groups gone (a worker creates them at start, so a group
    that is missing later was lost with the data) or as the worker's registration gone
    before it could expire. One loss may show both ways, in either order: a report
    within `window` seconds of the last one belongs to the same loss.
    """

    def __init__(self, worker: str, url: str, hooks: Hooks, window: float) -> None:
        self.worker = worker
        self.url = url
        self.hooks = hooks
        self.window = window
        self.count = 0
        self._last = float("-inf")

    def is_recent(self) -> bool:
        """Whether a loss was reported within the window."""
        return time.monotonic() - self._last < self.window

    async def report(self, queues: Iterable[str], sign: str) -> None:
        """Say that the server lost data on `queues`; `sign` is what showed it."""
        names = sorted(set(queues))
        self._last = time.monotonic()
        self.count += 1
        log.error(
            "worker %s: Redis at %s LOST DATA: %s (queue %s); tasks that were queued, "
            "scheduled or running there are gone and their waiters get TaskLost. Was the "
            "server restarted without persistence, or are keys evicted? (%s)",
            self.worker,
            self.url,
            sign,
            ", ".join(repr(q) for q in names),
            SEE,
            extra={"event": "data_lost", "queues": names, "worker": self.worker},
        )
        await self.hooks.call(self.hooks.data_lost, names)
