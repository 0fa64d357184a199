"""The benchmark tools still run against today's scripts and API (they are not in the
suite otherwise, and would rot silently)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script_cost(*args: str, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run benchmarks/script_cost.py: its JSON rows (checked to cover every phase of both
    scenarios) and its output."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "script_cost.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["scenario"].endswith("on"), r["phase"]) for r in rows] == [
        (on, phase) for on in (True, False) for phase in ("enqueue", "fetch", "finish", "idle")
    ]
    return rows, proc.stdout


def test_script_cost_reports_every_phase_of_both_scenarios() -> None:
    rows, out = script_cost("--tasks", "300", "--batch", "16", "--reps", "1", timeout=120)
    assert all(r["call_us_per_task"] > 0 and r["cpu_us_per_task"] > 0 for r in rows)
    assert "| index and events on | finish |" in out


@pytest.mark.timeout(600)  # Redis under valgrind: past the suite's 60 s on a busy machine
@pytest.mark.skipif(
    not (shutil.which("valgrind") and shutil.which("redis-server")),
    reason="needs valgrind and redis-server",
)
def test_script_cost_counts_redis_instructions_under_callgrind() -> None:
    rows, _ = script_cost("--callgrind", "--tasks", "200", "--batch", "16", timeout=300)
    # Tens of thousands of instructions a task, not a dump taken at the wrong time.
    assert all(10 < r["kinstr_per_task"] < 2000 for r in rows if r["phase"] != "idle"), rows
    # A task served alone pays each script's fixed cost: several batched tasks' worth.
    for on in ("on", "off"):
        phases = {r["phase"]: r["kinstr_per_task"] for r in rows if r["scenario"].endswith(on)}
        batched = phases["enqueue"] + phases["fetch"] + phases["finish"]
        assert batched < phases["idle"] < 20 * batched, rows


@pytest.mark.timeout(600)  # a worker under valgrind: past the suite's 60 s on a busy machine
@pytest.mark.skipif(not shutil.which("valgrind"), reason="needs valgrind")
def test_worker_cost_counts_the_workers_instructions_per_task() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "worker_cost.py"), "--tasks", "50", "250"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row["tasks"] == 200 and row["python"] == ".".join(map(str, sys.version_info[:3]))
    # Tens to hundreds of thousands of instructions a task: the difference of two real
    # runs, not a start-up cost or a run that failed to drain its queue.
    assert 20 < row["kinstr_per_task"] < 2000, row


@pytest.mark.timeout(600)  # a worker under valgrind: past the suite's 60 s on a busy machine
@pytest.mark.skipif(not shutil.which("valgrind"), reason="needs valgrind")
def test_worker_cost_alone_counts_a_task_served_alone() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "worker_cost.py"), "--alone"]
        + ["--tasks", "10", "30"],
        capture_output=True,
        text=True,
        timeout=900,  # beyond the script's own limits: it stops its worker itself
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sent one at a time" in proc.stdout
    row = json.loads(proc.stdout.splitlines()[-1])
    assert row["tasks"] == 20 and row["alone"] is True
    # A lone task pays a wake and a finish of its own: several batched tasks' worth.
    assert 200 < row["kinstr_per_task"] < 20000, row
