"""Helpers shared by the tests: bounded polling and worker-subprocess bookkeeping."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiotasks import App, TaskFailed, TaskHandle, TaskState


def children(pid: int) -> set[int]:
    """Pids whose parent is `pid` (read from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.add(int(entry.name))
    return out


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    timeout: float = 5.0,
    what: str = "a condition",
    interval: float = 0.02,
) -> None:
    """Poll `check` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_state(h: TaskHandle[Any], state: TaskState, timeout: float = 10) -> None:
    """Wait until the task reads `state`."""

    async def reached() -> bool:
        return await h.state() == state

    await wait_until(reached, timeout, f"task {h.id} to be {state}")


def pid_of(worker_name: str | None) -> int:
    """The pid in a worker name (host-pid-random)."""
    assert worker_name, "no worker recorded"
    return int(worker_name.rsplit("-", 2)[-2])


async def wait_consuming(app: App, *procs: Any, timeout: float = 15) -> None:
    """Wait until every given worker subprocess has registered (it consumes from then on)."""
    want = {p.pid for p in procs}

    async def registered() -> bool:
        for p in procs:
            assert p.proc.poll() is None, f"worker {p.pid} exited:\n{p.output()}"
        names = await app.client.redis.zrange(app.client.keys.workers, 0, -1)
        return want <= {pid_of(n.decode()) for n in names}

    await wait_until(registered, timeout, f"workers {sorted(want)} to register")


def runs_key(app: App, name: str = "runs") -> str:
    """A counter key inside the test namespace (deleted with it)."""
    return f"{app.client.keys.prefix}test:{name}"


async def failure_of(h: TaskHandle[Any], timeout: float = 10) -> TaskFailed:
    """Wait for the task and return the TaskFailed its result() raises."""
    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=timeout)
    return err.value


class ReadAhead:
    """A task `job(tag)` that records its runs; `job("hold")` waits until `unblock` is set.

    `await send()` makes a concurrency-1 worker (already running) hold `hold` in its slot
    and read `ahead` beyond it: short tasks first, so the worker reads a batch ahead, then
    `first`, then `hold` and `ahead` in one script call, which the idle worker wakes to
    and fetches together. Returns the three handles.
    """

    def __init__(self, app: App) -> None:
        self.runs: list[str] = []
        self.holding = asyncio.Event()
        self.unblock = asyncio.Event()

        @app.task(name="tests.read_ahead.job")
        async def job(tag: str) -> str:
            self.runs.append(tag)
            if tag == "hold":
                self.holding.set()
                await self.unblock.wait()
            return tag

        self.job = job

    async def send(self) -> tuple[TaskHandle[str], TaskHandle[str], TaskHandle[str]]:
        for h in await self.job.send_many([((f"w{i}",), None) for i in range(100)]):
            await h.result(timeout=10)
        first = await self.job.send("first")
        await first.result(timeout=10)
        held, ahead = await self.job.send_many([(("hold",), None), (("ahead",), None)])
        await asyncio.wait_for(self.holding.wait(), 10)
        return first, held, ahead


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A uvicorn process: an HTTP client on it, and its console output so far."""

    def __init__(self, proc: subprocess.Popen[bytes], client: httpx.Client, log: Path) -> None:
        self.proc, self.client, self.log = proc, client, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)
        return self.output()

    def poll_until_final(self, path: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.client.get(path).json()
            if body["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                return body
            assert time.monotonic() < deadline, (body, self.output())
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; uvicorn re-raises it once shut down, so -SIGTERM is a clean exit too."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@contextmanager
def uvicorn(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Served]:
    """Run `uvicorn ARGV` (must hold `--port N`) until the block ends; wait until it answers."""
    port = argv[argv.index("--port") + 1]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *argv], cwd=cwd, env=env, stdout=out, stderr=out
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                served = Served(proc, client, log)
                # Logged once the socket listens ("Application startup complete." comes
                # before that: a request right after it can be refused).
                served.wait_for_output("Uvicorn running on", timeout=20)
                yield served
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def count_enqueue_calls(app: App) -> list[int]:
    """Record the number of task records of each enqueue.lua call (the real call runs)."""
    scripts = app.client.scripts
    sizes: list[int] = []
    original = scripts.enqueue

    async def counting(**kw: Any) -> list[int]:
        sizes.append(len(kw["tasks"]))
        return await original(**kw)

    scripts.enqueue = counting  # type: ignore[method-assign]
    return sizes
