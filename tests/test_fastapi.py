"""examples/fastapi_app.py: through FastAPI's TestClient, and as a real uvicorn server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    # starlette 1.x asks for the `httpx2` package; `httpx` (a dev dependency) still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from .helpers import free_port, uvicorn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def example(redis_url: str, namespace: str) -> Iterator[ModuleType]:
    """The example module, its App bound to the test server and namespace."""
    import examples.fastapi_app as mod

    saved = mod.tasks.settings
    mod.tasks.configure(redis_url=redis_url, namespace=namespace)
    yield mod
    mod.tasks.settings = saved


def poll_until_final(get: Any, task_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = get(f"/tasks/{task_id}").json()
        if body["state"] in ("SUCCESS", "FAILURE", "REVOKED") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_through_test_client(example: ModuleType) -> None:
    with TestClient(example.app) as client:
        r = client.post("/add", params={"x": 2, "y": 3})
        assert r.status_code == 202
        task_id = r.json()["id"]
        assert poll_until_final(client.get, task_id) == {
            "id": task_id,
            "state": "SUCCESS",
            "result": 5,
        }
        # Several at once, on the embedded worker's 10 slots.
        ids = [client.post("/add", params={"x": i, "y": i}).json()["id"] for i in range(20)]
        assert [poll_until_final(client.get, i)["result"] for i in ids] == [
            2 * i for i in range(20)
        ]
        assert client.get("/tasks/never-sent").json() == {"id": "never-sent", "state": "PENDING"}
        assert client.post("/add", params={"x": "two", "y": 3}).status_code == 422


def test_under_uvicorn(redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "AIOTASKS_NAMESPACE": namespace, "AIOTASKS_REDIS_URL": redis_url},
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def output() -> str:
        log.flush()
        return (tmp_path / "uvicorn.log").read_text(errors="replace")

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = client.post("/add", params={"x": 20, "y": 22})
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, output()
                    assert time.monotonic() < deadline, output()
                    time.sleep(0.1)
            assert r.status_code == 202, r.text
            task_id = r.json()["id"]
            body = poll_until_final(client.get, task_id)
            assert body == {"id": task_id, "state": "SUCCESS", "result": 42}, output()
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once shut down, so -SIGTERM is a clean exit too.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM), output()
        assert "Application shutdown complete." in output()  # the embedded worker stopped
        assert "Traceback" not in output()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


FAILING_APP = """
import os
from fastapi import FastAPI
from aiotasks import App

tasks = App(namespace=os.environ["NAMESPACE"])

@tasks.task(name="boom")
async def boom() -> None:
    raise ValueError("kaput")

app = FastAPI(lifespan=tasks.lifespan(worker=True))

@app.post("/boom")
async def post_boom() -> dict[str, str]:
    return {"id": (await boom.send()).id}

@app.get("/tasks/{task_id}")
async def get_task(task_id: str) -> dict[str, object]:
    return {"state": (await tasks.handle(task_id).info()).state}
"""


def test_a_failing_task_logs_its_traceback_in_uvicorns_console(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "boomapp.py").write_text(FAILING_APP)
    env = {**os.environ, "AIOTASKS_REDIS_URL": redis_url, "NAMESPACE": namespace}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    argv = ["boomapp:app", "--port", str(free_port())]
    with uvicorn(argv, tmp_path, env, tmp_path / "uvicorn.log") as served:
        task_id = served.client.post("/boom").json()["id"]
        assert served.poll_until_final(f"/tasks/{task_id}") == {"state": "FAILURE"}
        output = served.wait_for_output('raise ValueError("kaput")')
        assert served.stop() in (0, -signal.SIGTERM), output
    line = next(x for x in output.splitlines() if f"boom[{task_id}] FAILURE" in x)
    assert "ERROR" in line and "aiotasks.worker" in line
    tail = output[output.index(line) :]
    assert "ValueError: kaput" in tail and "Traceback (most recent call last)" in tail
