"""Hooks: user callbacks around task runs (metrics, tracing, error reporting plug in here)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class Hooks:
    """Lists of callbacks, sync or async, called by the worker.

    - start(ctx): before the task runs.
    - success(ctx, result): after it returned.
    - failure(ctx, exc): after it failed for good (not on a retry).
    - retry(ctx, exc): after a run that will be retried (`exc`: what caused it, or the
      `Retry` raised).
    - revoked(ctx): after a running task was revoked with terminate=True.
    - data_lost(queues): a worker found that Redis lost data on these queues (metrics).

    A hook that raises is logged and otherwise ignored: it never fails the task.
    """

    def __init__(self) -> None:
        self.start: list[Callable[..., Any]] = []
        self.success: list[Callable[..., Any]] = []
        self.failure: list[Callable[..., Any]] = []
        self.retry: list[Callable[..., Any]] = []
        self.revoked: list[Callable[..., Any]] = []
        self.data_lost: list[Callable[..., Any]] = []

    def __bool__(self) -> bool:
        # The task hooks only: the worker skips building contexts when none is set.
        return bool(self.start or self.success or self.failure or self.retry or self.revoked)

    async def call(self, which: list[Callable[..., Any]], *args: Any) -> None:
        """Call every hook of one kind, awaiting async ones."""
        for fn in which:
            try:
                res = fn(*args)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("hook %r raised", fn)
