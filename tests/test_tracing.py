"""OpenTelemetry: a request's trace goes on through `send` into `run` in a worker process.

The test process records its spans with the SDK's in-memory exporter; the worker
process (tests/apps/traced.py) writes its finished spans to a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the OpenTelemetry SDK (dev extra)")

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiotasks import App, Signature, TaskFailed, chain, chord
from tests.apps.traced import span_record

ROOT = Path(__file__).resolve().parent.parent
Span = dict[str, Any]

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """The in-memory exporter of this process's spans (the global provider is set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(_PROVIDER)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture
def traced_worker(spawn_worker: Callable[..., Any], tmp_path: Path) -> Callable[[], list[Span]]:
    """Start a traced worker process; returns a reader of the spans it finished."""
    path = tmp_path / "worker-spans.jsonl"
    spawn_worker("--concurrency", "8", module="traced", env={"AIOTASKS_TEST_SPANS": str(path)})

    def spans() -> list[Span]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    return spans


def wait_spans(read: Callable[[], list[Span]], n: int, timeout: float = 10) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def one(spans: list[Span], **match: Any) -> Span:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


def sig(tasks: App, name: str) -> Signature:
    """A signature of a task this process does not import (it runs in the worker)."""
    return Signature(name, app=tasks)


def web_app(tasks: App) -> FastAPI:
    api = FastAPI(lifespan=tasks.lifespan())

    @api.post("/add")
    async def post_add(x: int, y: int) -> dict[str, Any]:
        h = await tasks.send_task("traced.add", (x, y))
        return {"id": h.id, "result": await h.result(timeout=10)}

    @api.post("/chord")
    async def post_chord() -> dict[str, Any]:
        add = sig(tasks, "traced.add")
        h = await chord([add.clone((1, 2)), add.clone((3, 4))], sig(tasks, "traced.tsum")).send()
        return {"id": h.id, "result": await h.result(timeout=10)}

    FastAPIInstrumentor.instrument_app(api, tracer_provider=_PROVIDER)
    return api


async def test_a_request_its_send_and_the_run_in_a_worker_process_share_one_trace(
    redis_url: str,
    namespace: str,
    exporter: InMemorySpanExporter,
    traced_worker: Callable[[], list[Span]],
) -> None:
    tasks = App(redis_url=redis_url, namespace=namespace, tracing=True)
    api = web_app(tasks)
    transport = httpx.ASGITransport(app=api)
    async with tasks, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/add", params={"x": 2, "y": 3})
        assert r.json()["result"] == 5
        task_id = r.json()["id"]
    local = [span_record(s) for s in exporter.get_finished_spans()]
    request = one(local, kind="SERVER")
    send = one(local, name="send traced.add")
    assert send["kind"] == "PRODUCER"
    assert send["trace_id"] == request["trace_id"]
    assert send["parent_id"] == request["span_id"]
    assert send["attributes"]["aiotasks.task.id"] == task_id
    assert send["attributes"]["messaging.destination.name"] == "default"

    run = one(wait_spans(traced_worker, 1), name="run traced.add")
    assert run["kind"] == "CONSUMER"
    assert run["trace_id"] == request["trace_id"]
    assert run["parent_id"] == send["span_id"]
    attrs = run["attributes"]
    assert attrs["aiotasks.task.id"] == task_id
    assert attrs["aiotasks.task.name"] == "traced.add"
    assert attrs["aiotasks.task.queue"] == "default"
    assert attrs["aiotasks.task.attempt"] == 1
    assert attrs["aiotasks.task.state"] == "SUCCESS"


async def test_a_chords_header_and_body_runs_belong_to_the_request_trace(
    redis_url: str,
    namespace: str,
    exporter: InMemorySpanExporter,
    traced_worker: Callable[[], list[Span]],
) -> None:
    tasks = App(redis_url=redis_url, namespace=namespace, tracing=True)
    api = web_app(tasks)
    transport = httpx.ASGITransport(app=api)
    async with tasks, httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/chord")
        assert r.json()["result"] == 10
    local = [span_record(s) for s in exporter.get_finished_spans()]
    request = one(local, kind="SERVER")
    send = one(local, name="send chord")
    assert send["parent_id"] == request["span_id"]
    assert send["attributes"]["aiotasks.task.id"] == r.json()["id"]
    remote = wait_spans(traced_worker, 3)
    headers = [s for s in remote if s["name"] == "run traced.add"]
    body = one(remote, name="run traced.tsum")
    assert len(headers) == 2
    for span in [*headers, body]:
        assert span["trace_id"] == request["trace_id"]
        assert span["parent_id"] == send["span_id"]
    assert body["attributes"]["aiotasks.task.id"] == r.json()["id"]


async def test_a_chains_next_step_continues_the_running_tasks_span(
    redis_url: str,
    namespace: str,
    exporter: InMemorySpanExporter,
    traced_worker: Callable[[], list[Span]],
) -> None:
    tasks = App(redis_url=redis_url, namespace=namespace, tracing=True)
    tracer = trace.get_tracer("test")
    add = sig(tasks, "traced.add")
    async with tasks:
        with tracer.start_as_current_span("caller") as caller:
            h = await chain(add.clone((1, 2)), add.clone((3,)), add.clone((4,))).send()
        assert await h.result(timeout=10) == 10
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    send = one([span_record(s) for s in exporter.get_finished_spans()], name="send chain")
    runs = [s for s in wait_spans(traced_worker, 3) if s["name"] == "run traced.add"]
    assert len(runs) == 3
    assert {s["trace_id"] for s in runs} == {trace_id}
    by_parent = {s["parent_id"]: s for s in runs}
    first = by_parent[send["span_id"]]  # the first step: sent by the caller
    second = by_parent[first["span_id"]]  # compiled by the worker that ran the first
    third = by_parent[second["span_id"]]
    assert third["attributes"]["aiotasks.task.id"] == h.id


async def test_retries_are_events_and_a_failure_is_an_error(
    redis_url: str,
    namespace: str,
    exporter: InMemorySpanExporter,
    traced_worker: Callable[[], list[Span]],
) -> None:
    tasks = App(redis_url=redis_url, namespace=namespace, tracing=True)
    async with tasks:
        flaky = await tasks.send_task("traced.flaky", (7,))
        assert await flaky.result(timeout=10) == 7
        boom = await tasks.send_task("traced.boom")
        with pytest.raises(TaskFailed):
            await boom.result(timeout=10)
    remote = wait_spans(traced_worker, 3)
    runs = sorted(
        (s for s in remote if s["name"] == "run traced.flaky"),
        key=lambda s: s["attributes"]["aiotasks.task.attempt"],
    )
    assert [s["attributes"]["aiotasks.task.state"] for s in runs] == ["RETRY", "SUCCESS"]
    assert [s["attributes"]["aiotasks.task.attempt"] for s in runs] == [1, 2]
    assert runs[0]["events"] == ["retry"] and runs[1]["events"] == []
    send = one([span_record(s) for s in exporter.get_finished_spans()], name="send traced.flaky")
    assert {s["parent_id"] for s in runs} == {send["span_id"]}  # both runs: the same send
    failed = one(remote, name="run traced.boom")
    assert failed["status"] == "ERROR" and failed["events"] == ["exception"]
    assert failed["attributes"]["aiotasks.task.state"] == "FAILURE"
    # No trace around the send: the send span starts one, and the run continues it.
    assert failed["parent_id"] is not None


def test_without_tracing_aiotasks_needs_no_opentelemetry(redis_url: str, namespace: str) -> None:
    # redis-py imports opentelemetry by itself when it is installed: hide it altogether.
    script = f"""
import asyncio, sys
sys.modules["opentelemetry"] = None  # any import of it fails
from aiotasks import App, chain
app = App(redis_url={redis_url!r}, namespace={namespace!r})

@app.task
async def add(x, y):
    return x + y

async def main():
    worker = app.worker()
    async with app, worker.running():
        assert await (await add.send(1, 2)).result(timeout=10) == 3
        assert await (await chain(add.s(1, 1), add.s(1)).send()).result(timeout=10) == 3
    print("aiotasks.tracing" in sys.modules)
    try:
        App(tracing=True)
    except ImportError as exc:
        print(exc)

asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "False",
        "App(tracing=True) needs OpenTelemetry's API: pip install 'aiotasks-streams[otel]'",
    ]
