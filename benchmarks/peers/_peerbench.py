"""Shared protocol for the peer-library benchmarks (see README.md in this folder).

Every ``<lib>_bench.py`` script supplies a :class:`Spec` (how to enqueue, how to do one
round trip, how to start the library's worker) and calls :func:`main`. This module owns
everything that must be identical across libraries: argument parsing, the namespace,
the in-worker probe, worker start/stop, timings, percentiles, peak RSS, CPU per task
(worker process tree and Redis server), key cleanup and the one JSON line printed on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, Protocol

HERE = Path(__file__).resolve().parent
ENV_URL = "PEERBENCH_REDIS_URL"
ENV_NAMESPACE = "PEERBENCH_NAMESPACE"
ENV_CONCURRENCY = "PEERBENCH_CONCURRENCY"
ENV_TASKS = "PEERBENCH_TASKS"
ENV_PROBE = "PEERBENCH_PROBE_FILE"
#: in-flight enqueue calls for async libraries that have no batch API
ENQUEUE_INFLIGHT = 100
STOP_TIMEOUT_S = 10.0


def log(msg: str) -> None:
    print(f"[peerbench] {msg}", file=sys.stderr, flush=True)


def emit(obj: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")  # type: ignore[union-attr]
    sys.__stdout__.flush()  # type: ignore[union-attr]


def skip_missing(library: str, exc: ImportError) -> NoReturn:
    """Report a library that cannot be imported; exit 0 so that a suite run goes on."""
    if isinstance(exc, ModuleNotFoundError):
        reason = "not installed"
    else:  # installed but broken, e.g. incompatible versions of taskiq and taskiq-redis
        reason = f"import failed: {exc}"
    emit({"library": library, "skipped": reason})
    sys.exit(0)


@dataclass(frozen=True)
class Config:
    redis_url: str
    tasks: int
    concurrency: int
    latency_samples: int
    timeout: float
    namespace: str


def parse_args(library: str) -> Config:
    p = argparse.ArgumentParser(description=f"{library} peer benchmark (one JSON line out)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--timeout", type=float, default=300.0, help="total budget in seconds")
    a = p.parse_args()
    ns = f"peerbench-{library}-{secrets.token_hex(4)}"
    return Config(a.redis_url, a.tasks, a.concurrency, a.latency_samples, a.timeout, ns)


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker process needs to build its app; read from the environment."""

    redis_url: str
    namespace: str
    concurrency: int


def worker_env() -> WorkerEnv | None:
    """The worker-side settings, or None when not running under the benchmark driver."""
    ns = os.environ.get(ENV_NAMESPACE)
    if not ns:
        return None
    return WorkerEnv(os.environ[ENV_URL], ns, int(os.environ[ENV_CONCURRENCY]))


def first_marker(probe: Path | str) -> Path:
    """The file the probe creates when the first no-op starts (the driver's CPU start mark)."""
    return Path(str(probe) + ".first")


class Probe:
    """In-memory task counter living in the worker process.

    It creates an empty marker file when the first task starts and writes one small JSON
    file at the N-th; nothing else touches the disk or Redis.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._first: float | None = None
        self._target = int(os.environ.get(ENV_TASKS, "0"))
        self._path = os.environ.get(ENV_PROBE, "")

    def hit(self) -> None:
        with self._lock:
            now = time.monotonic()
            first = self._first is None
            if first:
                self._first = now
            self._count += 1
            done = self._count == self._target
        if first and self._path:
            first_marker(self._path).touch()
        if done and self._path:
            report = {"t_first": self._first, "t_last": now, "pid": os.getpid()}
            tmp = self._path + ".tmp"
            Path(tmp).write_text(json.dumps(report))
            os.replace(tmp, self._path)


async def run_lanes(n: int, make: Callable[[int], Awaitable[object]]) -> None:
    """Run ``make(0..n-1)`` with at most ENQUEUE_INFLIGHT calls in flight."""
    it = iter(range(n))

    async def lane() -> None:
        for i in it:
            await make(i)

    await asyncio.gather(*(lane() for _ in range(min(ENQUEUE_INFLIGHT, n))))


class Client(Protocol):
    async def enqueue_noops(self, n: int) -> None: ...

    async def echo(self, i: int, timeout: float) -> Any: ...


@dataclass(frozen=True)
class Spec:
    library: str
    dist: str
    notes: str
    client: Callable[[Config], AbstractAsyncContextManager[Client]]
    worker_argv: Callable[[Config], list[str]]


class WorkerProcess:
    """The library's worker, in its own session so that its children can be reaped."""

    def __init__(self, argv: Sequence[str], cfg: Config, probe: Path, log_path: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env.update(
            {
                ENV_URL: cfg.redis_url,
                ENV_NAMESPACE: cfg.namespace,
                ENV_CONCURRENCY: str(cfg.concurrency),
                ENV_TASKS: str(cfg.tasks),
                ENV_PROBE: str(probe),
            }
        )
        self.log_path = log_path
        self._log = log_path.open("wb")
        log(f"starting worker: {' '.join(argv)}")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log("worker ignored SIGTERM, sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):  # leftover children of our own session
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._log.close()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")


async def wait_for_file(path: Path, worker: WorkerProcess) -> None:
    while not path.exists():
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.proc.returncode}")
        await asyncio.sleep(0.005)


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + sys) used so far by a process and all its descendants.

    Live descendants are summed one by one; ``children_user``/``children_system`` add
    those already exited and reaped. None when psutil is missing or the process is gone.
    """
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class RedisCpu:
    """The Redis server's own CPU time (``INFO cpu``: used_cpu_user + used_cpu_sys).

    It is the whole server's, so it only means something on a server that nothing
    else is using during the run.
    """

    def __init__(self, redis_url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url)

    def seconds(self) -> float | None:
        try:
            info: Any = self._client.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


class CpuMark:
    """Worker-tree and Redis CPU seconds at one instant."""

    def __init__(self, worker_pid: int, redis_cpu: RedisCpu) -> None:
        self.worker = tree_cpu_s(worker_pid)
        self.redis = redis_cpu.seconds()

    @staticmethod
    def us_per_task(start: float | None, end: float | None, tasks: int) -> float | None:
        if start is None or end is None or tasks <= 0:
            return None
        return round((end - start) / tasks * 1e6, 1)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, psutil's current RSS as a fallback."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import psutil

        return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 1)
    except Exception:
        return None


def percentile(sorted_ms: list[float], q: float) -> float:
    rank = max(1, math.ceil(q * len(sorted_ms)))
    return round(sorted_ms[rank - 1], 3)


def cleanup_keys(redis_url: str, namespace: str) -> int:
    """SCAN + DEL every key containing the run's namespace (never a flush)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0

    def drop(keys: list[bytes]) -> int:
        n: Any = client.delete(*keys)  # typed differently across redis-py versions
        return int(n)

    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += drop(batch)
                batch.clear()
        if batch:
            deleted += drop(batch)
    finally:
        client.close()
    return deleted


async def run_protocol(cfg: Config, spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "library": spec.library,
        "version": metadata.version(spec.dist),
        "tasks": cfg.tasks,
        "concurrency": cfg.concurrency,
        "enqueue_per_s": None,
        "worker_per_s": None,
        "worker_cpu_us_per_task": None,
        "redis_cpu_us_per_task": None,
        "p50_ms": None,
        "p99_ms": None,
        "rss_mb": None,
        "notes": spec.notes,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f"{cfg.namespace}-"))
    probe_path = tmp / "probe.json"
    worker: WorkerProcess | None = None
    redis_cpu: RedisCpu | None = None
    probe: dict[str, Any] = {}
    samples: list[float] = []
    phase = "connect"
    deadline = time.monotonic() + cfg.timeout
    try:
        async with asyncio.timeout(cfg.timeout), spec.client(cfg) as client:
            phase = "enqueue"
            t0 = time.perf_counter()
            await client.enqueue_noops(cfg.tasks)
            out["enqueue_per_s"] = round(cfg.tasks / (time.perf_counter() - t0), 1)
            log(f"enqueued {cfg.tasks} no-ops: {out['enqueue_per_s']}/s")

            phase = "worker"
            redis_cpu = RedisCpu(cfg.redis_url)
            worker = WorkerProcess(spec.worker_argv(cfg), cfg, probe_path, tmp / "worker.log")
            # CPU of the drain: from the first no-op's start to the N-th, as the driver
            # sees the probe's two files (polled every 5 ms), so start-up is not counted.
            await wait_for_file(first_marker(probe_path), worker)
            start = CpuMark(worker.proc.pid, redis_cpu)
            await wait_for_file(probe_path, worker)
            end = CpuMark(worker.proc.pid, redis_cpu)
            probe = json.loads(probe_path.read_text())
            out["worker_per_s"] = round(cfg.tasks / (probe["t_last"] - probe["t_first"]), 1)
            out["worker_cpu_us_per_task"] = CpuMark.us_per_task(start.worker, end.worker, cfg.tasks)
            out["redis_cpu_us_per_task"] = CpuMark.us_per_task(start.redis, end.redis, cfg.tasks)
            if out["worker_cpu_us_per_task"] is None and importlib.util.find_spec("psutil") is None:
                out["notes"] += " (worker CPU not measured: psutil is not installed)"
            log(
                f"worker ran {cfg.tasks} no-ops: {out['worker_per_s']}/s, CPU per task: "
                f"worker {out['worker_cpu_us_per_task']} us, "
                f"Redis {out['redis_cpu_us_per_task']} us"
            )

            phase = "latency"
            for i in range(cfg.latency_samples):
                t0 = time.perf_counter()
                got = await client.echo(i, max(1.0, deadline - time.monotonic()))
                samples.append((time.perf_counter() - t0) * 1000)
                if got != i:
                    raise RuntimeError(f"echo({i}) returned {got!r}")
    except TimeoutError:
        out["error"] = f"timed out after {cfg.timeout:.0f}s during {phase}"
    except Exception as exc:
        out["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if samples:
            ordered = sorted(samples)
            out["p50_ms"], out["p99_ms"] = percentile(ordered, 0.5), percentile(ordered, 0.99)
            if len(samples) < cfg.latency_samples:
                out["notes"] += f" (latency from {len(samples)} samples only)"
        if redis_cpu is not None:
            redis_cpu.close()
        if worker is not None:
            out["rss_mb"] = peak_rss_mb(int(probe.get("pid", worker.proc.pid)))
            worker.stop()
            if "error" in out:
                log(f"worker log tail:\n{worker.tail()}")
        with contextlib.suppress(Exception):
            log(f"deleted {cleanup_keys(cfg.redis_url, cfg.namespace)} keys of {cfg.namespace}")
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(spec: Spec) -> None:
    cfg = parse_args(spec.library)
    with contextlib.redirect_stdout(sys.stderr):  # stray prints must not pollute the JSON
        result = asyncio.run(run_protocol(cfg, spec))
    emit(result)
    sys.exit(1 if "error" in result else 0)
