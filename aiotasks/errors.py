"""Every exception aiotasks raises, under one base.

```
AiotasksError(Exception)
├── BrokerConnectionError(ConnectionError)  Redis unreachable after the send retry_policy ran out
├── BrokerRefusedError                      Redis answered with a refusal (OOM, NOPERM, READONLY...)
├── SerializationError(ValueError)          the codec cannot encode or decode; nothing was enqueued
├── SignatureError                          a message is unsigned or its signature is forged
├── ResultTimeout(TimeoutError)             result()/results() gave up waiting
├── TaskRevoked                             the task was revoked or expired
├── TaskLost                                the task's record vanished: Redis lost its data
├── TaskFailed                              remote failure: id, exc_type, exc_message, traceback
│   ├── ChordError                          a chord header task failed; names that task
│   └── UnknownTask(LookupError)            no worker knew the task's name
├── SoftTimeLimitExceeded                   raised inside a task at its soft_timeout
├── MaxRetriesExceededError                 recorded as exc_type: a bare Retry() past max_retries
└── TimeLimitExceeded(TimeoutError)         recorded as exc_type when hard_timeout cancels a task
Retry(Exception)                            control flow, not an error: re-run the task later
Replace(Exception)                          control flow: the task becomes a canvas
```
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from redis.exceptions import AskError as _AskError
from redis.exceptions import ClusterError as _ClusterError
from redis.exceptions import ConnectionError as _RedisConnectionError
from redis.exceptions import InvalidResponse as _InvalidResponse
from redis.exceptions import RedisClusterUnreachableError as _ClusterUnreachableError
from redis.exceptions import SlotNotCoveredError as _SlotNotCoveredError
from redis.exceptions import TimeoutError as _RedisTimeoutError
from redis.exceptions import TryAgainError as _TryAgainError

#: A Cluster in a failover or a slot migration: CLUSTERDOWN, TRYAGAIN, MOVED/ASK retries
#: run out ("TTL exhausted"), a slot no node serves yet, no node answering (starting, or
#: all unreachable). They pass; like a lost connection, they are waited out.
CLUSTER_TRANSIENT: tuple[type[BaseException], ...] = (
    _ClusterError,
    _TryAgainError,
    _AskError,
    _SlotNotCoveredError,
    _ClusterUnreachableError,
)

#: Errors that mean "the connection to Redis is gone (or its topology is changing)",
#: not "the command was wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    _RedisConnectionError,
    _RedisTimeoutError,
    _InvalidResponse,  # not Redis at that address (a wrong port): as if unreachable
    ConnectionError,
    OSError,
    *CLUSTER_TRANSIENT,
)


class AiotasksError(Exception):
    """Base of every error aiotasks raises."""


class BrokerConnectionError(AiotasksError, ConnectionError):
    """Redis could not be reached, after the retry policy ran out."""


class BrokerRefusedError(AiotasksError):
    """Redis answered, but refused the command: out of memory (OOM), an ACL without the
    permission (NOPERM), a read-only replica (READONLY), still loading its data (LOADING),
    a wrong password, or any other error reply. Nothing was enqueued.

    `code` is the reply's error code ("OOM", "NOPERM", "READONLY", "LOADING", ...).
    """

    def __init__(self, message: str, code: str = "ERR") -> None:
        super().__init__(message)
        self.code = code

    @property
    def is_transient(self) -> bool:
        """True when waiting may help (the server is loading, or failing over)."""
        return self.code in TRANSIENT_REFUSALS


#: Refusals that go away by themselves: a server loading its data, a failover.
TRANSIENT_REFUSALS = frozenset({"LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY"})


class ConfigurationError(AiotasksError, ValueError):
    """Settings that cannot work with the namespace as it is in Redis: a shard count other
    than the one its tasks are spread over."""


class SerializationError(AiotasksError, ValueError):
    """A value could not be encoded or decoded by the serializer; nothing was enqueued."""


class SignatureError(AiotasksError):
    """A worker with a signing key met a message that is unsigned or signed with no key
    it knows: the message is dead-lettered, never run (its task ends with this exc_type).
    """


class ResultTimeout(AiotasksError, TimeoutError):
    """Waiting for a result took longer than the caller's timeout."""


class TaskRevoked(AiotasksError):
    """The task was revoked or expired before it finished."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} was revoked")
        self.task_id = task_id


class TaskLost(AiotasksError):
    """The task's record vanished while it was awaited: Redis lost its data (a restart
    without persistence, an eviction, a flush), so the task will never finish.

    Raised by `result()` and `updates()` of a task this App sent, or that the handle saw
    in Redis, when a read after a reconnect finds no record of it.
    """

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"task {task_id} was lost: its record vanished from Redis across a reconnect "
            "(the server lost its data: restarted without persistence, evicted or flushed)"
        )
        self.task_id = task_id


class TaskFailed(AiotasksError):
    """The task raised; carries the remote exception's type, message and traceback."""

    def __init__(
        self,
        task_id: str,
        exc_type: str,
        exc_message: str,
        traceback: str | None = None,
    ) -> None:
        super().__init__(task_id, exc_type, exc_message)
        self.task_id = task_id
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"task {self.task_id} failed: {self.exc_type}: {self.exc_message}"


class ChordError(TaskFailed):
    """A chord header task failed, so the chord's body never runs.

    `failed_task_id` names the header task; `exc_type` is "ChordError" and `exc_message`
    says which header failed and with what error.
    """

    def __init__(
        self,
        task_id: str,
        exc_type: str,
        exc_message: str,
        traceback: str | None = None,
        failed_task_id: str = "",
    ) -> None:
        super().__init__(task_id, exc_type, exc_message, traceback)
        self.failed_task_id = failed_task_id

    def __str__(self) -> str:
        # exc_message names the header and its error already ("header task <id> ended
        # FAILURE: ValueError: ...").
        return f"chord body {self.task_id} will not run: {self.exc_message}"


class UnknownTask(TaskFailed, LookupError):
    """The task failed because no worker has a task registered under its name.

    Raised by `result()` of such a task; its `exc_type` is "UnknownTask".
    """


class SoftTimeLimitExceeded(AiotasksError):
    """Raised inside a running task when its soft_timeout passes; it may clean up and return."""


class TimeLimitExceeded(AiotasksError, TimeoutError):
    """A task ran past its hard_timeout and was cancelled (recorded as its exc_type)."""


class MaxRetriesExceededError(AiotasksError):
    """A task asked for a retry (`raise Retry()`, no `exc=`) with its retries used up:
    its recorded exc_type (Celery's name)."""


class Retry(Exception):
    """Raise inside a task to run it again later, as a retry (counts against max_retries).

    Args:
        countdown: seconds to wait before the next run.
        eta: an aware datetime for the next run (wins over countdown).
        exc: the error that caused the retry, recorded if retries run out.
        max_retries: overrides the task's max_retries for this decision.
    """

    def __init__(
        self,
        countdown: float | None = None,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(countdown, eta)
        self.countdown = countdown
        self.eta = eta
        self.exc = exc
        self.max_retries = max_retries


class Replace(Exception):
    """Raise inside a task to replace it with a signature or any canvas (Celery's
    `self.replace`): `raise current_task().replace(sig)`.

    The task ends without a result of its own; its handle resolves to the replacement's
    final result, and its callbacks, errbacks, chord membership and chain continuation
    carry over to the replacement.
    """

    def __init__(self, canvas: Any) -> None:
        super().__init__(canvas)
        self.canvas = canvas


#: redis-py's text for a Sentinel it could not ask names the Sentinel by its whole client
#: repr (every connection setting, a kilobyte and more): the host and port say it.
_SENTINEL_REPR = re.compile(
    r"<redis\.asyncio\.client\.Redis\(.*?host=([^,]+),port=(\d+).*?\)> - ", re.S
)


def describe(exc: BaseException, url: str = "") -> str:
    """`str(exc)`, with a Sentinel's client repr in it cut down to its host:port, and
    what it likely means when that is not plain (a server at `url` that is not Redis, or
    that does not speak TLS)."""
    text = _SENTINEL_REPR.sub(lambda m: f"Sentinel {m[1]}:{m[2]} - ", str(exc))
    if isinstance(exc, _InvalidResponse):
        return f"{text} (the server there does not speak the Redis protocol: a wrong port?)"
    if url.lower().startswith("rediss") and "Timeout connecting" in text:
        return f"{text} (a server without TLS never answers a TLS handshake: is it redis://?)"
    if url.lower().startswith("redis:") and "reset by peer" in text:
        return f"{text} (a server that speaks only TLS drops a plain connection: rediss://?)"
    return text
