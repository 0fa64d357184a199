"""Settings: an App's resolved options, frozen once at construction; the Redis URL rules.

```
env_redis_url()          $AIOTASKS_REDIS_URL, else $REDIS_URL, else None (empty counts as unset)
resolve_redis_url(arg)   the argument, else env_redis_url(), else redis://localhost:6379/0
redact_url(url)          the URL with every password hidden, for anything printed or logged
check_redis_url(url)     raise InvalidRedisURL naming what is wrong, before any connection
```
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import AiotasksError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: The environment variables that name the Redis URL, the first set (and non-empty) wins.
ENV_VARS = ("AIOTASKS_REDIS_URL", "REDIS_URL")
#: URL schemes the connection pool accepts.
SUPPORTED_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
#: What replaces a password.
HIDDEN = "***"


def env_redis_source() -> tuple[str, str] | None:
    """The first of ENV_VARS set to a non-empty value, as (variable name, URL), else None."""
    for name in ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return name, value
    return None


def env_redis_url() -> str | None:
    """$AIOTASKS_REDIS_URL, else $REDIS_URL, else None (an empty value counts as unset)."""
    found = env_redis_source()
    return found[1] if found else None


def resolve_redis_url(explicit: str | None) -> str:
    """The argument, else env_redis_url(), else the local default."""
    return explicit or env_redis_url() or DEFAULT_REDIS_URL


# -- hiding passwords --------------------------------------------------------------------

# A query parameter whose name mentions a password (password=, sentinel_password=, ...).
_QUERY_SECRET = re.compile(r"(?i)([?&;][^=&;#]*pass[^=&;#]*=)[^&;#]*")


def redact_url(url: str) -> str:
    """`url` with every password replaced by ***, for banners, logs and error messages.

    Hides the userinfo's password (`redis://user:pw@h`, `redis://:pw@h`; a lone userinfo
    `redis://token@h` is hidden whole, since it may be a password) and any query parameter
    whose name mentions a password (`?password=`, `&sentinel_password=`), in every scheme
    (`redis`, `rediss`, `unix`, `redis+sentinel`, `redis+cluster`, ...). A URL that does not
    parse is hidden from its scheme on when it may hold a secret: when in doubt, hide.
    """
    try:
        hidden = _redact_parsed(url)
    except ValueError:
        hidden = None
    if hidden is None or _leaks(url, hidden):
        return _redact_opaque(url)
    return hidden


def _redact_parsed(url: str) -> str | None:
    """The redacted URL from its parsed parts, or None when the parse looks unreliable."""
    parts = urlsplit(url)
    if not parts.scheme or not url.lower().startswith(parts.scheme + "://"):
        return None if ("@" in url or "pass" in url.lower()) else url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{HIDDEN}@{hostport}" if colon else f"{HIDDEN}@{hostport}"
    rest = url[len(parts.scheme) + 3 + len(parts.netloc) :]
    if "@" in rest:  # an "@" past the host: a password with an unescaped "/", "?" or "#"
        return None
    return f"{url[: len(parts.scheme)]}://{netloc}{_hide_query(rest)}"


def _redact_opaque(url: str) -> str:
    """Everything up to the last "@" hidden, and any password parameter: for odd URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = f"{HIDDEN}@{rest.rpartition('@')[2]}"
    return f"{scheme}{sep}{_hide_query('?' + rest)[1:]}"


def _hide_query(text: str) -> str:
    return _QUERY_SECRET.sub(lambda m: m.group(1) + HIDDEN, text)


def _leaks(url: str, hidden: str) -> bool:
    """Does `hidden` still contain a password that `url` carries? (a last safety net)"""
    try:
        parts = urlsplit(url)
        secrets = [parts.password or ""]
        query = parse_qsl(parts.query, keep_blank_values=True)
        secrets += [v for k, v in query if "pass" in k.lower()]
    except ValueError:
        return False
    return any(len(s) >= 3 and s != HIDDEN and s in hidden for s in secrets)


# -- checking a URL before connecting ----------------------------------------------------


class InvalidRedisURL(AiotasksError, ValueError):
    """A Redis URL that cannot work: wrong scheme, port or database (password hidden)."""


def check_redis_url(url: str) -> None:
    """Check `url` as the connection pool will read it, before any connection is made.

    Raises:
        InvalidRedisURL: naming what is wrong, with the password hidden.
    """
    shown = redact_url(url)
    problem = _url_problem(url)
    if problem is None and "+" in url.partition("://")[0]:
        from .topology import parse

        try:
            parse(url)
        except ValueError as exc:
            problem = str(exc).rstrip(".")
    elif problem is None:
        from redis.asyncio.connection import parse_url

        from .topology import unknown_options_problem, unknown_url_options

        try:
            unknown = unknown_url_options(dict(parse_url(url)))
        except ValueError as exc:
            problem = str(exc).rstrip(".")
        else:
            problem = unknown_options_problem(unknown) if unknown else None
    if problem is not None:
        raise InvalidRedisURL(f"invalid Redis URL {shown!r}: {problem}")


def _url_problem(url: str) -> str | None:
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()  # as redis-py reads it
    expected = (
        "expected redis://host:port/db, rediss://host:port/db, unix:///path/to/socket, "
        "redis+cluster://host:port[,host:port...] or "
        "redis+sentinel://host:port[,host:port...]/service"
    )
    if not sep:
        return f"not a URL ({expected})"
    if scheme not in SUPPORTED_SCHEMES:
        return f"unsupported scheme {scheme + '://'!r} ({expected})"
    if "+" in scheme:
        return None  # topology.parse reads the host list and the service
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return _port_problem(str(exc))
    if parts.scheme == "unix":
        return None if parts.path else f"no socket path ({expected})"
    if port == 0:
        return "port 0 is not a port (1..65535)"
    return _db_problem(parts.path, parts.query)


def _port_problem(message: str) -> str:
    if "Port could not be cast" in message:
        return f"the port is not a number: {message.rpartition(' as ')[2]}"
    if "out of range" in message:
        return "the port is out of range (1..65535)"
    if "IPv6" in message:
        return f"the host is malformed ({message}: an unclosed '[' or ']'?)"
    return message


def _db_problem(path: str, query: str) -> str | None:
    db = path.strip("/")
    if db and not db.isdigit():
        return f"the database {db!r} (after the host) is not a number"
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "db" and not value.isdigit():
            return f"the database {value!r} (db=) is not a number"
    return None


#: The environment variable an App reads its shard count from.
SHARDS_ENV = "AIOTASKS_SHARDS"

#: Upper bound of `shards`: each shard costs a worker one script call per batch.
MAX_SHARDS = 64


class ShardsEnvError(ValueError):
    """$AIOTASKS_SHARDS holds no shard count: the environment's error, not the code's."""


def resolve_shards(explicit: int | None) -> int:
    """The shard count: `explicit`, else $AIOTASKS_SHARDS, else 1.

    Raises:
        ValueError: not a whole number from 1 to MAX_SHARDS (ShardsEnvError when it came
            from the environment).
    """
    raw: object = explicit
    if explicit is None:
        raw = os.environ.get(SHARDS_ENV, "").strip() or "1"
    text = str(raw).strip()
    if isinstance(raw, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        error = ValueError if explicit is not None else ShardsEnvError
        what = "shards" if explicit is not None else f"${SHARDS_ENV}"
        raise error(f"{what} must be a whole number from 1 to {MAX_SHARDS}, got {raw!r}")
    return int(text)


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
    signing_keys: tuple[bytes, ...] = ()
    index_size: int = 10_000
    events_size: int = 1_000
    shards: int = 1
    task_routes: dict[str, str] = field(default_factory=dict)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    warn_on_unsafe_server: bool = True

    @property
    def encoding(self) -> dict[str, Any]:
        """How messages are encoded: Message.record()'s size limits and signing key."""
        return {
            "min_size": self.compress_min_size,
            "max_size": self.max_message_size,
            "signing_key": self.signing_keys[0] if self.signing_keys else None,
        }

    def __repr__(self) -> str:
        # Settings end up in logs and tracebacks: never with the password.
        items = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url":
                value = redact_url(value)
            elif f.name == "signing_keys":
                value = tuple("***" for _ in value)
            items.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(items)})"
