"""Behind a Sentinel URL: leave a primary as soon as the Sentinels name another.

redis-py asks the Sentinels which server is the primary only when it opens a connection.
After a switchover (`SENTINEL FAILOVER`) the old primary stays a writable primary until
the Sentinels turn it into a replica, some ten seconds later, and pooled connections kept
writing to it: its resync from the new primary then threw those writes away (sends,
results, acks), with no error anywhere. A crashed primary has no such window: its
connections fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from .errors import describe

log = logging.getLogger(__name__)

#: Seconds between two questions to the Sentinels: at most this long of writes can go
#: to a primary after the Sentinels have named another.
INTERVAL = 0.5


class PrimaryWatch:
    """Asks the Sentinels every `interval` seconds which server is the primary and, when
    they name another than the one `pools` connect to, drops every connection of theirs,
    idle or in use (a command in flight on one fails as a lost connection, which every
    caller retries), so that the next ones go to the new primary.

    Args:
        pools: the Sentinel-managed pools of one service (commands, the notifier's).
        interval: seconds between two checks.
    """

    def __init__(self, pools: Sequence[SentinelConnectionPool], interval: float = INTERVAL):
        self.pools = list(pools)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._logged: tuple[str, int] | None = None  # the primary last logged

    def start(self) -> None:
        """Start checking in the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop checking, and close the connections to the Sentinels (redis-py's, which
        the pools' own closing leaves open)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        managers = {id(p.sentinel_manager): p.sentinel_manager for p in self.pools}
        for manager in managers.values():
            for client in cast(Any, manager).sentinels:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _run(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except (RedisError, OSError) as exc:
                # No Sentinel answers, or none names a primary (a failover under way):
                # connections opened meanwhile ask them again, and say so if they fail.
                log.debug("cannot ask the Sentinels for the primary: %s", describe(exc))
            except Exception as exc:  # a redis-py whose pools look otherwise: say so once
                if not warned:
                    warned = True
                    log.warning("cannot watch the Sentinels' primary: %r", exc)

    async def check(self) -> None:
        """Ask the Sentinels for the primary; drop every connection that goes elsewhere.

        Each pool is compared with what its own Sentinel client answers (each keeps the
        Sentinel that last answered first: two clients may ask two Sentinels), and each
        connection is looked at, not the pool's `master_address`: redis-py updates that
        whenever it opens a connection, closing only the idle ones, so connections in use
        then (a blocking read, the pub/sub one) would stay on the old primary."""
        answers: dict[int, tuple[str, int]] = {}
        for pool in self.pools:
            manager: Any = pool.sentinel_manager
            if id(manager) not in answers:
                host, port = await manager.discover_master(pool.service_name)
                answers[id(manager)] = (str(host), int(port))
            named = answers[id(manager)]
            conns: list[Any] = [*pool._available_connections, *pool._in_use_connections]
            stale = [c for c in conns if c.is_connected and (str(c.host), int(c.port)) != named]
            if not stale:
                continue
            left = ", ".join(sorted({f"{c.host}:{c.port}" for c in stale}))
            pool.master_address = named
            # A close that fails (a timeout) leaves the next check to try it again.
            await asyncio.gather(*(c.disconnect() for c in stale), return_exceptions=True)
            # Once per move, not per pool or per check (a flapping answer says it again).
            level = logging.WARNING if named != self._logged else logging.DEBUG
            self._logged = named
            log.log(
                level,
                "the Sentinels name a new primary for %r, %s:%s (was %s): connections to "
                "the old one are dropped",
                pool.service_name,
                *named,
                left,
                extra={"event": "primary_moved"},
            )
