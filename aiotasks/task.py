"""Task and Signature: what `@app.task` makes, and a task call frozen for later."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from . import adapt
from .contract import MAP, STARMAP
from .handle import TaskHandle
from .keys import new_id, shard_of
from .message import Message, check_options, now
from .nodes import sig_node, signature_of
from .spellings import OnError

if TYPE_CHECKING:
    from .app import App
    from .canvas import chunks as Chunks
    from .execution import RunOptions

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options given to `@app.task`; None means the App's default."""

    name: str
    queue: str | None = None
    soft_timeout: float | None = None
    hard_timeout: float | None = None
    max_retries: int = 3  # as in Celery
    autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    ignore_result: bool = False
    result_ttl: int | None = None
    priority: int | None = None
    rate_limit: str | None = None
    serializer: str | None = None
    rate_key: str | None = None
    concurrency_limit: int | None = None
    concurrency_key: str | None = None
    debounce: float | None = None
    debounce_key: str | None = None


#: Send options that override a task's run options, as they travel in the payload's
#: `opts`: normalized (2.0 retries is 2, a 1 for ignore_result is True).
_RUN_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "soft_timeout": float,
    "hard_timeout": float,
    "max_retries": int,
    "ignore_result": bool,
    "result_ttl": int,
}

_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(rate: str) -> float:
    """A rate limit like "100/s", "10/m" or "5/h" as the interval between starts, in ms.

    Raises:
        ValueError: the string is not of that form.
    """
    count, _, unit = rate.partition("/")
    try:
        n = float(count)
        seconds = _RATE_UNITS[unit.strip()]
    except (ValueError, KeyError):
        raise ValueError(
            f"rate_limit must look like '100/s', '10/m' or '5/h', got {rate!r}"
        ) from None
    if n <= 0:
        raise ValueError(f"rate_limit must be positive, got {rate!r}")
    return seconds * 1000.0 / n


def rate_limit_of(value: Any) -> str | None:
    """A task's rate_limit as stored: "N/unit", or None for none. Celery's forms are
    taken: a bare number (`10`, `"100"`) is per second, `0` is no limit.

    Raises:
        ValueError: not a rate limit.
    """
    if value is None or value in (0, "0"):
        return None
    given = value
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = f"{value}/s"
    elif isinstance(value, str) and "/" not in value:
        value = f"{value}/s"
    if not isinstance(value, str):
        raise ValueError(f"rate_limit must look like '100/s', got {value!r}")
    try:
        parse_rate(value)
    except ValueError as exc:  # name what was given, not the "/s" added to a bare one
        raise ValueError(str(exc).replace(repr(value), repr(given))) from None
    return value


def _epoch(value: datetime | float | timedelta | None, base: float) -> float | None:
    """An eta/expires value as epoch seconds: datetime (naive = UTC), or seconds from now."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, timedelta):
        return base + value.total_seconds()
    return base + float(value)


def default_name(fn: Callable[..., Any]) -> str:
    """`module.qualname`, with a script's `__main__` named as a worker importing it names it."""
    module = fn.__module__
    if module == "__main__":
        module = main_module_name()
    return f"{module}.{fn.__qualname__}"


def main_module_name() -> str:
    """The importable name of `__main__`: `python tasks.py` and `aiotasks run tasks:app`
    must agree on `tasks.add`, or the worker dead-letters the send as UnknownTask."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m pkg.mod
        return str(spec.name)
    path = getattr(main, "__file__", None)
    if not path or not sys.path:
        return "__main__"  # python -c, an interactive session, an embedding host
    # The script's directory is sys.path[0]: the name is the file's path below it.
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(sys.path[0] or "."))
    stem, ext = os.path.splitext(rel)
    if ext != ".py" or stem.startswith(".."):
        return "__main__"
    return stem.replace(os.sep, ".")


def build_message(
    app: App,
    name: str,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None,
    options: dict[str, Any],
    task: Task[Any, Any] | None = None,
) -> tuple[Message, int]:
    """A Message for one send, and the ttl (s) of its task hash."""
    return message_builder(app, name, options, task)(args, kwargs)


def message_builder(
    app: App, name: str, options: dict[str, Any], task: Task[Any, Any] | None = None
) -> Callable[[Sequence[Any], dict[str, Any] | None], tuple[Message, int]]:
    """Builds the Messages of sends that share `options`, and their ttl (s).

    Everything but the arguments and the id is worked out here once: `send_many` pays
    for the options of a batch once, not once per task.
    """
    check_options(options)
    s = app.settings
    t = task.opts if task is not None else None
    sent_at = now()
    eta = _epoch(options.get("eta"), sent_at)
    if eta is None and options.get("countdown"):
        eta = sent_at + float(options["countdown"])
    queue = options.get("queue") or (t.queue if t else None) or app.route(name)
    priority = options.get("priority")
    if priority is None:
        priority = t.priority if t and t.priority is not None else 5
    opts = {k: _RUN_OPTIONS[k](options[k]) for k in _RUN_OPTIONS if options.get(k) is not None}
    ttl = int(options.get("result_ttl") or (t.result_ttl if t else None) or s.result_ttl)
    given_id = options.get("task_id")
    expires = _epoch(options.get("expires"), sent_at)
    serializer = options.get("serializer") or (t.serializer if t else None) or s.serializer
    compression = options.get("compression") or s.compression
    # The current trace context (a canvas sent inside a `send` span); App.send_messages
    # stamps plain sends with their own `send` span.
    trace = app.tracer.inject() if app.tracer is not None else None
    debounce = task.opts.debounce if task is not None else None
    if debounce:
        if options.get("countdown") or options.get("eta") is not None:
            raise ValueError(
                f"{name} is debounced: it runs {debounce:g} s after the last send for its "
                "key, so countdown and eta do not apply"
            )
        # Trailing edge: it runs `debounce` s after the last send for its key.
        eta = sent_at + float(debounce)
    if eta is not None and eta <= sent_at:
        eta = None

    shards = s.shards
    pinned = shards > 1 and t is not None and bool(t.concurrency_limit or t.debounce)

    def build(args: Sequence[Any], kwargs: dict[str, Any] | None) -> tuple[Message, int]:
        debounce_key = None
        if debounce:
            assert task is not None
            debounce_key = task.key_of(task.opts.debounce_key, args, kwargs or {})
        task_id = given_id
        if pinned:
            assert task is not None
            task_id = pinned_id(task, given_id, debounce_key, args, kwargs or {}, shards)
        msg = Message(
            id=task_id or os.urandom(16).hex(),
            name=name,
            args=list(args),
            kwargs=dict(kwargs or {}),
            queue=queue,
            priority=priority,
            opts=opts,
            eta=eta,
            expires=expires,
            serializer=serializer,
            compression=compression,
            debounce=debounce_key,
            trace=trace,
        )
        return msg, ttl

    return build


def pinned_id(
    task: Task[Any, Any],
    given: str | None,
    debounce_key: str | None,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    shards: int,
) -> str:
    """The id of a send whose task has a concurrency limit or debounce, with several
    shards: in the shard of its key, where the key's slots (or debounce record) live and
    the task's own finish can release them in the same script call.

    Raises:
        ValueError: `given` (a task_id) is in another shard.
    """
    keys = [debounce_key] if debounce_key is not None else []
    if task.opts.concurrency_limit:
        keys.append(task.key_of(task.opts.concurrency_key, args, kwargs))
    key = keys[0]
    shard = shard_of(key, shards)
    if any(shard_of(k, shards) != shard for k in keys):
        raise ValueError(
            f"{task.name}'s debounce key {keys[0]!r} and concurrency key {keys[1]!r} are "
            f"in different shards ({shards} shards): give both the same argument"
        )
    if given is None:
        return new_id(shards, shard)
    if shard_of(given, shards) != shard:
        raise ValueError(
            f"task_id {given!r} is not in the shard of {task.name}'s flow-control key "
            f"{key!r} ({shards} shards): leave task_id out, or pick one with "
            f"aiotasks.keys.shard_of(task_id, {shards}) == {shard}"
        )
    return given


class Task(Generic[P, R]):
    """A registered task. `await task(...)` runs it inline; `await task.send(...)` enqueues."""

    def __init__(
        self, app: App, fn: Callable[P, Awaitable[R]] | Callable[P, R], opts: TaskOptions
    ) -> None:
        self.app = app
        self.fn = fn
        self.opts = opts
        self.name = opts.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.rate_interval_ms = parse_rate(opts.rate_limit) if opts.rate_limit else 0.0
        #: The function's call signature: sends are checked against it.
        self.signature = signature_of(fn)
        self._shapes_ok: set[int | tuple[int, tuple[str, ...]]] = set()
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self._adapter: adapt.Adapter | None = None
        self._adapter_read = False
        #: The RunOptions of a send without options, shared (execution.RunOptions).
        self.run_defaults: RunOptions | None = None

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, without the broker. Outside a task,
        `current_task()` inside it gives a context of its own (a new id, attempt 1;
        `progress()` stores nothing), as Celery's request of a task called directly;
        inside a running task it stays that task's (its slot, its progress)."""
        from .context import TaskContext, _current

        token = None
        if _current.get() is None:
            app = self.app
            queue = self.opts.queue or app.route(self.name)
            token = _current.set(TaskContext(new_id(), self.name, 1, self.opts.max_retries,
                                             queue, app, app.client, inline=True))  # fmt: skip
        try:
            if self.is_async:
                return await cast(Callable[P, Awaitable[R]], self.fn)(*args, **kwargs)
            return cast(Callable[P, R], self.fn)(*args, **kwargs)
        finally:
            if token is not None:
                _current.reset(token)

    @property
    def adapter(self) -> adapt.Adapter | None:
        """How arguments and the result are rebuilt from the annotations (None: as sent).

        Read on first use, not at decoration, so that a class defined below resolves."""
        if not self._adapter_read:
            self._adapter = adapt.adapter_for(self.fn)
            self._adapter_read = True
        return self._adapter

    def load_args(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[Sequence[Any], dict[str, Any]]:
        """Arguments as received, rebuilt into the dataclasses/models the parameters name."""
        adapter = self.adapter
        return (args, kwargs) if adapter is None else adapter.args(args, kwargs)

    def load_result(self, value: Any) -> Any:
        """A result as stored, rebuilt into the type the return annotation names."""
        adapter = self.adapter
        return value if adapter is None or adapter.result is None else adapter.result(value)

    async def send(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Enqueue with the task's default options (Celery's `delay`)."""
        return await self.apply_async(args, kwargs)

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """`send`, Celery's spelling."""
        return await self.apply_async(args, kwargs)

    async def apply_async(
        self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> TaskHandle[R]:
        """Enqueue with send options, Celery's spelling.

        Raises:
            TypeError: the arguments do not fit the function, or an option is unknown.
            SerializationError: an argument cannot be encoded; nothing was enqueued.
            BrokerConnectionError: Redis stayed unreachable through the retry policy.
        """
        if "link" in options or "link_error" in options:
            return await self.s(*args, **(kwargs or {})).send(**options)
        self.check_args(args, kwargs)
        handles = await self.app.send_messages(
            [build_message(self.app, self.name, args, kwargs, options, self)],
            options.get("retry_policy"),
        )
        return handles[0]

    def options(self, **options: Any) -> BoundTask[P, R]:
        """The task with send options bound: `await add.options(countdown=3).send(2, 3)`."""
        check_options(options)
        return BoundTask(self, options)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A Signature: this task with (partial) arguments, to send later or compose."""
        return Signature(self.name, tuple(args), dict(kwargs), app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable Signature: in a chain or as a callback it ignores the previous
        result and gets only these arguments."""
        return Signature(self.name, tuple(args), dict(kwargs), app=self.app, immutable=True)

    def map(self, items: Iterable[Any]) -> Signature:
        """Celery's `task.map(items)`: one task that calls this one on each item in turn,
        on one worker; its result is the list of their results. It goes to this task's
        queue."""
        items = list(items)
        return self._each(MAP, items, ([item] for item in items))

    def starmap(self, items: Iterable[Iterable[Any]]) -> Signature:
        """Celery's `task.starmap(items)`: as `map`, each item a tuple of arguments."""
        calls = [list(args) for args in items]
        return self._each(STARMAP, calls, calls)

    def chunks(self, items: Iterable[Iterable[Any]], n: int) -> Chunks:
        """Celery's `task.chunks(items, n)`: a group of `starmap` tasks of `n` items each
        (the last may have fewer); its result is the list of their lists. `.group()`
        gives it as a plain group."""
        return self.app.chunks(self, items, n)  # canvas.py imports this module

    def _each(self, builtin: str, items: list[Any], calls: Iterable[Sequence[Any]]) -> Signature:
        for args in calls:  # refused here, not on the worker after the first items ran
            self.check_args(args, {})
        options: dict[str, Any] = {"queue": self.opts.queue or self.app.route(self.name)}
        if self.opts.priority is not None:
            options["priority"] = self.opts.priority
        if self.opts.serializer is not None:
            options["serializer"] = self.opts.serializer
        # Immutable, as Celery's xmap: in a chain or as a chord body it keeps its items
        # instead of taking the previous result as a third argument.
        sig = Signature(builtin, (self.name, items), app=self.app, immutable=True)
        return sig.set(**options)

    def key_of(self, argument: str | None, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """The flow-control key of a call: the task name, plus the value of `argument`.

        Raises:
            TypeError: the call has no such argument.
        """
        if argument is None:
            return self.name
        if argument in kwargs:
            return f"{self.name}:{kwargs[argument]}"
        if self.signature is not None:
            bound = self.signature.bind_partial(*args, **kwargs)
            if argument in bound.arguments:
                return f"{self.name}:{bound.arguments[argument]}"
            default = self.signature.parameters.get(argument)
            if default is not None and default.default is not default.empty:
                return f"{self.name}:{default.default}"
        raise TypeError(f"task {self.name}: the call has no argument {argument!r} to key on")

    def check_args(self, args: Sequence[Any], kwargs: dict[str, Any] | None) -> None:
        """Raise TypeError, naming the task, when the arguments do not fit its function."""
        if self.signature is None:
            return
        # Whether a call binds depends only on how many positional arguments it has and
        # which keywords it names, so a shape that bound once is not bound again.
        shape = (len(args), tuple(kwargs)) if kwargs else len(args)
        if shape in self._shapes_ok:
            return
        try:
            self.signature.bind(*args, **(kwargs or {}))
        except TypeError as exc:
            raise TypeError(f"task {self.name}: {exc}") from None
        if len(self._shapes_ok) < 64:
            self._shapes_ok.add(shape)

    async def send_many(
        self, calls: Iterable[tuple[Sequence[Any], dict[str, Any] | None]], **options: Any
    ) -> list[TaskHandle[R]]:
        """Enqueue many calls in one round trip; `calls` holds (args, kwargs) pairs.

        Returns the handles in order. The batch is one atomic script: all or nothing.
        """
        if "task_id" in options:
            raise TypeError("send_many() makes one id per task; task_id is not allowed")
        if "link" in options or "link_error" in options:
            raise TypeError("send_many() takes no link/link_error: send a group instead")
        calls = list(calls)
        for a, k in calls:
            self.check_args(a, k)  # a shape that fitted once costs a set lookup
        build = message_builder(self.app, self.name, options, self)
        built = [build(a, k) for a, k in calls]
        return await self.app.send_messages(built, options.get("retry_policy"))


class TaskDecorator(Protocol):
    """What `@app.task(...)` with options returns: it keeps the function's types."""

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


@dataclass(frozen=True, slots=True)
class BoundTask(Generic[P, R]):
    """A task with send options bound, from `Task.options()`."""

    task: Task[P, R]
    send_options: dict[str, Any]

    async def send(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Enqueue with the bound options."""
        return await self.task.apply_async(args, kwargs, **self.send_options)

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """`send`, Celery's spelling."""
        return await self.task.apply_async(args, kwargs, **self.send_options)

    async def apply_async(
        self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> TaskHandle[R]:
        """Enqueue with the bound options, updated by `options`."""
        return await self.task.apply_async(args, kwargs, **{**self.send_options, **options})

    async def send_many(
        self, calls: Iterable[tuple[Sequence[Any], dict[str, Any] | None]], **options: Any
    ) -> list[TaskHandle[R]]:
        """Enqueue many calls with the bound options, in one round trip."""
        return await self.task.send_many(calls, **{**self.send_options, **options})


@dataclass(frozen=True, slots=True)
class Signature(OnError):
    """A task call frozen for later: name, args, kwargs and send options.

    `sig.set(**options)` adds send options (in place, as Celery's); `await sig.send()`
    enqueues it.
    Signatures are the parts of chains, groups and chords.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    app: App | None = field(default=None, compare=False, repr=False)
    immutable: bool = False

    def set(self, **options: Any) -> Signature:
        """Add these send options (`link`/`link_error` included) to this signature and
        return it: in place, as Celery's `set()`, so `sig.set(queue="q")` on a line of
        its own is not lost. `immutable=True` makes it ignore the previous result, as
        `.si()` does. (`clone()` gives a copy.)"""
        immutable = bool(options.pop("immutable", self.immutable))
        check_options(options)
        self.options.update(options)
        object.__setattr__(self, "immutable", immutable)  # a frozen dataclass, but for this
        return self

    def freeze(self) -> TaskHandle[Any]:
        """Choose this call's task id now (the `task_id` option) and return its handle,
        as Celery's `freeze()`: the id is known before the send."""
        client = self._app().client
        if "task_id" not in self.options:
            self.options["task_id"] = new_id()
        return TaskHandle(client, self.options["task_id"])

    @property
    def id(self) -> str | None:
        """The task id this call will have, once chosen (`freeze()` or `task_id=`)."""
        task_id = self.options.get("task_id")
        return task_id if isinstance(task_id, str) else None

    async def apply_async(
        self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> TaskHandle[Any]:
        """Celery's spelling: `args` go before the signature's own (not for an immutable
        one), `kwargs` and `options` are merged in."""
        sig = self if self.immutable else self.clone(args, kwargs)
        return await sig.send(**options)

    async def delay(self, *args: Any, **kwargs: Any) -> TaskHandle[Any]:
        """`apply_async(args, kwargs)`, Celery's spelling."""
        return await self.apply_async(args, kwargs)

    def __or__(self, other: Any) -> Any:
        """`sig | other`: a chain (see canvas.compose)."""
        return self._app().compose(self, other)

    def _freeze(self, shared: dict[str, Any]) -> dict[str, Any]:
        opts = {**self.options, **shared}
        return sig_node(self.name, self.args, self.kwargs, opts, immutable=self.immutable)

    def clone(
        self, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A copy with `args` prepended and kwargs/options merged."""
        return replace(
            self,
            args=(*args, *self.args),
            kwargs={**self.kwargs, **(kwargs or {})},
            options={**self.options, **options},
        )

    async def send(self, **options: Any) -> TaskHandle[Any]:
        """Enqueue this call; `options` override the signature's own."""
        app = self._app()
        opts = {**self.options, **options}
        if "link" in opts or "link_error" in opts:
            return TaskHandle(app.client, await app.send_canvas(self, options))
        task = app.tasks.get(self.name)
        if task is not None:
            task.check_args(self.args, self.kwargs)
        msg = build_message(app, self.name, self.args, self.kwargs, opts, task)
        return (await app.send_messages([msg], opts.get("retry_policy")))[0]

    def _app(self) -> App:
        if self.app is None:
            raise RuntimeError(f"signature {self.name!r} has no app; build it with task.s()")
        return self.app

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Run inline (like awaiting the task), with the frozen arguments first."""
        task = self._app().tasks[self.name]
        return task(*self.args, *args, **{**self.kwargs, **kwargs})


def field_names(cls: Any) -> list[str]:
    """Names of a dataclass's fields (used to validate task decorator options)."""
    return [f.name for f in fields(cls)]
