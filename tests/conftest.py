"""Shared fixtures: a real Redis, a namespace per test, in-process and subprocess workers.

The server comes from $AIOTASKS_TEST_REDIS_URL / $AIOTASKS_REDIS_URL / $REDIS_URL (as
`make test` sets it), else 127.0.0.1:6379 when it answers, else an embedded Valkey.
Tests never flush a server: each uses its own namespace and deletes its keys by SCAN.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis

from aiotasks import App, Worker
from aiotasks.keys import namespace_pattern
from aiotasks.testing.server import OwnServer, resolve_server, server_binary
from tests.helpers import children

ROOT = Path(__file__).resolve().parent.parent


def _parse_uninterrupted() -> None:
    """Turn source into `ast` objects with the collector off, one thread at a time.

    CPython 3.11 before 3.11.8 and 3.12 before 3.12.2 keep one depth counter for every
    such conversion in the interpreter (gh-106905): a finalizer that the collector runs
    in the middle of one can hand the GIL to another thread converting too, and the first
    fails with "SystemError: AST constructor recursion depth mismatch". This machine's
    3.11.7 and 3.12.1 have it, and tests convert without knowing it (pytest rewrites a
    plugin's modules, aiotasks among them, and parses for a traceback's carets): CI saw
    it once, in `web --app nocolon`. With no finalizer, nothing runs in the middle of a
    conversion; the lock keeps one thread from turning the collector back on under
    another (re-entrant: a signal handler may parse between two lines of `ast.parse`).
    """
    parse = ast.parse
    lock = threading.RLock()

    def uninterrupted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            collecting = gc.isenabled()
            gc.disable()
            try:
                return parse(*args, **kwargs)
            finally:
                if collecting:
                    gc.enable()

    ast.parse = uninterrupted  # type: ignore[assignment]  # ast.literal_eval calls it too


if sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2):
    _parse_uninterrupted()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the shared test server (never flushed)."""
    explicit = os.environ.get("AIOTASKS_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    with resolve_server("auto") as info:
        yield info.url


def cleanup_namespace(url: str, namespace: str) -> None:
    """Delete every key of a namespace (SCAN + DEL, never FLUSH)."""
    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=namespace_pattern(namespace), count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i : i + 500])
    finally:
        r.close()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    yield ns
    cleanup_namespace(redis_url, ns)


@pytest.fixture
async def app(redis_url: str, namespace: str) -> AsyncIterator[App]:
    """An App on the test server and a throwaway namespace."""
    a = App(redis_url=redis_url, namespace=namespace)
    yield a
    await a.close()


@pytest.fixture
async def make_app(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., App]]:
    """Factory of more Apps on the test namespace (`url=` for another server), closed after
    the test's workers stopped. Request it before `worker`, so that it is torn down after.
    """
    made: list[App] = []

    def make(url: str | None = None, **settings: Any) -> App:
        a = App(redis_url=url or redis_url, namespace=namespace, **settings)
        made.append(a)
        return a

    yield make
    for a in made:
        await a.close()


@pytest.fixture
async def worker(app: App) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory: `w = await worker(concurrency=4)` starts an in-process worker (stopped after)."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(a: App | None = None, **opts: Any) -> Worker:
        w = (a or app).worker(**opts)
        task = asyncio.create_task(w.run())
        waiter = asyncio.create_task(w.wait_started())
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            waiter.cancel()
            task.result()
        started.append((w, task))
        return w

    yield start
    for w, _task in started:
        w.stop()
    for w, task in started:
        try:
            await asyncio.wait_for(task, timeout=w.shutdown_timeout + 5)
        except TimeoutError:
            task.cancel()


class WorkerProcess:
    """A worker started through the CLI as a real process."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in worker output:\n{self.output()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            # A supervisor's children (--processes) first, each in a process group of
            # its own: they would outlive it, stop gracefully on its death and write to
            # a namespace the test has deleted by then (their groups, a LEFT event).
            # Stopped, it restarts none meanwhile.
            self.signal(signal.SIGSTOP)
            for pid in children(self.proc.pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn_worker(
    redis_url: str, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start `aiotasks run tests.apps.<module>:app` as a subprocess (killed after).

    The child app reads its namespace and Redis URL from the environment.
    """
    procs: list[WorkerProcess] = []

    def spawn(
        *args: str, module: str = "basic", url: str | None = None, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        full_env = {
            **os.environ,
            "AIOTASKS_REDIS_URL": url or redis_url,
            "AIOTASKS_TEST_NAMESPACE": namespace,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        argv = [
            sys.executable,
            "-m",
            "aiotasks",
            "run",
            f"tests.apps.{module}:app",
            "--log-level",
            "info",
            *args,
        ]
        p = WorkerProcess(argv, full_env, tmp_path / f"worker-{len(procs)}.log")
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.close()


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    """A server this test owns (it may stop, kill or restart it)."""
    with OwnServer(server_binary()) as server:
        yield server
