"""Logging for the CLI: `--log-format text|json`.

The library adds no handler, with one exception: a worker embedded in a host application
(`App.lifespan(worker=True)`) whose warnings and errors nothing would show, because the
host (uvicorn, for one) configures only its own loggers. See `visible_errors`.

With json, every line on stderr is one JSON object: `time`, `level`, `logger`, `message`,
then every field a call site passed with `extra=` (e.g. `task_id`, `task_name`, `state`,
`duration`, `attempt`, `queue`, `worker`), then `exc_info` when there is a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

#: Attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site added with `extra=`, in the order it gave them."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras, exc_info if any."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(extra_fields(record))
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str)


def setup(level: str, fmt: str = "text") -> None:
    """Send every record at `level` and above to stderr, as text lines or JSON objects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def json_enabled() -> bool:
    """Did `setup` choose JSON? (then errors go out as JSON records too)"""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def emit(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Hand one record straight to the root handlers, whatever the configured level.

    For what must always show, as a banner or an error line does in text mode.
    """
    record = logger.makeRecord(logger.name, level, "", 0, message, (), None, extra=fields)
    for handler in logging.getLogger().handlers:
        handler.handle(record)


def handled(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` from `logger` reaches a handler that writes it somewhere."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, logging.NullHandler) and handler.level <= level:
                return True
        if not current.propagate:
            return False
        current = current.parent
    return False


class _Fallback(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler of embedded workers, shared by those running at once."""

    users = 0


@contextmanager
def visible_errors(logger_name: str = "aiotasks") -> Iterator[None]:
    """Show the logger's warnings and errors on stderr for the block, unless a handler
    already would: a failing task must not go unseen in an embedded worker."""
    logger = logging.getLogger(logger_name)
    probe = logging.getLogger(f"{logger_name}.worker")
    handler = next((h for h in logger.handlers if isinstance(h, _Fallback)), None)
    if handler is None:
        if not probe.isEnabledFor(logging.ERROR) or handled(probe, logging.ERROR):
            yield
            return
        handler = _Fallback(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        logger.addHandler(handler)
    handler.users += 1
    try:
        yield
    finally:
        handler.users -= 1
        if not handler.users:
            logger.removeHandler(handler)
