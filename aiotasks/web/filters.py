"""Jinja filters of the dashboard's templates: times, durations, ids in URLs, values."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment

from .pages import show_value


def iso(value: datetime | None) -> str:
    """An aware datetime as ISO 8601 (what the page's script reads), "" for None."""
    return value.isoformat() if value is not None else ""


def when(value: datetime | None) -> str:
    """A datetime as readable UTC text, to the second."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(value: datetime | None) -> str:
    """The time of day (UTC) to the millisecond: what a timeline shows."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago (or in how long) a datetime is: "5 s ago", "in 3 min"."""
    if value is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    text = duration(abs(seconds), short=True)
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def duration(seconds: float | None, short: bool = False) -> str:
    """Seconds as "850 ms", "4.2 s", "3 min", "2 h 5 min"."""
    if seconds is None:
        return "—"
    if seconds < 1 and not short:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s" if short else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


# Ids that no proxy or browser changes on their way as a path segment: no "%" escapes a
# proxy may decode (nginx turns "%2F" back into "/", a level deeper than the browser
# sees), and no "." or ".." segment a browser resolves.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9_.~-]*")


def task_href(value: Any) -> str:
    """A task page's URL relative to the dashboard's root.

    `tasks/<id>` for a plain id; `tasks?id=<id>` for any other, since a query string
    reaches the dashboard as it was sent, whatever decodes paths on the way.
    """
    task_id = str(value)
    if _PLAIN_ID.fullmatch(task_id):
        return f"tasks/{task_id}"
    return f"tasks?id={quote(task_id, safe='')}"


def install_filters(env: Environment) -> None:
    """Register the filters on a Jinja environment."""
    env.filters.update(
        iso=iso, when=when, clock=clock, ago=ago, duration=duration, task_href=task_href,
        pretty=show_value,
    )  # fmt: skip


__all__ = ["ago", "clock", "duration", "install_filters", "iso", "task_href", "when"]
