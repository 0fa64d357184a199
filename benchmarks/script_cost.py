"""Redis CPU per task, script by script: where the server's time goes on the hot path.

    python benchmarks/script_cost.py [--tasks 20000] [--batch 32] [--reps 5]
                                     [--redis-url URL] [--callgrind]

Drives the three hot-path scripts the way a worker does, one phase at a time, on a
server of its own (the `redis-server` on PATH, else the embedded one; `--redis-url` to
measure another, whose other clients then count too): `enqueue.lua` through
`send_many` in batches of 1,000, `fetch.lua` reading `--batch` entries per call, and
`finish.lua` storing `--batch` results per call (the fields a worker stores for a no-op
that returned None); then `idle`: 200 tasks served one at a time as an idle worker does
(a send, then the fetch pipelined behind a blocking read, which finds the entry there, a
finish of one), the scripts on the path of a send's round trip to its result, per task.
Each phase is reported in microseconds per task, as script call time
(`INFO commandstats`, the script with the commands it calls) and as the server's CPU
(`INFO cpu`, which adds parsing and networking), the median of `--reps` runs, with the
task index and event feed on (the defaults) and off (both caps 0).

`make bench` reports the worker phase as a whole ("Redis us/task"); this splits it, so a
change to a script can be measured on its own. The protocol is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # aiotasks_extras, beside this
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # aiotasks, this checkout

import redis
from aiotasks_extras import _drain_keys

from aiotasks import App
from aiotasks.contract import done_op
from aiotasks.index import DEFAULT_EVENTS_SIZE, DEFAULT_INDEX_SIZE, TaskIndex
from aiotasks.testing.server import OwnServer

NAMESPACE = "script-cost"
PHASES = ("enqueue", "fetch", "finish", "idle")
# The idle phase serves this many tasks one at a time (at most --tasks).
IDLE_ROUNDS = 200


def _mark(r: redis.Redis) -> tuple[float, float]:
    """(µs in script calls so far, server CPU seconds so far)."""
    stats: Any = r.info("commandstats")
    cpu: Any = r.info("cpu")
    # FCALL, or EVALSHA where the server has no functions.
    calls = sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("fcall", "evalsha"))
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _run(
    url: str, tasks: int, batch: int, on: bool, mark: Callable[[redis.Redis], Any] = _mark
) -> dict[str, list[float]]:
    """One run of the four phases: {phase: [script call µs/task, cpu µs/task]}; `mark` is
    called before each phase and after the last."""
    r = redis.Redis.from_url(url)
    app = App(redis_url=url, namespace=NAMESPACE)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app:
        client = app.client
        await _drain_keys(client.redis, NAMESPACE)
        # As a worker sets them when it starts (this one never does): defaults, or off.
        sizes = (DEFAULT_INDEX_SIZE, DEFAULT_EVENTS_SIZE) if on else (0, 0)
        await TaskIndex(client).configure(*sizes)
        marks = [mark(r)]
        for start in range(0, tasks, 1000):
            await noop.send_many([((), None)] * min(1000, tasks - start))
        marks.append(mark(r))
        streams = client.keys.streams("default")
        fetch = _fetch_options(streams)
        got: list[Any] = []
        while len(got) < tasks:
            reply = await client.scripts.fetch(count=batch, now_ms=_now_ms(), **fetch)
            if not reply[b"entries"]:
                break
            got += reply[b"entries"]
        marks.append(mark(r))
        for start in range(0, len(got), batch):
            ops = [_done(entry) for entry in got[start : start + batch]]
            await client.scripts.finish(streams=streams, now_ms=_now_ms(), ops=ops)
        marks.append(mark(r))
        await _idle_rounds(client, noop, streams, batch, _rounds(tasks))
        marks.append(mark(r))
        await _drain_keys(client.redis, NAMESPACE)
    r.close()
    if len(got) != tasks:
        raise SystemExit(f"fetched {len(got)} of {tasks} tasks: is a worker running here?")
    per = {phase: tasks for phase in PHASES} | {"idle": _rounds(tasks)}
    return {
        phase: [(b[0] - a[0]) / per[phase], (b[1] - a[1]) * 1e6 / per[phase]]
        for phase, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)
    }


def _rounds(tasks: int) -> int:
    return min(tasks, IDLE_ROUNDS)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fetch_options(streams: list[str]) -> dict[str, Any]:
    """fetch.lua's arguments as the worker "bench" gives them, but `count`, `now_ms`, `wait`."""
    return {"streams": streams, "consumer": "bench", "worker": "bench", "promote_limit": 100,
            "default_ttl": 3600}  # fmt: skip


def _done(entry: list[Any]) -> Any:
    """The finish op of a fetched entry ([stream, entry id, fields flat]) that returned None."""
    stream, entry_id, flat = entry
    task_id = flat[flat.index(b"id") + 1].decode()  # the id is a field by name
    return done_op(stream.decode(), entry_id, task_id, "SUCCESS", 3600, _fields())


def _fields() -> list[str | bytes]:
    """The fields a worker stores for a no-op that returned None (msgpack-encoded)."""
    t = str(_now_ms())
    return ["started_at", t, "finished_at", t, "attempts", "1", "worker", "bench", "result",
            b"\xc0", "ct", "msgpack"]  # fmt: skip


async def _idle_rounds(client: Any, noop: Any, streams: list[str], batch: int, rounds: int) -> None:
    """One task at a time, as an idle worker serves it: its send, the fetch pipelined
    behind a blocking read (fetch.lua's after-wait path; the read finds the entry there,
    so it does not block: Redis' wake of a blocked reader is not counted) with `batch`
    slots free, its finish. The three scripts on a send's round trip to its result."""
    fetch = _fetch_options(streams)
    reply = await client.scripts.fetch(count=batch, now_ms=_now_ms(), **fetch)
    for _ in range(rounds):
        tips = reply[b"tips"]
        await noop.send()
        reply = await client.scripts.fetch(
            count=batch, now_ms=_now_ms(), wait=(1000, tips), **fetch
        )
        op = _done(reply[b"entries"][0])
        await client.scripts.finish(streams=streams, now_ms=_now_ms(), ops=[op])


def measure(url: str, tasks: int, batch: int, reps: int) -> list[dict[str, Any]]:
    rows = []
    for label, on in (("index and events on", True), ("index and events off", False)):
        runs = [asyncio.run(_run(url, tasks, batch, on)) for _ in range(reps)]
        for phase in PHASES:
            rows.append(
                {
                    "scenario": label,
                    "phase": phase,
                    "call_us_per_task": round(statistics.median(x[phase][0] for x in runs), 2),
                    "cpu_us_per_task": round(statistics.median(x[phase][1] for x in runs), 2),
                }
            )
    return rows


def instructions(tasks: int, batch: int) -> list[dict[str, Any]]:
    """Redis instructions per task and phase, counted by valgrind's callgrind on a
    `redis-server` of its own: the same count run after run, whatever else the machine
    does, so a change to a script shows up however small (timings here move ±0.5 µs)."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("--callgrind needs redis-server on PATH")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, on in (("index and events on", True), ("index and events off", False)):
            out = Path(tmp) / label.replace(" ", "-")
            out.mkdir()
            totals = _callgrind_run(server, out, tasks, batch, on)
            for phase, total in zip(PHASES, totals, strict=True):
                kinstr = round(total / (_rounds(tasks) if phase == "idle" else tasks) / 1000, 1)
                rows.append({"scenario": label, "phase": phase, "kinstr_per_task": kinstr})
    return rows


def _callgrind_run(server: str, out: Path, tasks: int, batch: int, on: bool) -> list[int]:
    """One run under callgrind: the instructions of each phase."""
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p"]
    argv += [server, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    dumps: list[Path] = []

    def dump(rr: redis.Redis) -> tuple[float, float]:
        # callgrind takes the request when the server next runs: ping it until written.
        ctl = subprocess.Popen(
            ["callgrind_control", "-d", str(proc.pid)], stdout=subprocess.DEVNULL
        )
        path = out / f"cg.{proc.pid}.{len(dumps) + 1}"
        for _ in range(600):
            rr.ping()
            if path.exists() and "totals:" in path.read_text():
                break
            time.sleep(0.05)
        ctl.wait()
        dumps.append(path)
        return 0.0, 0.0

    try:
        for _ in range(600):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        asyncio.run(_run(f"redis://127.0.0.1:{port}/0", tasks, batch, on, dump))
    finally:
        with suppress(redis.RedisError):
            r.shutdown(nosave=True)
        r.close()
        proc.wait(60)
    # Dump n holds what ran since dump n-1: dumps 2 to 5 are the phases.
    return [
        next(
            int(line.split()[1])
            for line in path.read_text().splitlines()
            if line.startswith(("totals:", "summary:"))
        )
        for path in dumps[1:]
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=32, help="entries per fetch and per finish")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--redis-url", default=None, help="default: a server of its own")
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count Redis instructions per task (valgrind) instead of timing",
    )
    a = p.parse_args()
    if a.callgrind:
        crows = instructions(a.tasks, a.batch)
        print(f"{a.tasks} no-op tasks, {a.batch} per fetch and per finish, under callgrind\n")
        print("| scenario | phase | Redis instructions per task |")
        print("|---|---|---:|")
        for row in crows:
            print(f"| {row['scenario']} | {row['phase']} | {row['kinstr_per_task']:,.1f} k |")
        for row in crows:
            print(json.dumps(row))
        return
    if a.redis_url:
        rows = measure(a.redis_url, a.tasks, a.batch, a.reps)
    else:
        with OwnServer(config={"save": "", "appendonly": "no"}) as server:
            rows = measure(server.url, a.tasks, a.batch, a.reps)
    print(f"{a.tasks} no-op tasks, {a.batch} per fetch and per finish, median of {a.reps} runs\n")
    print("| scenario | phase | script call µs/task | Redis CPU µs/task |")
    print("|---|---|---:|---:|")
    for row in rows:
        print(
            f"| {row['scenario']} | {row['phase']} | {row['call_us_per_task']:.2f} "
            f"| {row['cpu_us_per_task']:.2f} |"
        )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
