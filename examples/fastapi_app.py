"""A FastAPI app that sends tasks and runs them on an embedded worker.

Run it (Redis from $AIOTASKS_REDIS_URL, else localhost):

    uvicorn examples.fastapi_app:app --port 8000
    curl -X POST "localhost:8000/add?x=2&y=3"    # {"id": "..."}
    curl localhost:8000/tasks/<id>               # {"state": "SUCCESS", "result": 5, ...}

The worker runs inside the web process (`worker=True`); drop it to send only, and run
`aiotasks run examples.fastapi_app:tasks` elsewhere. The namespace comes from
$AIOTASKS_NAMESPACE (default "aiotasks-example"), so the tests can isolate it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI

from aiotasks import App, TaskState

tasks = App(namespace=os.environ.get("AIOTASKS_NAMESPACE", "aiotasks-example"))


@tasks.task(name="example.add")
async def add(x: int, y: int) -> int:
    await asyncio.sleep(0.1)  # pretend to work
    return x + y


app = FastAPI(lifespan=tasks.lifespan(worker=True, concurrency=10))


@app.post("/add", status_code=202)
async def send_add(x: int, y: int) -> dict[str, str]:
    """Enqueue add(x, y) and return the task id at once."""
    handle = await add.send(x, y)
    return {"id": handle.id}


@app.get("/tasks/{task_id}")
async def task_status(task_id: str) -> dict[str, Any]:
    """The task's state, and its result or error once it has finished."""
    info = await tasks.handle(task_id).info()
    body: dict[str, Any] = {"id": task_id, "state": info.state}
    if info.state == TaskState.SUCCESS:
        body["result"] = info.result
    elif info.state == TaskState.FAILURE:
        body["error"] = f"{info.exc_type}: {info.exc_message}"
    return body


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
