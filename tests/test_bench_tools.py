"""The benchmark tools still run against today's scripts and API (they are not in the
suite otherwise, and would rot silently)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_script_cost_reports_every_phase_of_both_scenarios() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "script_cost.py"), "--tasks", "300"]
        + ["--batch", "16", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["scenario"].endswith("on"), r["phase"]) for r in rows] == [
        (on, phase) for on in (True, False) for phase in ("enqueue", "fetch", "finish")
    ]
    assert all(r["evalsha_us_per_task"] > 0 and r["cpu_us_per_task"] > 0 for r in rows)
    assert "| index and events on | finish |" in proc.stdout


@pytest.mark.skipif(
    not (shutil.which("valgrind") and shutil.which("redis-server")),
    reason="needs valgrind and redis-server",
)
def test_script_cost_counts_redis_instructions_under_callgrind() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "script_cost.py"), "--callgrind"]
        + ["--tasks", "200", "--batch", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["scenario"].endswith("on"), r["phase"]) for r in rows] == [
        (on, phase) for on in (True, False) for phase in ("enqueue", "fetch", "finish")
    ]
    # Tens of thousands of instructions a task, not a dump taken at the wrong time.
    assert all(10 < r["kinstr_per_task"] < 2000 for r in rows), rows
