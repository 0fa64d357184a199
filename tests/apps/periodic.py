"""An App with one periodic task, for the multi-worker periodic tests (tests/test_periodic.py).

`beat` runs every second; each run INCRs `{ns}:test:beats` and appends
"<tick_ms> <start_ms>" to `{ns}:test:beat-log`, the tick read from its task id
(`periodic:<name>:<tick_ms>`), so a test can check each tick ran once and measure jitter.
"""

from __future__ import annotations

import os
import time

from aiotasks import App, current_task

app = App(namespace=os.environ.get("AIOTASKS_TEST_NAMESPACE", "aiotasks-test"))

# Key suffixes under the namespace prefix, shared with the tests that read them.
COUNTER = "test:beats"
LOG = "test:beat-log"


@app.periodic(every=1, name="beat")
@app.task
async def beat() -> None:
    ctx = current_task()
    started_ms = int(time.time() * 1000)
    tick_ms = ctx.id.rsplit(":", 1)[1]
    prefix = ctx.app.client.keys.prefix
    async with ctx.app.client.redis.pipeline(transaction=True) as pipe:
        pipe.incr(prefix + COUNTER)
        pipe.rpush(prefix + LOG, f"{tick_ms} {started_ms}")
        await pipe.execute()
