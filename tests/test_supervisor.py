"""`aiotasks run --processes N`: real supervisor and worker processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiotasks import App
from aiotasks.admin import Admin
from aiotasks.supervisor import Child, Supervisor, child_args
from tests.helpers import children

ADD = "tests.apps.basic.add"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def registered(app: App, pids: set[int]) -> bool:
    """Every pid runs a worker that registered in Redis."""
    workers = await Admin(app).workers()
    return pids <= {w.pid for w in workers}


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free pair of ports")


def test_child_args() -> None:
    argv = ["/x/aiotasks", "run", "m:app", "--processes", "3", "--concurrency", "5"]
    assert child_args(argv, 0) == ["run", "m:app", "--concurrency", "5"]
    argv = ["aiotasks", "run", "m:app", "--processes=3", "--metrics-port", "9100", "--burst"]
    assert child_args(argv, 0) == ["run", "m:app", "--metrics-port", "9100", "--burst"]
    assert child_args(argv, 2) == ["run", "m:app", "--metrics-port", "9102", "--burst"]
    assert child_args(["a", "run", "--metrics-port=9100"], 1) == ["run", "--metrics-port=9101"]


async def test_restarts_a_killed_child_and_stops_on_sigterm(app: App, spawn_worker: Any) -> None:
    port = free_port_pair()
    sup = spawn_worker("--processes", "2", "--metrics-port", str(port))
    first = await until(lambda: len(children(sup.pid)) == 2 and children(sup.pid), 20, "2 children")
    await until(lambda: registered(app, first), 20, "both workers registered")
    # Each child serves metrics on its own port.
    async with httpx.AsyncClient() as client:
        for p in (port, port + 1):
            r = await client.get(f"http://127.0.0.1:{p}/metrics", timeout=5)
            assert r.status_code == 200 and "aiotasks_redis_up" in r.text

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    now = await until(
        lambda: (c := children(sup.pid)) and len(c) == 2 and victim not in c and c,
        20,
        "a replacement child",
    )
    assert len(now & first) == 1  # the other child was left alone
    await until(lambda: registered(app, now), 20, "the replacement registered")
    sup.wait_for_output("was killed by SIGKILL; restarting it in")

    # The pool still works.
    handles = [await app.send_task(ADD, args=[i, i]) for i in range(10)]
    assert [await h.result(timeout=10) for h in handles] == [2 * i for i in range(10)]

    sup.signal(signal.SIGTERM)
    assert await asyncio.to_thread(sup.wait, 20) == 0, sup.output()
    for pid in now:
        await until(lambda pid=pid: not alive(pid), 5, f"child {pid} to exit")
    out = sup.output()
    assert "SIGTERM: stopping all worker processes" in out
    assert "Traceback" not in out
    # Both children stopped gracefully and unregistered.
    assert not await registered(app, {next(iter(now))})


async def test_burst_children_finish_and_are_not_restarted(app: App, spawn_worker: Any) -> None:
    handles = [await app.send_task(ADD, args=[i, 1]) for i in range(20)]
    sup = spawn_worker("--processes", "2", "--burst")
    assert await asyncio.to_thread(sup.wait, 30) == 0, sup.output()
    assert [await h.result(timeout=1) for h in handles] == [i + 1 for i in range(20)]
    assert "restarting" not in sup.output()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
async def test_children_stop_when_the_supervisor_is_killed(app: App, spawn_worker: Any) -> None:
    sup = spawn_worker("--processes", "2")
    kids = await until(lambda: len(children(sup.pid)) == 2 and children(sup.pid), 20, "children")
    await until(lambda: registered(app, kids), 20, "both workers registered")
    sup.kill()  # SIGKILL: no chance to forward anything
    for pid in kids:
        await until(lambda pid=pid: not alive(pid), 15, f"orphan {pid} to stop")


class _SignalledWhileStarting(Supervisor):
    """Children that only sleep; a SIGTERM handled just as the last one is being started
    (the handler runs between two bytecodes of the main thread, Popen's among them)."""

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    def start(self, child: Child) -> None:
        if child.index == len(self.children) - 1 and not self.signals:
            self.on_signal(signal.SIGTERM, None)
        super().start(child)


def test_a_signal_while_a_child_starts_reaches_it_too() -> None:
    sup = _SignalledWhileStarting(3, ["aiotasks", "run", "m:app", "--processes", "3"])

    def kill_all() -> None:  # lets a run() that waits for a child that got nothing end
        for c in sup.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()

    guard = threading.Timer(20, kill_all)
    guard.start()
    try:
        t0 = time.monotonic()
        code = sup.run()  # in the main thread: it installs signal handlers
        took = time.monotonic() - t0
    finally:
        guard.cancel()
        kill_all()
    codes = [c.proc.returncode if c.proc is not None else None for c in sup.children]
    assert codes == [-signal.SIGTERM] * 3, codes
    assert code == 0
    assert took < 10, took
    assert [c.sent for c in sup.children] == [1, 1, 1]
