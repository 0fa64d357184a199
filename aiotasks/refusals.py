"""What Redis's error replies mean: a refusal (Redis answered, and will not do it) or a
connection problem, each as the error aiotasks raises, with what to do about it."""

from __future__ import annotations

import re

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
)

from .errors import BrokerConnectionError, BrokerRefusedError, describe

#: Error replies that mean "Redis answered, but will not do it", and what to do about them.
_REFUSAL_HINTS = {
    "OOM": "the server is out of memory: raise maxmemory or free memory",
    "NOPERM": "the ACL user lacks a permission: see the README's ACL line",
    "READONLY": "this is a read-only replica: point the URL at the primary",
    "MISCONF": "the server cannot write to disk",
    "NOREPLICAS": "fewer replicas than min-replicas-to-write are in sync with it",
}
_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (OutOfMemoryError, "OOM"),
    (NoPermissionError, "NOPERM"),
    (ReadOnlyError, "READONLY"),
    (BusyLoadingError, "LOADING"),
    (AuthenticationError, "WRONGPASS"),
    (AuthorizationError, "NOPERM"),
)
#: Refusals that a failover explains behind a Sentinel or Cluster URL (Client.transient).
FAILOVER_REFUSALS = ("READONLY", "NOREPLICAS")
#: Connection errors that are really refusals: a retry does not change the answer.
REFUSED_CONNECTION = (AuthenticationError, AuthorizationError)


#: Error codes that redis-py leaves in the message of a plain ResponseError.
_OTHER_CODES = frozenset(
    {"MISCONF", "BUSY", "NOSCRIPT", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}
)


#: A refusal inside a script's error on Redis before 7, and the codes it may be.
_WRAPPED = re.compile(r": -([A-Z]+)\b")
_WRAPPED_CODES = _OTHER_CODES | set(_REFUSAL_HINTS)

#: What redis-py puts before the reply of a command that failed in a pipeline.
_IN_PIPELINE = " of pipeline caused error: "


def reply_text(exc: BaseException) -> str:
    """The error reply of `exc`, without redis-py's "Command # 1 (HSET ...) of pipeline
    caused error: " before it (which holds the command's arguments, and hid the code)."""
    text = str(exc)
    if text.startswith("Command # ") and _IN_PIPELINE in text:
        return text.rpartition(_IN_PIPELINE)[2]  # the command's arguments come first
    return text


def error_code(exc: BaseException) -> str:
    """The error code of a Redis error reply ("OOM", "NOPERM", ...; "ERR" by default)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    text = reply_text(exc)
    first = text.split(" ", 1)[0]
    if first not in _OTHER_CODES and "Error running script" in text:
        # Redis before 7 wraps a script's refusal: "ERR Error running script ...: -OOM ..."
        wrapped = _WRAPPED.search(text)
        if wrapped and wrapped[1] in _WRAPPED_CODES:
            return wrapped[1]
    return first if first in _OTHER_CODES else "ERR"


def broker_error(url: str, exc: BaseException) -> BrokerConnectionError | BrokerRefusedError:
    """The aiotasks error for a redis-py error: a refusal, or a connection problem."""
    if isinstance(exc, (ResponseError, BusyLoadingError, *REFUSED_CONNECTION)):
        return refusal(url, exc)
    return BrokerConnectionError(f"cannot reach Redis at {url}: {describe(exc, url)}")


def not_a_cluster(exc: BaseException) -> bool:
    """Whether a cluster client found a server not in cluster mode (a redis+cluster://
    URL for a single server): a refusal that no retry changes."""
    return type(exc) is RedisClusterException and "Cluster mode is not enabled" in str(exc)


#: What a server with a password says to HELLO from a client that gave none.
_NO_CREDENTIALS = "HELLO must be called with the client already authenticated"


def refusal(url: str, exc: BaseException, what: str = "the command") -> BrokerRefusedError:
    """A BrokerRefusedError for an error reply, with its code and what it means."""
    code = error_code(exc)
    if isinstance(exc, AuthenticationError):
        if _NO_CREDENTIALS in str(exc) or "Authentication required" in str(exc):
            return BrokerRefusedError(
                f"Redis at {url} requires a password, and the URL gives none "
                "(put ':PASSWORD@' or 'USER:PASSWORD@' before the host)",
                code,
            )
        return BrokerRefusedError(f"Redis at {url} refused the credentials: {exc}", code)
    reply = reply_text(exc)
    text = reply if code == "ERR" or reply.startswith(code) else f"{code} {reply}"
    hint = _REFUSAL_HINTS.get(code)
    if not_a_cluster(exc):
        hint = "the URL says Redis Cluster, but the server is not one: use redis://host:port/db"
    message = f"Redis at {url} refused {what}: {text}" + (f" ({hint})" if hint else "")
    return BrokerRefusedError(message, code)
