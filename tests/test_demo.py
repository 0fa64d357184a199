"""`make demo` (examples/demo.py) runs, and leaves nothing behind when it says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_deletes_its_namespace(redis_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "examples/demo.py"],
        cwd=ROOT,
        env={**os.environ, "AIOTASKS_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "add(2, 3)                  -> 5" in proc.stdout
    match = re.search(r"worker stopped \(exit 0\); demo namespace (\S+) deleted$", proc.stdout)
    assert match, proc.stdout
    with redis.Redis.from_url(redis_url) as r:
        assert list(r.scan_iter(match="{" + match.group(1) + "}*")) == []
