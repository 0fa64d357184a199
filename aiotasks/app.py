"""App: the task registry, the connection, and the entry points users call."""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, overload

from .canvas import COLLECT, chunks, compose, send_canvas
from .client import Client
from .config import RetryPolicy, Settings, check_redis_url, resolve_redis_url, resolve_shards
from .contract import GATHER, MAP, STARMAP
from .control import Queues, Schedules
from .handle import GroupHandle, TaskHandle
from .hooks import F, Hooks
from .keys import NAMESPACE_RULE, is_namespace
from .maps import mapper
from .message import (
    QUEUE_NAME_RULE,
    SEND_OPTIONS,
    Message,
    check_options,
    is_queue_name,
    positive_number,
)
from .nodes import signature_of
from .task import (
    Task,
    TaskDecorator,
    TaskOptions,
    build_message,
    default_name,
    field_names,
    rate_limit_of,
)

if TYPE_CHECKING:
    from .tracing import Tracing
    from .worker import Worker

P = ParamSpec("P")
R = TypeVar("R")

_TASK_OPTIONS = frozenset(field_names(TaskOptions)) - {"name"}
#: Task options that are send options too, checked alike.
_SENT = _TASK_OPTIONS & SEND_OPTIONS


class App:
    """An aiotasks application: tasks, their Redis connection, and workers.

    Args:
        redis_url: Redis URL; None means $AIOTASKS_REDIS_URL, else redis://localhost:6379/0.
        namespace: prefix of every key; apps with different namespaces never see each other.
        default_queue: queue of tasks that name none and match no route.
        serializer: "msgpack" (default) or "json".
        compression: None, "zlib", "lzma", "bz2" or "zstd", for bodies of at least
            compress_min_size bytes.
        compress_min_size: smaller bodies are sent as they are.
        result_ttl: seconds a result (and any task record) lives.
        visibility_timeout: seconds before a task held by a dead worker is redelivered.
        task_routes: glob of task name -> queue, e.g. {"mail.*": "high"}.
        retry_policy: default publish retry policy of `send` (dict or RetryPolicy).
        max_connections: size of the connection pool (waiters queue past it).
        max_message_size: largest task body in bytes (before and after compression):
            `send` refuses a larger one with SerializationError, a worker dead-letters it.
        signing_key: a secret (bytes or str), or a list of them: every message is signed
            (HMAC-SHA256) with the first, and a worker runs only messages signed with one
            of them (others are dead-lettered as SignatureError). Rotate keys by putting
            the new one first on senders, then dropping the old one from workers.
        index_size: finished tasks the namespace's task index keeps, besides every
            unfinished one (for the dashboard and `aiotasks tasks list`); 0 turns it off.
        events_size: entries the namespace's event feed keeps (each up to 100 events of
            one script call; about 8 MB at most by default); 0 turns it off.
            Both are set for the namespace by its workers when they start.
        shards: hash tags the namespace's tasks spread over (None: $AIOTASKS_SHARDS,
            else 1). On a Redis Cluster each shard can live on its own master, so one
            busy queue uses every master; every process of a namespace must use the same
            number (a worker refuses to start with another). See the README's "Scaling out".
        tracing: OpenTelemetry (extra `aiotasks[otel]`): the sender's trace context
            travels in each message, and sends and runs get spans (see tracing.py).
            Off, opentelemetry is never imported.
        warn_on_unsafe_server: a worker logs one WARNING at start when the server keeps
            nothing on disk or its maxmemory-policy evicts keys; False silences it.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "aiotasks",
        default_queue: str = "default",
        serializer: str = "msgpack",
        compression: str | None = None,
        compress_min_size: int = 1024,
        result_ttl: int = 86400,
        visibility_timeout: float = 60,
        *,
        task_routes: dict[str, str] | None = None,
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
        max_connections: int = 64,
        max_message_size: int = 16 * 1024 * 1024,
        signing_key: bytes | str | Sequence[bytes | str] | None = None,
        index_size: int = 10_000,
        events_size: int = 1_000,
        shards: int | None = None,
        tracing: bool = False,
        warn_on_unsafe_server: bool = True,
    ) -> None:
        from .codec import get_serializer

        get_serializer(serializer)  # fail fast on a typo
        # As a send would check them: refused here, not at the first send or never.
        check_options(
            {"result_ttl": result_ttl, "compression": compression, "queue": default_queue}
        )
        for pattern, queue in (task_routes or {}).items():
            if not is_queue_name(queue):
                raise ValueError(
                    f"task_routes[{pattern!r}] must be {QUEUE_NAME_RULE}, got {queue!r:.60}"
                )
        if not positive_number(visibility_timeout):
            raise ValueError(
                f"visibility_timeout must be a positive number, got {visibility_timeout!r}"
            )
        check_namespace(namespace)
        n_shards = resolve_shards(shards)
        if n_shards > 1 and "#" in namespace:
            raise ValueError(f"with shards, a namespace cannot contain '#': {namespace!r}")
        self.settings = Settings(
            redis_url=resolve_redis_url(redis_url),
            namespace=namespace,
            default_queue=default_queue,
            serializer=serializer,
            compression=compression,
            compress_min_size=compress_min_size,
            result_ttl=int(result_ttl),
            visibility_timeout=float(visibility_timeout),
            max_connections=max_connections,
            max_message_size=int(max_message_size),
            signing_keys=_keys(signing_key),
            index_size=int(index_size),
            events_size=int(events_size),
            shards=n_shards,
            task_routes=dict(task_routes or {}),
            retry_policy=RetryPolicy.of(retry_policy),
            warn_on_unsafe_server=bool(warn_on_unsafe_server),
        )
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.periodic_tasks: list[Any] = []
        self._client: Client | None = None
        self.hooks = Hooks()
        #: The span maker when tracing is on (imported only then), else None.
        self.tracer: Tracing | None = None
        if tracing:
            from .tracing import Tracing

            self.tracer = Tracing()
        self.task(name=COLLECT)(_collect)
        self.task(name=GATHER)(_collect)
        self.task(name=MAP)(mapper(self, star=False))
        self.task(name=STARMAP)(mapper(self, star=True))

    def __repr__(self) -> str:
        return f"<App namespace={self.settings.namespace!r}>"

    # -- connection ---------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The Redis side of this App: pool, scripts, notifier (connections open lazily).

        Raises:
            InvalidRedisURL: the App's URL cannot work (a scheme, port, database or query
                option redis-py would refuse), said before anything connects.
        """
        if self._client is None:
            check_redis_url(self.settings.redis_url)
            self._client = Client(self.settings)
        return self._client

    @property
    def schedules(self) -> Schedules:
        """Schedules stored in Redis: add, pause, resume, remove, list (see control.py)."""
        return Schedules(self)

    @property
    def queues(self) -> Queues:
        """Pause and resume queues at run time (see control.py)."""
        return Queues(self)

    def configure(self, **changes: Any) -> None:
        """Change settings before the first connection (the CLI's --redis-url uses this)."""
        if self._client is not None:
            raise RuntimeError("configure() must come before the App connects")
        if "namespace" in changes:
            check_namespace(changes["namespace"])
        self.settings = replace(self.settings, **changes)

    async def connect(self) -> None:
        """Check the connection now (otherwise the first call connects lazily).

        Raises:
            BrokerConnectionError: Redis does not answer.
            BrokerRefusedError: Redis refuses (a wrong password, a database it does not
                have, an ACL without PING, still loading).
        """
        await self.client.ping()

    async def close(self) -> None:
        """Close every connection of this App. A later use connects anew, with the
        settings the App has then (the test plugin rebinds an App between tests)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tasks ----------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, fn: None = None, /, *, name: str | None = None, **options: Any
    ) -> TaskDecorator: ...

    def task(self, fn: Any = None, /, *, name: str | None = None, **options: Any) -> Any:
        """Register a task: `@app.task` or `@app.task(name=..., queue=..., ...)`.

        `async def` functions run on the worker's event loop; plain `def` functions run
        in a worker thread.
        """
        unknown = set(options) - _TASK_OPTIONS
        if unknown:
            raise TypeError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        # The options a send may also give are checked as a send checks them: a priority
        # of 11 or a result_ttl of 0 refused here, not left to strand every send.
        check_options({k: v for k, v in options.items() if k in _SENT and v is not None})
        if "rate_limit" in options:
            options["rate_limit"] = rate_limit_of(options["rate_limit"])

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            _check_flow(f, options)
            task_name = name or default_name(f)
            opts = TaskOptions(name=task_name, **options)
            if opts.autoretry_for and not isinstance(opts.autoretry_for, tuple):
                opts = TaskOptions(**{**_asdict(opts), "autoretry_for": tuple(opts.autoretry_for)})
            t: Task[Any, Any] = Task(self, f, opts)
            self.tasks[task_name] = t
            return t

        return register(fn) if fn is not None else register

    def on_task_start(self, fn: F) -> F:
        """Register `fn(ctx)`, sync or async, called before each task runs on a worker."""
        self.hooks.start.append(fn)
        return fn

    def on_task_success(self, fn: F) -> F:
        """Register `fn(ctx, result)`, called after a task returned."""
        self.hooks.success.append(fn)
        return fn

    def on_task_failure(self, fn: F) -> F:
        """Register `fn(ctx, exc)`, called after a task failed for good (not on retries)."""
        self.hooks.failure.append(fn)
        return fn

    def on_task_retry(self, fn: F) -> F:
        """Register `fn(ctx, exc)`, called after a run that will be retried."""
        self.hooks.retry.append(fn)
        return fn

    def on_task_revoked(self, fn: F) -> F:
        """Register `fn(ctx)`, called after a running task was revoked (terminate=True)."""
        self.hooks.revoked.append(fn)
        return fn

    def chunks(self, task: Task[Any, Any], items: Iterable[Iterable[Any]], n: int) -> chunks:
        """`task.chunks(items, n)` (see Task.chunks), built here: the canvas module
        imports the task module, so the task module reaches it through its App."""
        return chunks(task, items, n)

    def route(self, name: str) -> str:
        """The queue a task name is routed to (task_routes globs, else default_queue)."""
        for pattern, queue in self.settings.task_routes.items():
            if fnmatch.fnmatchcase(name, pattern):
                return queue
        return self.settings.default_queue

    def handle(self, task_id: str) -> TaskHandle[Any]:
        """A handle for any task id."""
        return TaskHandle(self.client, task_id)

    async def group_handle(self, group_id: str) -> GroupHandle | None:
        """The handle of a group saved under `group_id` (GroupHandle.save), in any
        process; None when none is (never saved, or its ttl passed). Celery's
        GroupResult.restore."""
        ids = await self.client.saved_group(group_id)
        if ids is None:
            return None
        return GroupHandle(self.client, [TaskHandle(self.client, i) for i in ids], group_id)

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> TaskHandle[Any]:
        """Enqueue a task by name, without importing its function."""
        msg = build_message(self, name, args, kwargs, options, self.tasks.get(name))
        return (await self.send_messages([msg], options.get("retry_policy")))[0]

    async def send_canvas(self, canvas: Any, options: dict[str, Any]) -> str:
        """Send a canvas (or a signature with callbacks); the id of its final task."""
        return await send_canvas(self, canvas, dict(options))

    @staticmethod
    def compose(left: Any, right: Any) -> Any:
        """`left | right` between signatures and canvases (see canvas.compose)."""
        return compose(left, right)

    async def send_messages(
        self,
        built: Sequence[tuple[Message, int]],
        retry_policy: RetryPolicy | dict[str, Any] | None = None,
    ) -> list[TaskHandle[Any]]:
        """Enqueue prepared messages in one round trip; the handles in order."""
        if not built:
            return []
        if self.tracer is not None:
            ids, queues = [m.id for m, _ in built], [m.queue for m, _ in built]
            with self.tracer.send(built[0][0].name, ids, queues) as span:
                trace = self.tracer.inject(span)
                traced = [(replace(m, trace=trace), ttl) for m, ttl in built]
                return await self._enqueue(traced, retry_policy)
        return await self._enqueue(built, retry_policy)

    async def _enqueue(
        self,
        built: Sequence[tuple[Message, int]],
        retry_policy: RetryPolicy | dict[str, Any] | None,
    ) -> list[TaskHandle[Any]]:
        policy = RetryPolicy.of(retry_policy) if retry_policy else self.client.retry_policy
        client, encoding = self.client, self.settings.encoding
        epoch: int | None = None
        if len(client.shards) == 1:
            notifier = client.notifier
            reply = notifier.reply_channel
            records = [m.record(ttl, reply=reply, **encoding) for m, ttl in built]
            # Taken before the enqueue, so that no final state can come before its box.
            boxes = [notifier.mailbox(m.id) for m, _ in built]
        else:  # a task's final state is published in its shard: on that shard's channel
            records = [
                m.record(ttl, reply=client.for_task(m.id).notifier.reply_channel, **encoding)
                for m, ttl in built
            ]
            boxes = [None] * len(built)
        enqueued = await client.enqueue(records, policy)
        if len(client.shards) == 1:
            epoch = client.notifier.reconnects  # else each handle reads its shard's
        # A batch is (nearly always) of one task: look its result loader up once.
        keys = [_loader_key(m) for m, _ in built]
        loaders = {key: self._result_loader(*key) for key in set(keys)}
        return [
            # A send that kept a live task of the same id (0) hears of it by reading.
            TaskHandle(client, m.id, loaders[key], sent=True, epoch=epoch, box=box if ok else None)
            for (m, _), key, box, ok in zip(built, keys, boxes, enqueued, strict=True)
        ]

    def _result_loader(self, name: str, mapped: str | None = None) -> Callable[[Any], Any] | None:
        """`result()` rebuilds the return annotation's type when the task is known here;
        a map's (`mapped`: the task it calls) rebuilds each of its results so."""
        if mapped is not None:
            each = self._result_loader(mapped)
            if each is None:
                return None
            return lambda results: (
                [each(r) for r in results] if isinstance(results, list) else results
            )
        task = self.tasks.get(name)
        if task is None or task.adapter is None or task.adapter.result is None:
            return None
        return task.load_result

    def dashboard(self, read_only: bool = False) -> Any:
        """The dashboard of this App: an ASGI app to mount behind your own auth.

        `api.mount("/tasks", tasks.dashboard())` serves it at /tasks/: the queues,
        workers, periodic tasks and tasks, live; with `read_only=True` it cannot revoke,
        retry, requeue, drop or purge anything. Needs the `web` extra.

        Raises:
            ImportError: the `web` extra (Starlette, Jinja2) is not installed.
        """
        from .web import create

        return create(self, read_only=read_only)

    # -- workers --------------------------------------------------------------------

    def worker(
        self, queues: Sequence[str] | str | None = None, concurrency: int = 100, **opts: Any
    ) -> Worker:
        """A worker for this App: `await worker.run()`, `worker.stop()`.

        Args:
            queues: queue names, most important first (default: the default queue).
            concurrency: most tasks running at once.
            **opts: see Worker.
        """
        from .worker import Worker

        if isinstance(queues, str):
            queues = [q.strip() for q in queues.split(",") if q.strip()]
        return Worker(self, queues=queues, concurrency=concurrency, **opts)

    def lifespan(
        self, worker: bool = False, **worker_opts: Any
    ) -> Callable[[Any], AbstractAsyncContextManager[None]]:
        """A lifespan for FastAPI/Starlette: connects, and runs a worker if worker=True.

        `FastAPI(lifespan=tasks.lifespan(worker=True, concurrency=10))`.
        """

        @asynccontextmanager
        async def lifespan(_app: Any) -> AsyncIterator[None]:
            async with self:
                if not worker:
                    yield
                    return
                async with self.worker(**worker_opts).running():
                    yield

        return lifespan

    def periodic(
        self,
        cron: str | None = None,
        every: float | timedelta | None = None,
        name: str | None = None,
        queue: str | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Callable[[Task[P, R]], Task[P, R]]:
        """Schedule a task: `@app.periodic(every=60)` or `cron="*/5 * * * *"` over `@app.task`.

        Every worker of the App schedules it; each tick fires once across all of them.
        """
        from .schedule import Periodic

        def register(task: Task[P, R]) -> Task[P, R]:
            if not isinstance(task, Task):
                raise TypeError("@app.periodic goes above @app.task")
            entry = Periodic.make(
                task, cron=cron, every=every, name=name, queue=queue, args=args, kwargs=kwargs
            )
            if any(p.name == entry.name for p in self.periodic_tasks):
                # Ticks are claimed by name: two schedules sharing one would steal ticks.
                raise ValueError(f"a periodic schedule named {entry.name!r} exists; pass name=")
            self.periodic_tasks.append(entry)
            return task

        return register


async def _collect(results: Any) -> Any:
    """Return the results a nested group gathered (the body of its implicit chord)."""
    return results


#: Flow-control keys and the option each one goes with.
_FLOW_KEYS = {
    "rate_key": "rate_limit",
    "concurrency_key": "concurrency_limit",
    "debounce_key": "debounce",
}


def _check_flow(fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse flow-control options that cannot work, at decoration time."""
    limit = options.get("concurrency_limit")
    if limit is not None and not (isinstance(limit, int) and limit > 0):
        raise ValueError(f"concurrency_limit must be a positive int, got {limit!r}")
    debounce = options.get("debounce")
    if debounce is not None and not (isinstance(debounce, int | float) and debounce > 0):
        raise ValueError(f"debounce must be a positive number of seconds, got {debounce!r}")
    sig = signature_of(fn)
    for key_option, needs in _FLOW_KEYS.items():
        argument = options.get(key_option)
        if argument is None:
            continue
        if options.get(needs) is None:
            raise ValueError(f"{key_option} goes with {needs}")
        if sig is not None and argument not in sig.parameters:
            raise ValueError(f"{key_option}={argument!r}: the function has no such argument")


def _keys(value: bytes | str | Sequence[bytes | str] | None) -> tuple[bytes, ...]:
    """Signing keys as bytes, the signing one first."""
    if value is None:
        return ()
    items = [value] if isinstance(value, bytes | str) else list(value)
    keys = tuple(k.encode() if isinstance(k, str) else bytes(k) for k in items)
    if not keys or not all(keys):
        raise ValueError("signing_key must be a non-empty secret (or a list of them)")
    return keys


def _asdict(opts: TaskOptions) -> dict[str, Any]:
    return {n: getattr(opts, n) for n in field_names(TaskOptions)}


def check_namespace(namespace: object) -> None:
    """Refuse a namespace no key could carry (NAMESPACE_RULE).

    Raises:
        ValueError: naming the rule.
    """
    if not is_namespace(namespace):
        raise ValueError(f"namespace must be {NAMESPACE_RULE}, got {namespace!r:.60}")


def _loader_key(m: Message) -> tuple[str, str | None]:
    """What a message's result is rebuilt by: its task, or for a map the task it calls."""
    if m.name in (MAP, STARMAP) and m.args and isinstance(m.args[0], str):
        return m.name, m.args[0]
    return m.name, None
