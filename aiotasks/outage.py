"""One log line when a worker loses Redis, one when Redis is back.

A worker's loops (fetching, storing outcomes, the heartbeat, the periodic scheduler) each
retry on their own when Redis goes away. Each logging every retry made a 30 s outage 75
lines; they share one Outage instead: the first failure is an ERROR, the others DEBUG, a
reminder every REMIND seconds while it lasts, and a WARNING with its length once a loop
gets through again: any loop, after a lost connection (one success shows it is back);
after a refusal (a primary refusing writes after a failover, NOREPLICAS, lets reads
through), any loop's write, or else every loop that was refused: one read's success
would flap it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from .errors import CONNECTION_ERRORS, BrokerRefusedError, describe
from .refusals import refusal

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("aiotasks.worker")

#: What a worker's loop logs and tries again after: Redis gone, or refusing.
LOOP_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    ResponseError,
    BrokerRefusedError,
)

#: Seconds between two reminders that Redis is still unreachable.
REMIND = 60.0
#: Seconds after which a loop that was refused and tried no more since no longer holds
#: an outage open: past every loop's longest backoff, so it stopped (a shard's heartbeat
#: beats only while that shard runs tasks), or its refusal is over.
FORGET = 30.0


class Outage:
    """The state of a worker's connection to Redis, as its loops see it."""

    def __init__(self, who: str, url: str) -> None:
        self.who = who
        self.url = url
        self.since: float | None = None  # monotonic time of the first failure, if down
        self._reminded = 0.0
        # The loops Redis refused that have not got through, with when last refused.
        self._refused: dict[str, float] = {}

    def failed(
        self, what: str, exc: BaseException, retry_in: float | None = None, loop: str = ""
    ) -> None:
        """`what` (a loop: "fetch", "heartbeat", ...; `loop` names it when `what` says
        more) could not reach Redis."""
        now = time.monotonic()
        if not isinstance(exc, CONNECTION_ERRORS):
            self._refused[loop or what] = now
        retry = f"; retrying in {retry_in:.1f} s" if retry_in is not None else ""
        if self.since is None:
            self.since = self._reminded = now
            log.error(
                "%s lost Redis at %s (%s: %s)%s",
                self.who,
                self.url,
                what,
                describe(exc),
                retry,
                extra={"outage": "started"},
            )
        elif now - self._reminded >= REMIND:
            self._reminded = now
            log.error(
                "%s still cannot reach Redis at %s after %.0f s (%s: %s)%s",
                self.who,
                self.url,
                now - self.since,
                what,
                describe(exc),
                retry,
                extra={"outage": "ongoing"},
            )
        else:
            log.debug("%s: %s cannot reach Redis (%s)%s", self.who, what, exc, retry)

    def report(
        self, client: Client, what: str, exc: BaseException, retry_in: float | None = None
    ) -> None:
        """A loop's call to `client` failed: through the outage when the worker waits it
        out (a lost connection, a failover's refusal), else an ERROR line of its own,
        naming this outage's server (a shard's heartbeat goes through the root client)."""
        if client.waits_out(exc):
            self.failed(what, exc, retry_in)
            return
        if isinstance(exc, ResponseError):
            exc = refusal(self.url, exc, f"the {what}")
        retry = f"; retrying in {retry_in:.1f} s" if retry_in is not None else ""
        log.error("%s: %s%s", self.who, exc, retry)

    def ok(self, loop: str, wrote: bool = False) -> None:
        """`loop` got through: say Redis is back (once), unless another loop it refused
        has not got through yet. A call that `wrote` shows that the refusal is over for
        every loop (Redis refuses writes, not loops); one that only read does not."""
        if self.since is not None:
            if wrote:
                self._refused.clear()
            self._refused.pop(loop, None)
            now = time.monotonic()
            if any(now - at < FORGET for at in self._refused.values()):
                return
            self._refused.clear()
            took = time.monotonic() - self.since
            self.since = None
            log.warning(
                "%s: Redis at %s is back after %.1f s",
                self.who,
                self.url,
                took,
                extra={"outage": "ended", "duration": round(took, 3)},
            )
