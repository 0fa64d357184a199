"""Prometheus metrics of a worker process: `aiotasks run app:tasks --metrics-port 9100`.

Needs `prometheus-client`. Two kinds of metrics:

- counted in this process through the task hooks: `aiotasks_tasks_total{task,state}`
  (state = started, success, failure, retry, revoked) and
  `aiotasks_task_duration_seconds{task}` (every run that ended, by any of those states);
  `aiotasks_data_lost_total{queue}` counts the times this process's worker found that
  Redis lost a queue's data (alert on any increase);
- read from Redis when scraped (cached for `cache_seconds`, so a burst of scrapes costs
  one read): per queue `aiotasks_queue_waiting_tasks`, `aiotasks_queue_in_flight_tasks`,
  `aiotasks_queue_scheduled_tasks`, `aiotasks_queue_dead_letters`; per live worker
  `aiotasks_worker_running_tasks` and `aiotasks_worker_concurrency`; `aiotasks_workers`,
  `aiotasks_scheduled_tasks` and `aiotasks_redis_up` (0 when the last read failed).

The Redis gauges describe the whole namespace, so every worker process reports the same
values: aggregate them with `max`, not `sum`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from .admin import Admin, Status

if TYPE_CHECKING:
    from .app import App
    from .config import Settings
    from .context import TaskContext

log = logging.getLogger(__name__)

#: Duration buckets (s): from quick tasks to the ones that run for minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))

#: Longest a scrape waits for Redis.
READ_TIMEOUT = 2.0


class RedisCollector:
    """Queue and worker gauges read from Redis at scrape time, cached briefly.

    Scrapes run in the HTTP server's threads, away from the worker's event loop, so each
    read uses its own short-lived loop and connection.
    """

    def __init__(self, settings: Settings, cache_seconds: float = 2.0) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._status: Status | None = None
        self._read_at = float("-inf")

    def status(self) -> Status | None:
        """The cached snapshot, refreshed when older than cache_seconds (None if unreadable)."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.cache_seconds:
                self._read_at = time.monotonic()
                self._status = self._read_in_thread()
            return self._status

    def _read_in_thread(self) -> Status | None:
        # A thread of its own: the caller may be a thread that runs an event loop.
        box: list[Status | None] = [None]

        def read() -> None:
            try:
                box[0] = asyncio.run(self._read())
            except Exception as exc:  # a scrape must answer even when Redis does not
                log.warning("metrics: cannot read queue status from Redis: %s", exc)

        t = threading.Thread(target=read, name="aiotasks-metrics-read", daemon=True)
        t.start()
        t.join(READ_TIMEOUT + 1)
        return box[0]

    async def _read(self) -> Status:
        from .app import App

        app = App(redis_url=self.settings.redis_url, namespace=self.settings.namespace)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                return await Admin(app).status()
        finally:
            await app.close()

    def collect(self) -> Iterable[Metric]:
        """The gauges, from the current snapshot."""
        st = self.status()
        up = GaugeMetricFamily("aiotasks_redis_up", "1 when the last read of Redis succeeded.")
        up.add_metric([], 0 if st is None else 1)
        yield up
        if st is None:
            return
        yield from _queue_gauges(st)
        yield from _worker_gauges(st)


def _queue_gauges(st: Status) -> Iterable[Metric]:
    families = {
        "waiting": GaugeMetricFamily(
            "aiotasks_queue_waiting_tasks", "Tasks waiting on a queue.", labels=["queue"]
        ),
        "in_flight": GaugeMetricFamily(
            "aiotasks_queue_in_flight_tasks",
            "Tasks delivered to a worker and not yet acknowledged.",
            labels=["queue"],
        ),
        "scheduled": GaugeMetricFamily(
            "aiotasks_queue_scheduled_tasks",
            "Tasks waiting for their countdown, eta or retry.",
            labels=["queue"],
        ),
        "dead_letters": GaugeMetricFamily(
            "aiotasks_queue_dead_letters",
            "Entries in a queue's dead-letter stream.",
            labels=["queue"],
        ),
    }
    for q in st.queues:
        for attr, family in families.items():
            value = getattr(q, attr)
            if value is not None:
                family.add_metric([q.name], value)
    yield from families.values()
    total = GaugeMetricFamily("aiotasks_scheduled_tasks", "Delayed tasks, all queues.")
    total.add_metric([], st.scheduled_total)
    yield total


def _worker_gauges(st: Status) -> Iterable[Metric]:
    alive = GaugeMetricFamily("aiotasks_workers", "Live workers of the namespace.")
    alive.add_metric([], len(st.workers))
    running = GaugeMetricFamily(
        "aiotasks_worker_running_tasks",
        "Tasks a worker is running, as of its last heartbeat.",
        labels=["worker"],
    )
    concurrency = GaugeMetricFamily(
        "aiotasks_worker_concurrency", "A worker's concurrency limit.", labels=["worker"]
    )
    for w in st.workers:
        running.add_metric([w.name], w.running)
        concurrency.add_metric([w.name], w.concurrency)
    yield from (alive, running, concurrency)


class Metrics:
    """The metrics of one App: counters fed by its hooks, gauges read from Redis.

    Args:
        app: the App whose tasks are counted (hooks are registered on it).
        cache_seconds: how long a Redis read serves scrapes.
    """

    def __init__(self, app: App, cache_seconds: float = 2.0) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "aiotasks_tasks",
            "Task runs by task name and state (started, success, failure, retry, revoked).",
            ["task", "state"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "aiotasks_task_duration_seconds",
            "Run time of task runs (success, failure, retry or revoked).",
            ["task"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.data_lost = Counter(
            "aiotasks_data_lost",
            "Times a worker found that Redis lost a queue's data (groups or records gone).",
            ["queue"],
            registry=self.registry,
        )
        self.registry.register(RedisCollector(app.settings, cache_seconds))
        app.hooks.data_lost.append(self._lost)
        app.on_task_start(self._started)
        app.on_task_success(self._succeeded)
        app.on_task_failure(self._failed)
        app.on_task_retry(self._retried)
        app.on_task_revoked(self._revoked)

    def _started(self, ctx: TaskContext) -> None:
        self.tasks.labels(ctx.name, "started").inc()

    def _succeeded(self, ctx: TaskContext, _result: Any) -> None:
        self._ended(ctx, "success")

    def _failed(self, ctx: TaskContext, _exc: BaseException | None) -> None:
        self._ended(ctx, "failure")

    def _retried(self, ctx: TaskContext, _exc: BaseException | None) -> None:
        self._ended(ctx, "retry")

    def _revoked(self, ctx: TaskContext) -> None:
        self._ended(ctx, "revoked")

    def _lost(self, queues: list[str]) -> None:
        for queue in queues:
            self.data_lost.labels(queue).inc()

    def _ended(self, ctx: TaskContext, state: str) -> None:
        self.tasks.labels(ctx.name, state).inc()
        if ctx.started:  # zero when the run never began (it failed in a start hook)
            self.duration.labels(ctx.name).observe(time.perf_counter() - ctx.started)


def install(app: App, port: int, host: str = "0.0.0.0") -> None:
    """Count the App's tasks and serve Prometheus metrics on http://host:port/metrics.

    Listens on every interface by default, since Prometheus usually scrapes from another
    host. The server runs in a daemon thread for the life of the process.

    Raises:
        OSError: the port cannot be bound (in use, or privileged).
    """
    metrics = Metrics(app)
    start_http_server(port, addr=host, registry=metrics.registry)
    log.info("serving Prometheus metrics on %s:%d", host, port)
