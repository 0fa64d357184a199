"""The dashboard mounted in a FastAPI app behind HTTP basic auth, with tasks to watch.

Run it (Redis from $AIOTASKS_REDIS_URL, else localhost):

    uvicorn examples.dashboard_app:api --port 8000
    open http://ops:secret@localhost:8000/ops/tasks/     # or log in when asked
    curl -X POST "localhost:8000/work?n=20"              # 20 tasks to watch, a few fail

The worker runs inside the web process; the dashboard is at /ops/tasks/, only for
whoever knows the password ($DASHBOARD_PASSWORD, default "secret").
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import secrets
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from aiotasks import App, current_task

tasks = App(namespace=os.environ.get("AIOTASKS_NAMESPACE", "aiotasks-example"))
PASSWORD = os.environ.get("DASHBOARD_PASSWORD", "secret")
EXPECTED = "Basic " + base64.b64encode(f"ops:{PASSWORD}".encode()).decode()


@tasks.task(name="example.crunch", max_retries=1, autoretry_for=(ConnectionError,))
async def crunch(n: int) -> int:
    ctx = current_task()
    for step in range(5):
        await ctx.progress(done=step, total=5)
        await asyncio.sleep(random.uniform(0.1, 0.6))
    if n % 7 == 3:
        raise ValueError(f"cannot crunch {n}")
    return n * n


api = FastAPI(lifespan=tasks.lifespan(worker=True, concurrency=4))


@api.middleware("http")
async def operators_only(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    auth = request.headers.get("authorization", "")
    if request.url.path.startswith("/ops/") and not secrets.compare_digest(auth, EXPECTED):
        return Response(status_code=401, headers={"WWW-Authenticate": 'Basic realm="ops"'})
    return await call_next(request)


@api.post("/work")
async def work(n: int = 10) -> dict[str, list[str]]:
    handles = await crunch.send_many([((i,), None) for i in range(n)])
    return {"ids": [h.id for h in handles]}


api.mount("/ops/tasks", tasks.dashboard())
