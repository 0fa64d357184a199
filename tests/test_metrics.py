"""Prometheus metrics: counters fed by the task hooks, gauges read from Redis at scrape time."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aiotasks import App, TaskFailed
from aiotasks.admin import Admin
from aiotasks.metrics import Metrics

ADD = "tests.apps.basic.add"
BOOM = "tests.apps.basic.boom"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def eventually(check: Callable[[], Any], timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_hooks_count_tasks_and_redis_gauges(app: App, worker: Any) -> None:
    m = Metrics(app, cache_seconds=0)

    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        await asyncio.sleep(0.01)
        return x + y

    @app.task(name="boom", autoretry_for=(ValueError,), max_retries=1)
    async def boom() -> None:
        raise ValueError("boom")

    w = await worker()
    assert [await (await add.send(i, 1)).result(timeout=10) for i in range(3)] == [1, 2, 3]
    try:
        await (await boom.send()).result(timeout=10)
    except TaskFailed:
        pass
    await app.send_task("add", queue="idle")
    await app.send_task("add", queue="idle", countdown=60)

    def get(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    # Hooks run just after the outcome is queued; the result may land first.
    assert await eventually(lambda: get("aiotasks_tasks_total", task="boom", state="failure"))
    assert get("aiotasks_tasks_total", task="add", state="started") == 3
    assert get("aiotasks_tasks_total", task="add", state="success") == 3
    assert get("aiotasks_tasks_total", task="add", state="failure") is None
    assert get("aiotasks_tasks_total", task="boom", state="started") == 2
    assert get("aiotasks_tasks_total", task="boom", state="retry") == 1
    assert get("aiotasks_tasks_total", task="boom", state="failure") == 1
    assert get("aiotasks_task_duration_seconds_count", task="add") == 3
    assert get("aiotasks_task_duration_seconds_sum", task="add") >= 0.03  # type: ignore[operator]
    assert get("aiotasks_task_duration_seconds_bucket", task="add", le="0.005") == 0

    assert await asyncio.to_thread(get, "aiotasks_redis_up") == 1
    assert await asyncio.to_thread(get, "aiotasks_queue_waiting_tasks", queue="idle") == 1
    assert await asyncio.to_thread(get, "aiotasks_queue_scheduled_tasks", queue="idle") == 1
    assert await asyncio.to_thread(get, "aiotasks_queue_waiting_tasks", queue="default") == 0
    assert await asyncio.to_thread(get, "aiotasks_queue_dead_letters", queue="default") == 0
    assert await asyncio.to_thread(get, "aiotasks_scheduled_tasks") == 1
    assert await asyncio.to_thread(get, "aiotasks_workers") == 1
    assert await asyncio.to_thread(get, "aiotasks_worker_concurrency", worker=w.name) == 100


async def test_unreachable_redis_still_answers_the_scrape() -> None:
    m = Metrics(App(redis_url="redis://127.0.0.1:1/0", namespace="nowhere"), cache_seconds=0)
    assert await asyncio.to_thread(m.registry.get_sample_value, "aiotasks_redis_up") == 0
    assert m.registry.get_sample_value("aiotasks_workers") is None


async def test_worker_process_serves_metrics(app: App, spawn_worker: Any) -> None:
    port = free_port()
    proc = spawn_worker("--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    async with httpx.AsyncClient(timeout=5) as client:

        async def scrape() -> str | None:
            try:
                r = await client.get(url)
            except httpx.TransportError:
                return None
            return r.text if r.status_code == 200 else None

        assert await eventually(scrape, 15), proc.output()
        handles = [await app.send_task(ADD, args=[i, i]) for i in range(3)]
        assert [await h.result(timeout=10) for h in handles] == [0, 2, 4]
        try:
            await (await app.send_task(BOOM)).result(timeout=10)
        except TaskFailed:
            pass
        await app.send_task(ADD, args=[0, 0], queue="nobody")

        async def settled() -> str | None:
            text = await scrape()
            done = text and value(text, "aiotasks_tasks_total", task=BOOM, state="failure")
            waiting = text and value(text, "aiotasks_queue_waiting_tasks", queue="nobody")
            return text if done and waiting == 1 else None

        text = await eventually(settled, 15)
        assert text, await scrape()
    assert value(text, "aiotasks_tasks_total", task=ADD, state="started") == 3
    assert value(text, "aiotasks_tasks_total", task=ADD, state="success") == 3
    assert value(text, "aiotasks_tasks_total", task=BOOM, state="started") == 1
    assert value(text, "aiotasks_task_duration_seconds_count", task=ADD) == 3
    assert value(text, "aiotasks_redis_up") == 1
    assert value(text, "aiotasks_workers") == 1
    (me,) = await Admin(app).workers()
    assert value(text, "aiotasks_worker_concurrency", worker=me.name) == 100
    assert value(text, "aiotasks_worker_running_tasks", worker=me.name) is not None


async def test_metrics_port_in_use_is_one_clear_error(spawn_worker: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = spawn_worker("--metrics-port", str(port))
        assert await asyncio.to_thread(proc.wait, 20) == 1
    out = proc.output()
    assert f"error: cannot serve metrics on 0.0.0.0 port {port}: Address already in use" in out
    assert "Traceback" not in out


async def test_metrics_host_limits_where_the_server_listens(spawn_worker: Any) -> None:
    port = free_port()
    proc = spawn_worker("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    async with httpx.AsyncClient(timeout=5) as client:

        async def scrape() -> bool:
            try:
                return (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
            except httpx.TransportError:
                return False

        assert await eventually(scrape, 15), proc.output()
    # Bound to 127.0.0.1 only: another loopback address can still take the port, which
    # a server listening on 0.0.0.0 would not allow.
    with socket.socket() as other:
        other.bind(("127.0.0.2", port))
