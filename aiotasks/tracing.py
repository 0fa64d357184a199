"""OpenTelemetry spans for sends and runs: `App(tracing=True)`, extra `aiotasks[otel]`.

Only the OpenTelemetry *API* is used: spans go wherever the application's SDK sends
them, and nowhere when it has none. This module is imported only by an App made with
`tracing=True`, so an App without tracing never imports opentelemetry.

- `send`: a PRODUCER span `send <task name>` around each enqueue (a batch, a canvas).
  The messages it sends carry its W3C trace context in their payload's `trace` map.
- `run`: a CONSUMER span `run <task name>` on the worker around the task's body, a
  child of the sender's `send` span: a web request, the send it made and the run share
  one trace. Canvas steps compiled by the worker (a chain's next step, callbacks)
  carry the running task's context, so they continue its trace.

Attributes: `messaging.system` ("aiotasks"), `messaging.operation.type`,
`messaging.destination.name` (the queue), `messaging.message.id` and `aiotasks.task.id`,
`aiotasks.task.name`, `aiotasks.task.queue`, and on a run `aiotasks.task.attempt`,
`aiotasks.worker` and its final `aiotasks.task.state` (`SUCCESS`, `FAILURE`, `RETRY`,
...). A run that will be retried gets a `retry` event (with the error and when it runs
again); a failure records the exception and sets the span's status to ERROR.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "App(tracing=True) needs OpenTelemetry's API: pip install 'aiotasks-streams[otel]'"
    ) from exc

if TYPE_CHECKING:
    from .message import Message

#: W3C trace context only (traceparent, tracestate): what the protocol's `trace` map holds.
_PROPAGATOR = TraceContextTextMapPropagator()
_SYSTEM = "aiotasks"


class Tracing:
    """Starts aiotasks' spans on the global tracer provider (set by the application)."""

    def __init__(self) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("aiotasks", __version__)

    @staticmethod
    def inject(span: Span | None = None) -> dict[str, str] | None:
        """The W3C context of `span` (default: the current one), or None outside a trace."""
        carrier: dict[str, str] = {}
        ctx = trace.set_span_in_context(span) if span is not None else None
        _PROPAGATOR.inject(carrier, context=ctx)
        return carrier or None

    @contextmanager
    def send(self, name: str, ids: Sequence[str], queues: Sequence[str]) -> Iterator[Span]:
        """A `send` span around one enqueue of tasks `ids` (the messages' context)."""
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "aiotasks.task.name": name,
        }
        if len(ids) == 1:
            attributes["messaging.message.id"] = attributes["aiotasks.task.id"] = ids[0]
        elif ids:
            attributes["messaging.batch.message_count"] = len(ids)
        if len(set(queues)) == 1:
            queue = queues[0]
            attributes["messaging.destination.name"] = attributes["aiotasks.task.queue"] = queue
        with self.tracer.start_as_current_span(
            f"send {name}", kind=SpanKind.PRODUCER, attributes=attributes
        ) as span:
            yield span

    @contextmanager
    def run(self, msg: Message, attempt: int, worker: str) -> Iterator[Span]:
        """A `run` span around one run of `msg`, continuing the sender's trace."""
        parent = _PROPAGATOR.extract(msg.trace or {})
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": msg.queue,
            "messaging.message.id": msg.id,
            "aiotasks.task.id": msg.id,
            "aiotasks.task.name": msg.name,
            "aiotasks.task.queue": msg.queue,
            "aiotasks.task.attempt": attempt,
            "aiotasks.worker": worker,
        }
        with self.tracer.start_as_current_span(
            f"run {msg.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    @staticmethod
    def ended(
        span: Span,
        state: str,
        exc: BaseException | None = None,
        error: str = "",
        retry_at: float | None = None,
    ) -> None:
        """Record how a run ended: its state; a retry as an event; a failure as an error."""
        span.set_attribute("aiotasks.task.state", state)
        if state == "RETRY":
            event: dict[str, Any] = {"exception.message": error}
            if exc is not None:
                event["exception.type"] = type(exc).__name__
            if retry_at is not None:
                event["aiotasks.retry_at"] = retry_at
            span.add_event("retry", event)
        elif state == "FAILURE":
            if exc is not None:
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, error or None))


__all__ = ["Tracing"]
