"""Outcomes: a worker's finished runs, turned into finish.lua ops and committed in batches.

Every outcome of a batch goes to Redis in one finish.lua call, which stores the results,
acknowledges and deletes the entries, wakes the waiters and settles chords and chains. An
entry stays in the worker's table of running entries (and keeps its heartbeat) until its
commit lands. An outcome whose ops cannot be built (aiotasks' own code failed) or that
Redis refuses is recorded once as an InternalError FAILURE, never left to redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import codec
from .backoff import Backoff
from .compiler import continuation, replacement
from .contract import DEFER, RETRY, Op, ack_op, dead_op, done_op, enqueue_op, wait_op
from .errors import SerializationError
from .execution import Execution, Kind, Outcome, Phase, failure, internal_error
from .message import now
from .outage import Outage
from .state import PAYLOAD, entry_payload

if TYPE_CHECKING:
    from .app import App
    from .client import Client
    from .scripts import Scripts

log = logging.getLogger("aiotasks.worker")

Key = tuple[str, bytes]

#: Tries of the InternalError fallback of a refused outcome before it is left pending.
FALLBACK_TRIES = 10


@dataclass(slots=True)
class Group:
    """The ops that record one delivery's outcome, and that delivery's execution."""

    ops: list[Op]
    ex: Execution


class Outcomes:
    """The commit buffer of one worker.

    Args:
        app: the App (task registry and settings) whose tasks ran.
        client: where outcomes are committed.
        worker: the worker's name, recorded on each task.
        streams: the worker's streams (declared to finish.lua).
        committed: called with the keys of entries whose outcomes landed.
    """

    def __init__(
        self,
        app: App,
        client: Client,
        worker: str,
        streams: list[str],
        committed: Callable[[list[Key]], None],
        outage: Outage | None = None,
    ) -> None:
        self.app = app
        self.outage = outage or Outage(f"worker {worker}", client.url)
        self.client = client
        #: The scripts commits go through: the client's, or the worker's own for its run.
        self.scripts: Scripts | None = None
        self.worker = worker
        self.streams = streams
        self._committed = committed
        self.done = 0
        self.failed = 0
        # One group of ops per entry, applied in order, with the run it records.
        self._groups: list[Group] = []
        self._committing = 0  # outcomes of the commit under way
        self._flush = asyncio.Event()
        self._commit_lock = asyncio.Lock()

    @property
    def has_ops(self) -> bool:
        """Whether outcomes wait to be committed."""
        return bool(self._groups)

    def add(self, ex: Execution, out: Outcome) -> None:
        """Queue the outcome of a delivery for the next batched commit."""
        try:
            ops = self._ops_for(ex, out)
        except Exception as exc:
            log.exception("worker %s: cannot record the outcome of %s", self.worker, ex.tid)
            out = internal_error(exc)
            ops = [self._done(ex, out, self._fields(ex, out))]
        self._groups.append(Group(ops, ex))
        self._count(out)
        self._log(ex, out)
        ex.phase = Phase.COMMITTING
        self._flush.set()

    def _count(self, out: Outcome) -> None:
        if out.kind in (Kind.FAILURE, Kind.DEAD):
            self.failed += 1
        elif out.kind not in (Kind.RETRY, Kind.DEFER, Kind.REPLACED, Kind.WAIT):
            self.done += 1

    def _ops_for(self, ex: Execution, out: Outcome) -> list[Op]:
        d = ex.delivery
        if out.kind is Kind.DEAD:
            ttl = self.app.settings.result_ttl
            tid = ex.tid or ""
            return [
                dead_op(
                    d.stream, d.entry_id, tid, d.queue, out.exc_type, out.exc_message, ttl, d.fields
                )
            ]
        msg, opts = ex.msg, ex.opts
        assert msg is not None and opts is not None, "only a decoded delivery runs"
        if out.kind is Kind.WAIT:
            w = out.value
            return [
                wait_op(
                    d.stream, d.entry_id, msg.id, w["key"], w["limit"], w["lease"], d.deliveries
                )
            ]
        if out.kind in (Kind.RETRY, Kind.DEFER):
            again = (
                msg.with_retry(out.retry_at)
                if out.kind is Kind.RETRY
                else msg.deferred(out.retry_at or now(), out.rate_reserved)
            )
            s = self.app.settings
            record = again.record(opts.result_ttl, **s.encoding)
            mode = RETRY if out.kind is Kind.RETRY else DEFER
            # The retry is enqueued before the entry is acked: a refused enqueue (a Lua
            # error does not roll back) must not leave the entry acked and the task gone.
            return [enqueue_op(mode, record), ack_op(d.stream, d.entry_id, msg.id, ex.slot)]
        if out.kind is Kind.REPLACED:
            return [
                *replacement(self.app, self.client, msg, out.value, ex.trace),
                ack_op(d.stream, d.entry_id, msg.id, ex.slot),
            ]
        fields = self._fields(ex, out)
        follow: list[Op] = []
        chord_value: bytes | None = None
        if out.kind is Kind.SUCCESS:
            try:
                limit = self.app.settings.max_message_size
                data, ct = codec.encode(out.value, msg.serializer, msg.compression, max_size=limit)
            except SerializationError as exc:
                failed = failure(exc, "SerializationError")
                out.kind, out.exc_type, out.exc_message = (
                    Kind.FAILURE,
                    failed.exc_type,
                    (f"cannot encode the result: {exc}"),
                )
                out.traceback = failed.traceback
                fields = self._fields(ex, out)
            else:
                fields += ("result", data, "ct", ct)
                if msg.chord is not None and not msg.chain:
                    chord_value = ct.encode() + b"\n" + data
                if msg.chain or msg.link:
                    follow += continuation(self.app, self.client, msg, out.value, ex.trace)
        # Follow-ups first, for the same reason: a refused one leaves nothing recorded.
        return [*follow, self._done(ex, out, fields, chord_value)]

    def _fields(self, ex: Execution, out: Outcome) -> list[Any]:
        """The fields a run's final write stores, flat (name, value, ...): finish.lua
        hands them to HSET as they are."""
        elapsed = (ex.ended or time.perf_counter()) - ex.started
        finished = now()
        # Both floored from seconds, as every stored time is: flooring the start after
        # subtracting from an already floored finish put it a millisecond before a send
        # made in the same millisecond (enqueued_at > started_at). `worker` and
        # `attempts` again, though the start wrote them: a run that commits late (its
        # worker stalled past the visibility timeout while another reran the task)
        # stores its own with its result, not the rerun's.
        # As text: a number reaches HSET through Lua's snprintf (~3k Redis instructions).
        fields: list[Any] = [
            "started_at",
            str(int((finished - elapsed) * 1000)),
            "finished_at",
            str(int(finished * 1000)),
            "attempts",
            str((ex.msg.retries if ex.msg else 0) + ex.delivery.deliveries),
            "worker",
            self.worker,
        ]
        if out.kind is Kind.FAILURE:
            fields += ("exc_type", out.exc_type, "exc_message", out.exc_message)
            if out.traceback is not None:
                fields += ("traceback", out.traceback)
            payload = entry_payload(ex.delivery.fields, ex.delivery.priority)
            if payload is not None:
                # Failures are rare: keep what it was sent with (as sent, no re-encoding),
                # for `aiotasks retry`, `inspect` and the dashboard.
                fields += (PAYLOAD, payload)
        return fields

    def _done(
        self,
        ex: Execution,
        out: Outcome,
        fields: list[Any],
        chord_value: bytes | None = None,
    ) -> Op:
        d, msg, opts = ex.delivery, ex.msg, ex.opts
        chord = (msg.chord.id, msg.chord.idx) if msg is not None and msg.chord else None
        return done_op(
            d.stream,
            d.entry_id,
            ex.tid or "",
            out.state,
            opts.result_ttl if opts is not None else self.app.settings.result_ttl,
            fields,
            ignore_result=opts is not None and opts.ignore_result,
            linked=msg is not None and bool(msg.chain) and out.kind is Kind.SUCCESS,
            chord=chord,
            tail=msg.tail if msg is not None else None,
            chord_value=chord_value,
            slot=ex.slot,
        )

    def _log(self, ex: Execution, out: Outcome) -> None:
        """One record per finished run, with structured fields (`extra=`) for JSON logs.

        Failures always; the rest only at INFO, built only when that level is enabled:
        the hot path stays quiet at the default level.
        """
        if out.kind is Kind.DEAD:
            self._log_dead(ex, out)
        elif out.kind is Kind.FAILURE:
            log.error(
                "%s[%s] FAILURE in %.3fs: %s: %s\n%s",
                ex.msg.name if ex.msg is not None else "?",
                ex.tid,
                time.perf_counter() - ex.started,
                out.exc_type,
                out.exc_message,
                out.traceback.rstrip(),
                extra={**_fields(ex, out), "exc_type": out.exc_type},
            )
        elif not log.isEnabledFor(logging.INFO):
            return
        elif out.kind is Kind.RETRY:
            _log_retry(ex, out)
        else:
            fields = _fields(ex, out)
            log.info(
                "%s[%s] %s in %.3fs",
                fields["task_name"],
                ex.tid,
                out.state,
                fields["duration"],
                extra=fields,
            )

    def _log_dead(self, ex: Execution, out: Outcome) -> None:
        entry_id = ex.delivery.entry_id.decode()
        log.error(
            "worker %s: dead-lettering entry %s of queue %r (task %s): %s: %s",
            self.worker,
            entry_id,
            ex.delivery.queue,
            _printable(ex.tid or "?"),
            out.exc_type,
            _printable(out.exc_message),
            extra={**_fields(ex, out), "exc_type": out.exc_type, "entry_id": entry_id},
        )

    # -- committing ---------------------------------------------------------------------

    async def flush_loop(self) -> None:
        """Commit queued outcomes as they come, one finish.lua call per batch."""
        while True:
            await self._flush.wait()
            # One more turn of the loop lets the rest of the batch finish and join this
            # commit: one round trip per batch rather than per task.
            await asyncio.sleep(0)
            self._flush.clear()
            await self.commit_all()

    async def flushed(self, turns: int = 4, timeout: float = 1.0) -> None:
        """Give tasks just started and the flush loop a few turns of the loop (at most
        `turns`), then wait for the commit in flight, if any (at most `timeout` s)."""
        for _ in range(turns):
            await asyncio.sleep(0)
            if not self._groups:
                break
        if self._commit_lock.locked():
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout), self._commit_lock:
                    pass

    async def commit_all(self) -> None:
        """Commit every queued op. The lock lets a stopping worker wait for a commit that
        is already in flight instead of cancelling it halfway."""
        async with self._commit_lock:
            while self._groups:
                groups, self._groups = self._groups, []
                self._committing = len(groups)
                await self._commit(groups)
                self._committing = 0
                self._committed([g.ex.key for g in groups])

    @property
    def unstored(self) -> int:
        """Outcomes not stored yet: queued, or in a commit under way."""
        return len(self._groups) + self._committing

    async def _commit(self, groups: list[Group]) -> None:
        """Commit `groups` in one call; find and fail the ones Redis refuses, if any."""
        ops = [op for group in groups for op in group.ops]
        try:
            await self._apply(ops, len(groups))
        except Exception as exc:
            if len(groups) > 1:
                # Find the entry whose ops fail; commit every other one. Replaying ops
                # that did apply is harmless: each is idempotent.
                for group in groups:
                    await self._commit([group])
                return
            await self._refused(groups[0].ex, exc)

    async def _apply(self, ops: list[Op], count: int) -> None:
        backoff = Backoff(start=0.05, cap=2.0)
        while True:
            try:
                await (self.scripts or self.client.scripts).finish(
                    streams=self.streams, now_ms=int(now() * 1000), ops=ops
                )
                self.outage.ok("store", wrote=True)
                return
            except Exception as exc:
                # Results must land before their entries are acked: keep trying.
                if not self.client.waits_out(exc):
                    raise
                delay = backoff.next()
                self.outage.failed(f"storing {count} result(s)", exc, delay, loop="store")
                await asyncio.sleep(delay)

    async def _refused(self, ex: Execution, exc: Exception) -> None:
        """An entry's ops were refused: record its task as an InternalError FAILURE (with
        its chord and chain settled), so it is never re-run as if its worker had died."""
        log.error("worker %s: Redis refused the outcome of task %s (%s)", self.worker, ex.tid, exc)
        out = Outcome(Kind.FAILURE, exc_type="InternalError")
        out.exc_message = f"aiotasks could not store the outcome: {type(exc).__name__}: {exc}"
        # Its run ended before the commit's tries: started_at counts back from now, with
        # the time since, as finished_at is now.
        ex.ended = 0.0
        fallback = self._done(ex, out, self._fields(ex, out))
        backoff = Backoff(start=0.1, cap=2.0)
        for _ in range(FALLBACK_TRIES):
            try:
                await self._apply([fallback], 1)
                return
            except Exception as again:
                log.error(
                    "worker %s: the fallback for task %s failed too (%s)",
                    self.worker,
                    ex.tid,
                    again,
                )
                await asyncio.sleep(backoff.next())
        # Left pending: redelivered after the visibility timeout.


def _printable(text: str) -> str:
    """Text from a malformed entry, quoted when it holds a newline or another control
    character: one log record stays one line."""
    return text if text.isprintable() else repr(text)


def _fields(ex: Execution, out: Outcome) -> dict[str, Any]:
    """A finished run's log fields: who, what, how it ended and how long it ran."""
    fields = ex.log_fields()
    fields["task_name"] = fields["task_name"] or "?"
    fields["state"] = out.state
    fields["duration"] = round(time.perf_counter() - ex.started, 6)
    return fields


def _log_retry(ex: Execution, out: Outcome) -> None:
    """`add[abc] RETRY: attempt 1 of 4 failed after 0.012s (ConnectionError: refused);
    next attempt in 2.0s`."""
    fields = _fields(ex, out)
    retry_in = max(0.0, (out.retry_at or now()) - now())
    runs = (out.max_retries or 0) + 1
    how = f"failed after {fields['duration']:.3f}s ({out.exc_type}: {out.exc_message})"
    if not out.exc_type:  # raise ctx.retry() with no exception behind it
        how = f"asked for a retry after {fields['duration']:.3f}s"
    log.info(
        "%s[%s] RETRY: attempt %d of %d %s; next attempt in %.1fs",
        fields["task_name"],
        ex.tid,
        fields["attempt"],
        runs,
        how,
        retry_in,
        extra={**fields, "exc_type": out.exc_type or "Retry", "retry_in": round(retry_in, 3)},
    )
