"""aiotasks-only scenarios for `make bench`: sequential sends, scaling over worker
processes (with Redis CPU per task), and Redis memory per queued task and per result."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


async def _info(redis: Any, section: str) -> dict[str, Any]:
    info: dict[str, Any] = await redis.info(section)
    return info


async def _drain_keys(redis: Any, namespace: str) -> None:
    from aiotasks.keys import namespace_pattern

    keys = [k async for k in redis.scan_iter(match=namespace_pattern(namespace), count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


def _loop_name() -> str:
    """'uvloop' when the running loop is uvloop's (the loop `aiotasks run` and uvicorn
    pick when it is installed), else 'asyncio'."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


async def sequential_sends(url: str, n: int = 3000) -> dict[str, Any]:
    from aiotasks import App

    app = App(redis_url=url, namespace=f"bench-seq-{uuid.uuid4().hex[:6]}")

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app:
        for _ in range(100):
            await noop.send()
        t0 = time.perf_counter()
        for _ in range(n):
            await noop.send()
        rate = n / (time.perf_counter() - t0)
        await _drain_keys(app.client.redis, app.settings.namespace)
    return {
        "scenario": f"sequential await task.send() ({_loop_name()})",
        "sends_per_s": round(rate, 1),
        "summary": f"{rate:,.0f} sends/s",
    }


async def concurrent_sends(url: str, n: int = 20_000, senders: int = 100) -> dict[str, Any]:
    """`senders` coroutines each awaiting task.send() in a loop, as a busy web server does:
    the sends of one loop turn go to Redis as one script call (sendbatch.py)."""
    from aiotasks import App

    app = App(redis_url=url, namespace=f"bench-conc-{uuid.uuid4().hex[:6]}")

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async def sender(k: int) -> None:
        for _ in range(k):
            await noop.send()

    async with app:
        await asyncio.gather(*(sender(10) for _ in range(senders)))  # warm up
        t0 = time.perf_counter()
        await asyncio.gather(*(sender(n // senders) for _ in range(senders)))
        rate = n / (time.perf_counter() - t0)
        await _drain_keys(app.client.redis, app.settings.namespace)
    return {
        "scenario": f"{senders} coroutines sending concurrently ({_loop_name()})",
        "sends_per_s": round(rate, 1),
        "summary": f"{rate:,.0f} sends/s",
    }


async def _cpu(probes: list[Any]) -> list[float]:
    """CPU seconds (user + sys) each server has used so far."""
    infos = [await _info(r, "cpu") for r in probes]
    return [i["used_cpu_sys"] + i["used_cpu_user"] for i in infos]


async def _memory(probes: list[Any]) -> int:
    return sum([(await _info(r, "memory"))["used_memory"] for r in probes])


async def scaling(
    url: str,
    tasks: int,
    concurrency: int,
    processes: int,
    variant: str = "",
    env: dict[str, str] | None = None,
    masters: list[str] | None = None,
    shards: int = 1,
) -> dict[str, Any]:
    """`processes` workers drain `tasks` no-ops; Redis CPU and memory measured around it.

    `env` switches features on both sides (see scale_app.py): SCALE_SIGNING_KEY signs
    every message, SCALE_INDEX=0 turns the task index and event feed off, SCALE_TRACING=1
    turns tracing on, SCALE_FLOW=1 registers tasks with concurrency, rate and debounce
    limits beside the unlimited no-ops. `masters`: on a Cluster, a URL per master, whose
    CPU is measured one by one (and memory summed). `shards`: the namespace's shards.
    """
    from redis.asyncio import Redis

    from aiotasks import App
    from aiotasks.index import TaskIndex

    env = env or {}
    namespace = f"bench-scale-{uuid.uuid4().hex[:6]}"
    on = env.get("SCALE_INDEX") != "0"
    index, events = (10_000, 1_000) if on else (0, 0)
    app = App(
        redis_url=url,
        namespace=namespace,
        signing_key=env.get("SCALE_SIGNING_KEY") or None,
        index_size=index,
        events_size=events,
        tracing=env.get("SCALE_TRACING") == "1",
        shards=shards,
    )

    @app.task(name="noop")
    async def noop() -> None:
        return None

    probe_dir = Path(tempfile.mkdtemp(prefix="aiotasks-scale-"))
    async with app:
        redis = app.client.redis
        probes = [Redis.from_url(u) for u in masters] if masters else [redis]
        await TaskIndex(app.client).configure(index, events)  # the sends' scripts too
        mem0 = await _memory(probes)
        for start in range(0, tasks, 1000):
            await noop.send_many([((), None)] * min(1000, tasks - start))
        mem_queued = await _memory(probes)
        cpu0 = await _cpu(probes)
        env = {
            **os.environ,
            "SCALE_NAMESPACE": namespace,
            "SCALE_PROBE_DIR": str(probe_dir),
            **env,
            "AIOTASKS_SHARDS": str(shards),
            "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aiotasks",
                    "run",
                    "scale_app:app",
                    "--redis-url",
                    url,
                    "--concurrency",
                    str(concurrency),
                ],
                cwd=HERE,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(processes)
        ]
        streams = [s for shard in app.client.shards for s in shard.keys.streams("default")]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            async with redis.pipeline(transaction=False) as pipe:
                for s in streams:
                    pipe.xlen(s)
                left = sum(await pipe.execute())
            if not left:
                break
            await asyncio.sleep(0.02)
        cpu1 = await _cpu(probes)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        mem_results = await _memory(probes)
        live, finished = await TaskIndex(app.client).size()
        events = sum([await redis.xlen(shard.keys.events) for shard in app.client.shards])
        reports = [json.loads(f.read_text()) for f in probe_dir.glob("*.json")]
        await _drain_keys(redis, namespace)
        if masters:
            for r in probes:
                await r.aclose()
    done = sum(r["count"] for r in reports)
    t_first = min(r["t_first"] for r in reports if r["count"])
    t_last = max(r["t_last"] for r in reports if r["count"])
    rate = done / (t_last - t_first) if t_last > t_first else 0.0
    per_server = [after - before for before, after in zip(cpu0, cpu1, strict=True)]
    cpu = sum(per_server)
    return {
        "scenario": f"{processes} worker process(es), concurrency {concurrency}"
        + (f", {variant}" if variant else ""),
        "processes": processes,
        "tasks": done,
        "tasks_per_s": round(rate, 1),
        "redis_cpu_us_per_task": round(cpu / max(done, 1) * 1e6, 1),
        "redis_cpu_us_per_task_per_server": [round(c / max(done, 1) * 1e6, 1) for c in per_server],
        "redis_bytes_per_queued_task": round((mem_queued - mem0) / tasks),
        "redis_bytes_per_result": round((mem_results - mem0) / tasks),
        "redis_mb_before": round(mem0 / 2**20, 1),
        "redis_mb_after": round(mem_results / 2**20, 1),
        "index_live": live,
        "index_finished": finished,
        "event_entries": events,
        "summary": (
            f"{rate:,.0f} tasks/s; Redis CPU {cpu / max(done, 1) * 1e6:.1f} µs/task; "
            f"{(mem_queued - mem0) / tasks:.0f} B per queued task, "
            f"{(mem_results - mem0) / tasks:.0f} B per stored result"
        ),
    }


async def send_scenarios(url: str) -> list[dict[str, Any]]:
    """Sequential and concurrent sends, on whichever loop runs this."""
    return [await sequential_sends(url), await concurrent_sends(url)]


async def run_extras(url: str, tasks: int, concurrency: int) -> list[dict[str, Any]]:
    """Every aiotasks-only scenario but the sends (`send_scenarios`, which run.py runs on
    each loop), as JSON-able dicts with a `summary`."""
    out: list[dict[str, Any]] = []
    for processes in (1, 2, 4):
        print(f"[bench] scaling: {processes} process(es)", file=sys.stderr, flush=True)
        out.append(await scaling(url, tasks * 2, concurrency, processes))
    # The cost of each feature: each variant right after a plain run of its own, so both
    # see the machine in the same state (a 2-core machine drifts by 10-20% over a run).
    for variant, env in VARIANTS:
        print(f"[bench] scaling: 1 process, {variant}", file=sys.stderr, flush=True)
        plain = await scaling(url, tasks * 2, concurrency, 1)
        row = await scaling(url, tasks * 2, concurrency, 1, variant, env)
        change = row["tasks_per_s"] / max(plain["tasks_per_s"], 1.0) - 1
        row["plain_tasks_per_s"] = plain["tasks_per_s"]
        row["summary"] += (
            f"; {change:+.1%} vs {plain['tasks_per_s']:,.0f} tasks/s plain just before"
        )
        out.append(row)
    print("[bench] a 3-master cluster", file=sys.stderr, flush=True)
    out += await cluster(tasks * 2, concurrency)
    print("[bench] 100,000 tasks: the index stays within its cap", file=sys.stderr, flush=True)
    cap = await scaling(url, 100_000, concurrency, 1, "100,000 tasks")
    cap["summary"] += (
        f"; index: {cap['index_finished']:,} finished ids"
        f" (cap 10,000), {cap['event_entries']:,} event entries; Redis "
        f"{cap['redis_mb_before']} -> {cap['redis_mb_after']} MB with every result kept"
    )
    out.append(cap)
    return out


async def cluster(tasks: int, concurrency: int) -> list[dict[str, Any]]:
    """One namespace on a 3-master loopback cluster the scenario starts, in 1 shard and
    in 3: throughput, and Redis CPU per task on each master (1 shard: one master holds
    the namespace and the others should see none of it, notifications included; 3
    shards: each master holds one)."""
    from aiotasks.testing.cluster import OwnCluster, supports_cluster

    name = "3-master cluster, 1 worker process, one namespace"
    if not supports_cluster():
        return [{"scenario": name, "summary": "skipped: redis-server has no cluster mode"}]
    rows = []
    with OwnCluster(masters=3, replicas=0) as own:
        masters = [f"redis://127.0.0.1:{m.port}" for m in own.masters]
        for shards in (1, 3):
            row = await scaling(own.url, tasks, concurrency, 1, masters=masters, shards=shards)
            row["scenario"] = f"{name} in {shards} shard(s)"
            per = row["redis_cpu_us_per_task_per_server"]
            row["summary"] = (
                f"{row['tasks_per_s']:,.0f} tasks/s; Redis CPU per task by master: "
                + ", ".join(f"{c:.1f} µs" for c in sorted(per, reverse=True))
            )
            rows.append(row)
    return rows


VARIANTS = [
    ("task index and events off", {"SCALE_INDEX": "0"}),
    ("messages signed", {"SCALE_SIGNING_KEY": "bench-key"}),
    ("tracing on (no SDK)", {"SCALE_TRACING": "1"}),
    ("flow-controlled tasks in the app (no-op tasks unlimited)", {"SCALE_FLOW": "1"}),
]
