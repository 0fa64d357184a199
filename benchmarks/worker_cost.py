"""Worker (Python) instructions per no-op task, counted by valgrind's callgrind.

    python benchmarks/worker_cost.py [--tasks 1000 3000] [--concurrency 32]
                                     [--python PATH] [--redis-url URL] [--alone]

Runs `aiotasks run --burst` under callgrind twice, on a queue of `--tasks` no-ops each
time (a server of its own unless `--redis-url`), and reports the difference of the two
instruction counts per task: the worker's own cost per task, with its start-up (imports,
connecting, the first fetch) taken out. The count is the same run after run (0.05% here),
whatever else the machine does, where CPU time per task moves ±30% on a shared 2-core
machine: a change to the hot path shows up however small. `--python` measures another
interpreter (one with aiotasks installed, or this checkout on its path).

`--alone` counts a task served alone instead, as on the path of `make bench`'s
send -> result latency: the worker runs as a service (not `--burst`) and a client sends
the tasks one at a time, each after the last one's result (default 100 and 300 tasks).

`make bench` reports the worker's CPU per task in seconds; this says whether a change to
the worker's Python moved it. The protocol is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # aiotasks_extras, beside this
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # aiotasks, this checkout

from aiotasks_extras import _drain_keys

from aiotasks import App, ResultTimeout
from aiotasks.testing.server import OwnServer

HERE = Path(__file__).resolve().parent
NAMESPACE = "worker-cost"

#: The app the measured worker runs: one no-op task, as `make bench` sends.
APP = """
import os
from aiotasks import App

app = App(namespace=os.environ["WORKER_COST_NAMESPACE"])


@app.task(name="noop")
async def noop() -> None:
    return None
"""


def _noop_app(url: str, namespace: str) -> tuple[App, Any]:
    """A client App with the measured worker's no-op task, and the task."""
    app = App(redis_url=url, namespace=namespace)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app, noop


async def _fill(url: str, namespace: str, tasks: int) -> None:
    """Queue `tasks` no-ops, on a namespace emptied first."""
    app, noop = _noop_app(url, namespace)
    async with app:
        await _drain_keys(app.client.redis, namespace)
        for start in range(0, tasks, 1000):
            await noop.send_many([((), None)] * min(1000, tasks - start))


class _NoResult(Exception):
    """A task sent one at a time got no result: the worker exited, or hangs."""


async def _one_at_a_time(
    url: str, namespace: str, tasks: int, worker: subprocess.Popen[Any]
) -> None:
    """Send `tasks` no-ops one at a time, each after the last one's result."""
    app, noop = _noop_app(url, namespace)
    async with app:
        for i in range(tasks):
            handle = await noop.send()
            # The first waits for the worker to start, under valgrind.
            deadline = time.monotonic() + (240 if i == 0 else 60)
            while True:
                try:
                    await handle.result(timeout=1)
                    break
                except ResultTimeout:
                    if worker.poll() is not None:
                        raise _NoResult(f"the worker exited (code {worker.returncode})") from None
                    if time.monotonic() > deadline:
                        raise _NoResult(f"task {i + 1} of {tasks} got no result") from None


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, a clean stop after which callgrind writes its count; killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _clean(url: str, namespace: str) -> None:
    async with App(redis_url=url, namespace=namespace) as app:
        await _drain_keys(app.client.redis, namespace)


def _count(python: str, url: str, tasks: int, concurrency: int, tmp: Path, alone: bool) -> int:
    """Instructions of one worker that runs `tasks` no-ops: queued before it starts (a
    burst), or `alone`, sent one at a time while it runs."""
    if alone:
        asyncio.run(_clean(url, NAMESPACE))
    else:
        asyncio.run(_fill(url, NAMESPACE, tasks))
    out = tmp / f"cg.{tasks}"
    env = {
        **os.environ,
        "AIOTASKS_REDIS_URL": url,
        "WORKER_COST_NAMESPACE": NAMESPACE,
        # The app module beside the run, then this checkout, before anything installed.
        "PYTHONPATH": os.pathsep.join(
            [str(tmp), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python]
    argv += ["-m", "aiotasks", "run", "worker_cost_app:app", "--concurrency", str(concurrency)]
    try:
        if not alone:
            run = subprocess.run(
                [*argv, "--burst"], env=env, cwd=tmp, capture_output=True, text=True, timeout=900
            )
            code, err = run.returncode, run.stderr
        else:
            # Its log in a file: a pipe nobody reads while it runs could fill and stop it.
            with (tmp / f"worker.{tasks}.log").open("w+") as log:
                proc = subprocess.Popen(
                    argv, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=log
                )
                failed: _NoResult | None = None
                try:
                    asyncio.run(_one_at_a_time(url, NAMESPACE, tasks, proc))
                except _NoResult as exc:
                    failed = exc
                finally:
                    _stop(proc)
                log.seek(0)
                code, err = proc.returncode, log.read()
                if failed is not None:
                    raise SystemExit(f"{failed}:\n{err[-2000:]}")
        if code != 0:
            raise SystemExit(f"the worker failed (exit {code}):\n{err[-2000:]}")
    finally:
        asyncio.run(_clean(url, NAMESPACE))
    for line in out.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no total in {out}")


def measure(
    python: str, url: str, small: int, large: int, concurrency: int, alone: bool = False
) -> dict[str, Any]:
    """Instructions per task between a run of `small` tasks and one of `large`."""
    if not shutil.which("valgrind"):
        raise SystemExit("worker_cost.py needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "worker_cost_app.py").write_text(APP)
        a = _count(python, url, small, concurrency, Path(tmp), alone)
        b = _count(python, url, large, concurrency, Path(tmp), alone)
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {
        "python": version,
        "concurrency": concurrency,
        "alone": alone,
        "tasks": large - small,
        "kinstr_per_task": round((b - a) / (large - small) / 1000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                   help="default: 1000 3000, or 100 300 --alone")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--python", default=sys.executable, help="the interpreter to measure")
    p.add_argument("--redis-url", default=None, help="default: a server of its own")
    p.add_argument("--alone", action="store_true", help="tasks sent one at a time")
    a = p.parse_args()
    if a.tasks is None:
        a.tasks = [100, 300] if a.alone else [1000, 3000]
    # The run happens in a directory of its own: a relative path would not be found.
    python = shutil.which(a.python) or a.python
    a.python = str(Path(python).absolute())
    small, large = sorted(a.tasks)
    if small == large:
        raise SystemExit("--tasks needs two different counts")
    if a.redis_url:
        row = measure(a.python, a.redis_url, small, large, a.concurrency, a.alone)
    else:
        with OwnServer(config={"save": "", "appendonly": "no"}) as server:
            row = measure(a.python, server.url, small, large, a.concurrency, a.alone)
    how = "sent one at a time" if a.alone else "callgrind"
    print(
        f"Python {row['python']}, concurrency {row['concurrency']}: "
        f"{row['kinstr_per_task']:,.1f} k worker instructions per no-op task "
        f"({how}, {row['tasks']:,} tasks)"
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
