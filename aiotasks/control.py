"""Schedules and queue pauses stored in Redis, changed at run time, taken up by workers.

```python
await tasks.schedules.add("nightly-report", report.s("eu"), cron="0 3 * * *")
await tasks.schedules.pause("nightly-report"); await tasks.schedules.resume("nightly-report")
await tasks.schedules.remove("nightly-report"); await tasks.schedules.list()
await tasks.queues.pause("mail"); await tasks.queues.resume("mail")
```

Schedules live in the hash `{ns}:schedules` (name -> msgpack spec). Workers re-read it
every second and fire each tick once across all of them, exactly as `@tasks.periodic`
(whose schedules they write there at start, so both show in one list). Paused queues are
the set `{ns}:paused`; workers re-read it every second and take nothing from a paused
queue until it is resumed. Nothing queued is lost meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from . import codec
from .errors import AiotasksError, SerializationError
from .message import QUEUE_NAME_RULE, is_queue_name
from .schedule import Periodic

if TYPE_CHECKING:
    from .app import App
    from .task import Signature


class ScheduleNotFound(AiotasksError, LookupError):
    """No schedule of that name exists in the namespace."""


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as stored: what it sends, when, and whether it is paused."""

    name: str
    task: str
    cron: str | None
    every: float | None
    queue: str | None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    paused: bool = False
    source: str = "runtime"  # "runtime" (schedules.add) or "code" (@tasks.periodic)
    since: int = 0  # ms when added or resumed: a tick due before it never fires
    options: dict[str, Any] = field(default_factory=dict)  # send options of each tick's send

    def periodic(self) -> Periodic:
        """The Periodic a worker fires."""
        return Periodic(
            self.task,
            self.cron,
            self.every,
            self.name,
            self.queue,
            tuple(self.args),
            self.kwargs,
            self.since,
            self.options,
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {k: getattr(self, k) for k in self.__slots__}


def _now_ms() -> int:
    return int(time.time() * 1000)


#: Send options a schedule keeps for each tick's send (an `expires` in seconds only).
_RECURRING = frozenset({"priority", "countdown", "expires", "soft_timeout", "hard_timeout",
                        "max_retries", "ignore_result", "result_ttl", "serializer",
                        "compression", "retry_policy"})  # fmt: skip


def _recurring(name: str, value: Any) -> bool:
    return name in _RECURRING and (name != "expires" or isinstance(value, int | float))


def _spec(info: ScheduleInfo) -> bytes:
    spec = info.as_dict()
    if not spec["options"]:
        del spec["options"]  # a spec as 0.2.0 wrote it: workers of that version still read it
    data, _ = codec.encode(spec, "msgpack")
    return data


_SPEC_KEYS = frozenset(ScheduleInfo.__slots__)


def _info(raw: bytes) -> ScheduleInfo | None:
    try:
        spec = codec.decode(raw, "msgpack")
        # Keys a later version added are left out: its schedules still fire here.
        return ScheduleInfo(**{k: v for k, v in spec.items() if k in _SPEC_KEYS})
    except (SerializationError, TypeError, AttributeError):
        return None  # not a spec (written by hand): ignored


class Schedules:
    """Run-time schedules of an App's namespace (`tasks.schedules`)."""

    def __init__(self, app: App) -> None:
        self.app = app

    @property
    def _key(self) -> str:
        return self.app.client.keys.schedules

    async def add(
        self,
        name: str,
        sig: Signature,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        queue: str | None = None,
    ) -> ScheduleInfo:
        """Add (or replace) a schedule sending `sig` on `cron` (UTC) or `every` seconds.

        The signature's send options go with each tick's send (`queue=` here wins over
        its own queue); options that cannot recur (`eta`, `task_id`, callbacks) are refused.

        Raises:
            TypeError: `sig` is not a signature of one task (a chain, a group...), or its
                arguments do not fit the task (one this process knows).
            ValueError: not exactly one of cron/every, an invalid one, such an option, or a
                queue no worker could take from (a comma, surrounding spaces).
        """
        from .task import Signature

        if not isinstance(sig, Signature):
            raise TypeError(
                f"a schedule sends one task: give a signature (task.s(...)), not a "
                f"{type(sig).__name__}"
            )
        options = dict(sig.options)
        own_queue = options.pop("queue", None)
        queue = queue or own_queue  # queue= given here wins
        if queue is not None:
            check_queue_name(queue)
        refused = sorted(k for k, v in options.items() if not _recurring(k, v))
        if refused:
            raise ValueError(
                f"a schedule sends its task anew on every tick: send option(s) "
                f"{', '.join(refused)} cannot go with it"
            )
        task = self.app.tasks.get(sig.name)
        if task is not None:  # as send checks them: refused now, not failed on every tick
            task.check_args(sig.args, sig.kwargs)
        if task is not None and task.opts.debounce and options.get("countdown"):
            raise ValueError(
                f"{sig.name} is debounced: it runs {task.opts.debounce:g} s after the last "
                "send for its key, so a countdown does not apply (each tick would fail)"
            )
        p = Periodic.make(sig.name, cron=cron, every=every, name=name, queue=queue,
                          args=sig.args, kwargs=sig.kwargs)  # fmt: skip
        info = ScheduleInfo(name, p.task, p.cron, p.every, p.queue, list(p.args), p.kwargs,
                            since=_now_ms(), options=options)  # fmt: skip
        await cast(Any, self.app.client.redis).hset(self._key, name, _spec(info))
        return info

    async def list(self) -> list[ScheduleInfo]:
        """Every schedule, run-time and declared, by name."""
        raw: dict[bytes, bytes] = await cast(Any, self.app.client.redis).hgetall(self._key)
        infos = [_info(v) for v in raw.values()]
        return sorted((i for i in infos if i is not None), key=lambda i: i.name)

    async def get(self, name: str) -> ScheduleInfo:
        """One schedule.

        Raises:
            ScheduleNotFound: no schedule of that name.
        """
        raw = await cast(Any, self.app.client.redis).hget(self._key, name)
        info = _info(raw) if raw else None
        if info is None:
            ns = self.app.settings.namespace
            raise ScheduleNotFound(f"no schedule named {name!r} in namespace {ns!r}")
        return info

    async def pause(self, name: str) -> None:
        """Stop firing a schedule until it is resumed."""
        await self._set_paused(name, True)

    async def resume(self, name: str) -> None:
        """Fire a paused schedule again, from its next tick."""
        await self._set_paused(name, False)

    async def _set_paused(self, name: str, paused: bool) -> None:
        info = await self.get(name)
        since = info.since if paused else _now_ms()  # resumed: no catching up
        data = _spec(ScheduleInfo(**{**info.as_dict(), "paused": paused, "since": since}))
        await cast(Any, self.app.client.redis).hset(self._key, name, data)

    async def remove(self, name: str) -> None:
        """Delete a schedule (one declared in code comes back when a worker starts).

        Raises:
            ScheduleNotFound: no schedule of that name.
        """
        client = self.app.client
        if not await cast(Any, client.redis).hdel(self._key, name):
            ns = self.app.settings.namespace
            raise ScheduleNotFound(f"no schedule named {name!r} in namespace {ns!r}")
        # Its next run, as the workers keep it: `aiotasks status` would list it still.
        await cast(Any, client.redis).hdel(client.keys.periodic, name)

    async def declare(self, periodics: Sequence[Periodic]) -> None:
        """Write the schedules declared in code (keeping a paused flag set at run time)."""
        if not periodics:
            return
        current = {i.name: i for i in await self.list()}
        redis = cast(Any, self.app.client.redis)
        for p in periodics:
            old = current.get(p.name)
            paused = bool(old and old.paused and old.source == "code")
            info = ScheduleInfo(p.name, p.task, p.cron, p.every, p.queue, list(p.args),
                                p.kwargs, paused, "code")  # fmt: skip
            if old != info:
                await redis.hset(self._key, p.name, _spec(info))

    async def active(self) -> Sequence[Periodic]:
        """The schedules to fire now: every one not paused."""
        return [i.periodic() for i in await self.list() if not i.paused]


def check_queue_name(queue: str) -> None:
    """Raise ValueError for a name no worker could take from: a worker's queues are named
    without surrounding spaces or commas (`--queues a,b`)."""
    if not is_queue_name(queue):
        raise ValueError(f"{queue!r} is not {QUEUE_NAME_RULE}")


class Queues:
    """Pausing and resuming an App's queues at run time (`tasks.queues`)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def pause(self, queue: str) -> None:
        """Workers stop taking tasks from `queue` at once; nothing is lost (a task a
        worker was fetching just then goes back to the queue unrun)."""
        await self._change("pause", queue)

    async def resume(self, queue: str) -> None:
        """Workers take tasks from `queue` again."""
        await self._change("resume", queue)

    async def _change(self, verb: str, queue: str) -> None:
        check_queue_name(queue)
        client = self.app.client
        redis = cast(Any, client.redis)
        await (redis.sadd if verb == "pause" else redis.srem)(client.keys.paused, queue)
        # Workers also re-read the set every second: one that misses this still follows.
        await client.publish(client.keys.control_channel, f"{verb} {queue}")

    async def paused(self) -> set[str]:
        """The paused queues."""
        raw: set[bytes] = await cast(Any, self.app.client.redis).smembers(
            self.app.client.keys.paused
        )
        return {r.decode() for r in raw}
