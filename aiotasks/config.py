"""Settings: an App's resolved options, frozen once at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def resolve_redis_url(explicit: str | None) -> str:
    """The argument, else $AIOTASKS_REDIS_URL, else the local default."""
    return explicit or os.environ.get("AIOTASKS_REDIS_URL") or DEFAULT_REDIS_URL


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How `send` retries a publish on connection errors (Celery's defaults)."""

    max_retries: int = 3
    interval_start: float = 0.0
    interval_step: float = 0.2
    interval_max: float = 0.2

    @classmethod
    def of(cls, value: RetryPolicy | dict[str, Any] | None) -> RetryPolicy:
        """Accept a RetryPolicy, a dict of its fields, or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        return cls(**value)

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number `retry` (0-based)."""
        return min(self.interval_max, self.interval_start + retry * self.interval_step)


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved App options (see App for their meaning)."""

    redis_url: str
    namespace: str = "aiotasks"
    default_queue: str = "default"
    serializer: str = "msgpack"
    compression: str | None = None
    compress_min_size: int = 1024
    result_ttl: int = 86400
    visibility_timeout: float = 60.0
    max_connections: int = 64
    max_message_size: int = 16 * 1024 * 1024
    task_routes: dict[str, str] = field(default_factory=dict)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and banners."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
