"""The no-op app that benchmarks/aiotasks_extras.py runs in N worker processes.

Each process counts its tasks in memory and writes {count, t_first, t_last} (monotonic,
shared by all processes on Linux) to $SCALE_PROBE_DIR/<pid>.json when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

from aiotasks import App

_index = 0 if os.environ.get("SCALE_INDEX") == "0" else 10_000
app = App(
    namespace=os.environ.get("SCALE_NAMESPACE", "aiotasks-scale"),
    signing_key=os.environ.get("SCALE_SIGNING_KEY") or None,
    index_size=_index,
    events_size=_index // 10,
    tracing=os.environ.get("SCALE_TRACING") == "1",
)
_state = {"count": 0, "t_first": 0.0, "t_last": 0.0}

if os.environ.get("SCALE_FLOW") == "1":
    # Flow control in use by other tasks of the app (never sent here): the no-op tasks,
    # which have no limit, must not pay for it.

    @app.task(name="limited", concurrency_limit=2, concurrency_key="customer")
    async def limited(customer: str) -> None:
        return None

    @app.task(name="rated", rate_limit="100/s", rate_key="customer")
    async def rated(customer: str) -> None:
        return None

    @app.task(name="debounced", debounce=1, debounce_key="doc")
    async def debounced(doc: str) -> None:
        return None


@app.task(name="noop")
async def noop() -> None:
    now = time.monotonic()
    if not _state["count"]:
        _state["t_first"] = now
    _state["count"] += 1
    _state["t_last"] = now


@atexit.register
def _report() -> None:
    folder = os.environ.get("SCALE_PROBE_DIR")
    if folder:
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(_state))
