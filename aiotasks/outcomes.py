"""Outcomes: a worker's finished runs, turned into finish.lua ops and committed in batches.

Every outcome of a batch goes to Redis in one finish.lua call, which stores the results,
acknowledges and deletes the entries, wakes the waiters and settles chords and chains. An
entry stays in the worker's running set (and keeps its heartbeat) until its commit lands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from .backoff import Backoff
from .errors import CONNECTION_ERRORS, SerializationError
from .execution import Outcome, encode_result
from .keys import PRIORITIES
from .message import Message, now
from .task import Task

if TYPE_CHECKING:
    from .app import App
    from .execution import Execution
    from .keys import Keys

log = logging.getLogger("aiotasks.worker")

Arg = str | bytes | int | float
Key = tuple[int, bytes]


class Outcomes:
    """The commit buffer of one worker."""

    def __init__(
        self,
        app: App,
        keys: Keys,
        name: str,
        queues: list[str],
        streams: list[str],
        running: dict[Key, Any],
    ) -> None:
        self.app = app
        self.keys = keys
        self.name = name
        self.queues = queues
        self.streams = streams
        self._worker_running = running
        self.done = 0
        self.failed = 0
        self._ops: list[list[Any]] = []
        # Entries whose outcome is queued or being committed stay in the worker's running
        # set (and keep their heartbeat) until the commit lands.
        self.pending: list[Key] = []
        self.committing: list[Key] = []
        self._flush = asyncio.Event()
        self._commit_lock = asyncio.Lock()

    @property
    def has_ops(self) -> bool:
        """Whether outcomes wait to be committed."""
        return bool(self._ops)

    def holds(self, key: Key) -> bool:
        """Whether this entry's outcome is queued or being committed."""
        return key in self.pending or key in self.committing

    def finish(self, ex: Execution, task: Task[Any, Any], msg: Message, out: Outcome) -> None:
        """Queue the outcome of a run for the next batched commit."""
        d = ex.delivery
        finished_ms = int(now() * 1000)
        if out.state in ("RETRY", "DEFER"):
            self._ops.append(["ack", d.index + 2, d.entry_id])
            retry = (
                msg.with_retry(out.retry_at)
                if out.state == "RETRY"
                else msg.deferred(out.retry_at or now())
            )
            self._ops.append(
                [
                    "enqueue",
                    "retry" if out.state == "RETRY" else "defer",
                    retry.enqueue_args(self.keys, self._ttl(task, msg)),
                ]
            )
            self._log(msg, out.state, ex, out)
        else:
            self._done_op(ex, task, msg, out, finished_ms)
        self.pending.append((d.index, d.entry_id))
        self._flush.set()

    def _done_op(
        self, ex: Execution, task: Task[Any, Any], msg: Message, out: Outcome, finished_ms: int
    ) -> None:
        d = ex.delivery
        fields: list[Arg] = [
            "started_at",
            int(finished_ms - (time.perf_counter() - ex.started) * 1000),
            "finished_at",
            finished_ms,
            "attempts",
            msg.retries + d.deliveries,
            "worker",
            self.name,
        ]
        chord_value: bytes = b""
        follow: list[list[Any]] = []
        if out.state == "SUCCESS":
            try:
                data, ct = encode_result(out.value, msg)
            except SerializationError as exc:
                out = Outcome(
                    "FAILURE",
                    exc_type="SerializationError",
                    exc_message=f"cannot encode the result: {exc}",
                )
            else:
                fields += ["result", data, "ct", ct]
                if msg.chord is not None and not msg.link:
                    chord_value = ct.encode() + b"\n" + data
                if msg.link:
                    from .canvas import continuation

                    follow = continuation(self.app, msg, out.value)
        if out.state == "FAILURE":
            fields += [
                "exc_type",
                out.exc_type,
                "exc_message",
                out.exc_message,
                "traceback",
                out.traceback,
            ]
        ignore = bool(msg.opts.get("ignore_result", task.opts.ignore_result))
        self._ops.append(
            [
                "done",
                d.index + 2,
                d.entry_id,
                msg.id,
                out.state,
                self._ttl(task, msg),
                int(ignore),
                int(bool(msg.link)),
                msg.chord.id if msg.chord else "",
                msg.chord.idx if msg.chord else "",
                msg.tail or "",
                chord_value,
                fields,
            ]
        )
        self._ops += follow
        if out.state == "FAILURE":
            self.failed += 1
        else:
            self.done += 1
        self._log(msg, out.state, ex, out)

    def dead_letter(self, ex: Execution, task_id: str, exc_type: str, message: str) -> None:
        """Queue an entry that cannot run for the dead-letter stream."""
        d = ex.delivery
        queue = self._queue_of(d.index)
        log.error(
            "worker %s: dead-lettering entry %s of queue %r (task %s): %s: %s",
            self.name,
            d.entry_id.decode(),
            queue,
            task_id or "?",
            exc_type,
            message,
        )
        flat: list[Arg] = [x for kv in d.fields.items() for x in kv]
        self._ops.append(
            [
                "dead",
                d.index + 2,
                d.entry_id,
                task_id,
                queue,
                exc_type,
                message,
                self.app.settings.result_ttl,
                flat,
            ]
        )
        self.failed += 1
        self.pending.append((d.index, d.entry_id))
        self._flush.set()

    def _queue_of(self, index: int) -> str:
        return self.queues[index // len(PRIORITIES)]

    def _ttl(self, task: Task[Any, Any], msg: Message) -> int:
        return int(
            msg.opts.get("result_ttl") or task.opts.result_ttl or self.app.settings.result_ttl
        )

    def _log(self, msg: Message, state: str, ex: Execution | None, out: Outcome) -> None:
        if state == "FAILURE":
            log.error(
                "%s[%s] FAILURE in %.3fs: %s: %s\n%s",
                msg.name,
                msg.id,
                _elapsed(ex),
                out.exc_type,
                out.exc_message,
                out.traceback.rstrip(),
            )
        elif log.isEnabledFor(logging.INFO):
            # Built only when asked for: the hot path stays quiet at the default level.
            extra = f" ({out.exc_type}: {out.exc_message})" if state == "RETRY" else ""
            log.info("%s[%s] %s in %.3fs%s", msg.name, msg.id, state, _elapsed(ex), extra)

    async def flush_loop(self) -> None:
        while True:
            await self._flush.wait()
            # One more turn of the loop lets the rest of the batch finish and join this
            # commit: one round trip per batch rather than per task.
            await asyncio.sleep(0)
            self._flush.clear()
            await self.commit_all()

    async def commit_all(self) -> None:
        """Commit every queued op. The lock lets a stopping worker wait for a commit that
        is already in flight instead of cancelling it halfway."""
        async with self._commit_lock:
            while self._ops:
                ops, self._ops = self._ops, []
                keys, self.pending = self.pending, []
                self.committing = keys
                await self._commit(ops, len(keys))
                for key in keys:
                    self._worker_running.pop(key, None)
                self.committing = []

    async def _commit(self, ops: list[list[Any]], count: int) -> None:
        backoff = Backoff(start=0.05, cap=2.0)
        while True:
            try:
                await self.app.broker.scripts.finish(
                    prefix=self.keys.prefix,
                    streams=self.streams,
                    now_ms=int(now() * 1000),
                    ops=ops,
                )
                return
            except CONNECTION_ERRORS as exc:
                # Results must land before their entries are acked: keep trying.
                delay = backoff.next()
                log.error(
                    "worker %s cannot store %d result(s) (%s); retrying in %.1f s",
                    self.name,
                    count,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            except ResponseError as exc:
                if len(ops) == 1:
                    # Leave the entry pending: it is redelivered, and dead-lettered after
                    # max_deliveries, rather than taking the worker down.
                    log.error(
                        "worker %s: Redis refused to store an outcome (%s): %r",
                        self.name,
                        exc,
                        ops[0][:5],
                    )
                    return
                # Find the op Redis refuses; commit every other one.
                for op in ops:
                    await self._commit([op], 1)
                return


def _elapsed(ex: Execution | None) -> float:
    return time.perf_counter() - ex.started if ex is not None else 0.0
