"""`make bench`: every scenario, aiotasks beside the peers, one Markdown table + JSON lines.

    python benchmarks/run.py [--redis-url URL] [--tasks 20000] [--concurrency 32]
                             [--peers arq,saq,...] [--peers-python PATH]
                             [--docket-python PATH] [--skip-peers]

The Redis URL defaults to $AIOTASKS_REDIS_URL (make bench sets it; see the Makefile).
Peers run with --peers-python (default: .venv-peers/bin/python when it exists, else
this interpreter); a peer that is not installed there is reported as skipped.
pydocket needs redis-py >= 6 and runs with --docket-python (default:
.venv-docket/bin/python when it exists, else it is skipped with the reason).
The protocol is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = ["dramatiq", "celery", "taskiq", "saq", "streaq", "arq", "docket"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_script(python: str, script: Path, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark script; its last stdout line is its JSON result."""
    if not Path(python).exists():  # e.g. a peer venv that `make bench` could not install
        library = script.stem.removesuffix("_bench")
        return {"library": library, "skipped": f"no interpreter at {python}"}
    log(f"{script.name} {' '.join(args)}")
    try:
        proc = subprocess.run(
            [python, str(script), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except subprocess.TimeoutExpired:
        return {"library": script.stem.removesuffix("_bench"), "error": f"timeout {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = proc.stderr[-2000:]
        return {"library": script.stem.removesuffix("_bench"), "error": f"no output: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        text = f"{value:,.{digits}f}"
        return f"{text} {unit}".strip()
    return str(value)


def library_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| library | enqueue tasks/s | worker no-op tasks/s | send -> result p50 | p99 "
        "| worker RSS | worker CPU per task | Redis CPU per task |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['library']} | skipped: {r['skipped']} | | | | | | |")
            continue
        if "error" in r and r.get("worker_per_s") is None:
            out.append(f"| {r['library']} | error: {str(r['error'])[:60]} | | | | | | |")
            continue
        name = f"{r['library']} {r.get('version', '')}".strip()
        out.append(
            f"| {name} | {fmt(r.get('enqueue_per_s'))} | {fmt(r.get('worker_per_s'))} "
            f"| {fmt(r.get('p50_ms'), 'ms', 2)} | {fmt(r.get('p99_ms'), 'ms', 2)} "
            f"| {fmt(r.get('rss_mb'), 'MB', 1)} "
            f"| {fmt(r.get('worker_cpu_us_per_task'), 'µs')} "
            f"| {fmt(r.get('redis_cpu_us_per_task'), 'µs')} |"
        )
    return "\n".join(out)


def peers_python(explicit: str | None) -> str:
    if explicit:
        return os.path.abspath(explicit)  # not resolve(): a venv's python is a symlink
    candidate = ROOT / ".venv-peers" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def docket_python(explicit: str | None) -> str:
    """pydocket's own venv: it needs redis-py >= 6, .venv-peers has 5 (for arq)."""
    if explicit:
        return os.path.abspath(explicit)
    return str(ROOT / ".venv-docket" / "bin" / "python")  # skipped when missing


async def extras(url: str, tasks: int, concurrency: int) -> list[dict[str, Any]]:
    """aiotasks-only scenarios: scaling, feature costs, a cluster, Redis memory per task."""
    from aiotasks_extras import run_extras

    return await run_extras(url, tasks, concurrency)


def send_rows(url: str) -> list[dict[str, Any]]:
    """The send scenarios on asyncio's own loop, then on uvloop (the loop a uvicorn app or
    `aiotasks run` uses when it is installed), back to back so that the two compare."""
    from aiotasks_extras import send_scenarios

    rows: list[dict[str, Any]] = asyncio.run(send_scenarios(url))
    try:
        import uvloop
    except ImportError:
        log("uvloop is not installed: the send scenarios ran on asyncio only")
        return rows
    on_uvloop: list[dict[str, Any]] = uvloop.run(send_scenarios(url))
    return rows + on_uvloop


sys.path.insert(0, str(HERE))  # aiotasks_extras, beside this file


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--redis-url", default=os.environ.get("AIOTASKS_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--peers-python", default=None)
    p.add_argument("--docket-python", default=None, help="pydocket's venv (redis-py >= 6)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-extras", action="store_true")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    a = p.parse_args()

    common = [
        "--redis-url",
        a.redis_url,
        "--tasks",
        str(a.tasks),
        "--concurrency",
        str(a.concurrency),
        "--latency-samples",
        str(a.latency_samples),
    ]
    started = time.monotonic()
    rows = [run_script(sys.executable, HERE / "peers" / "aiotasks_bench.py", common, 600)]
    if not a.skip_peers:
        python = peers_python(a.peers_python)
        pythons = {"docket": docket_python(a.docket_python)}
        log(f"peers with {python}; docket with {pythons['docket']}")
        for peer in [x.strip() for x in a.peers.split(",") if x.strip()]:
            rows.append(
                run_script(
                    pythons.get(peer, python),
                    HERE / "peers" / f"{peer}_bench.py",
                    [*common, "--timeout", "400"],
                    600,
                )
            )
    extra_rows: list[dict[str, Any]] = []
    if not a.skip_extras:
        extra_rows = send_rows(a.redis_url)
        extra_rows += asyncio.run(extras(a.redis_url, a.tasks, a.concurrency))
        chord = HERE / "chord_bench.py"
        if chord.exists():
            extra_rows.append(
                run_script(
                    sys.executable, chord, ["--redis-url", a.redis_url, "--headers", "10000"], 600
                )
            )
        # About 15 s: one notifier hearing 1,000,000 results, its RSS before and after.
        rss = HERE / "notifier_rss.py"
        extra_rows.append(run_script(sys.executable, rss, ["--redis-url", a.redis_url], 300))

    print(
        f"\naiotasks ran on Python {platform.python_version()} ({sys.executable}); "
        "another interpreter: make bench PY=/path/to/python3.13 VENV=.venv-3.13"
    )
    print(f"\n## One worker process, concurrency {a.concurrency}, {a.tasks:,} no-op tasks\n")
    print(library_table(rows))
    best_peer = max((r.get("worker_per_s") or 0 for r in rows[1:]), default=0)
    ours = rows[0].get("worker_per_s") or 0
    if best_peer:
        print(f"\naiotasks worker throughput: {ours / best_peer:.1f}x the best peer in this run")
    if extra_rows:
        print("\n## aiotasks scenarios\n")
        print("| scenario | result |")
        print("|---|---|")
        for r in extra_rows:
            print(f"| {r.get('scenario', r.get('library'))} | {r.get('summary', json.dumps(r))} |")
    print(f"\n(took {time.monotonic() - started:.0f} s)\n\nJSON lines:")
    lines = [json.dumps(r) for r in [*rows, *extra_rows]]
    print("\n".join(lines))
    if a.json_out:
        Path(a.json_out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
