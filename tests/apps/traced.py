"""Tasks for a traced worker subprocess: its finished spans go to $AIOTASKS_TEST_SPANS.

The OpenTelemetry SDK is set up here, as an application would; aiotasks itself only
uses the API.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from aiotasks import App, current_task


def span_record(span: ReadableSpan) -> dict[str, object]:
    """A finished span as a JSON-able dict (what the tests compare)."""
    ctx = span.context
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "events": [e.name for e in span.events],
        "status": span.status.status_code.name,
    }


class FileExporter(SpanExporter):
    """Appends each finished span to a file, one JSON object a line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for span in spans:
                f.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


if os.environ.get("AIOTASKS_TEST_SPANS"):
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(FileExporter(os.environ["AIOTASKS_TEST_SPANS"]))
    )
    trace.set_tracer_provider(provider)

app = App(namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"), tracing=True)


@app.task(name="traced.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.task(name="traced.tsum")
async def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="traced.flaky", max_retries=2)
async def flaky(x: int) -> int:
    """Fails its first run (a retry), then succeeds."""
    ctx = current_task()
    if ctx.attempt == 1:
        raise ctx.retry(countdown=0, exc=ConnectionError("first run fails"))
    return x


@app.task(name="traced.boom")
async def boom() -> None:
    raise ValueError("boom")
