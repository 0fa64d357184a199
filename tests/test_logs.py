"""Worker logs: visible in an embedded worker, and structured for `--log-format json`."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from aiotasks import App, TaskFailed, logs
from aiotasks.execution import Execution


def test_visible_errors_adds_a_stderr_handler_only_when_nothing_shows_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as under uvicorn: root is not configured
    logger = logging.getLogger("aiotasks")
    before = list(logger.handlers)
    with logs.visible_errors():
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1
        assert isinstance(added[0], logging.StreamHandler) and added[0].stream is sys.stderr
        assert added[0].level == logging.WARNING
        with logs.visible_errors():  # a second embedded worker shares it
            assert [h for h in logger.handlers if h not in before] == added
        assert [h for h in logger.handlers if h not in before] == added  # the first still runs
    assert logger.handlers == before  # removed with the last embedded worker

    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(io.StringIO())])
    with logs.visible_errors():
        assert logger.handlers == before  # the host's own handler shows them already


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The aiotasks logger at INFO, written as `--log-format json` writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("aiotasks")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


TASK_FIELDS = {"task_id", "task_name", "state", "duration", "attempt", "queue", "worker"}


async def test_json_task_records_carry_structured_fields(
    app: App, worker: Any, json_log: io.StringIO
) -> None:
    calls: list[int] = []

    @app.task(name="ok")
    async def ok() -> int:
        return 1

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("kaput")

    @app.task(name="flaky", max_retries=3, autoretry_for=(ConnectionError,))
    async def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("refused")
        return "done"

    w = await worker()
    h_ok, h_flaky = await ok.send(), await flaky.send()
    h_boom, h_dead = await boom.send(), await app.send_task("nobody.knows")
    assert await h_ok.result(timeout=10) == 1 and await h_flaky.result(timeout=10) == "done"
    for h in (h_boom, h_dead):
        with pytest.raises(TaskFailed):
            await h.result(timeout=10)

    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert records and all(isinstance(r, dict) for r in records)  # one object per line
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r.get("task_id"), []).append(r)
    for h in (h_ok, h_flaky, h_boom, h_dead):
        for r in by_task[h.id]:
            assert TASK_FIELDS <= r.keys(), r
            assert r["worker"] == w.name and r["queue"] == "default" and r["duration"] >= 0

    (success,) = by_task[h_ok.id]
    assert success["task_name"] == "ok" and success["state"] == "SUCCESS"
    assert success["attempt"] == 1 and success["message"] == f"ok[{h_ok.id}] SUCCESS in " + (
        f"{success['duration']:.3f}s"
    )
    retry, done = by_task[h_flaky.id]
    assert (retry["state"], retry["attempt"], retry["exc_type"]) == ("RETRY", 1, "ConnectionError")
    assert retry["retry_in"] >= 0 and retry["level"] == "INFO"
    assert re.fullmatch(
        rf"flaky\[{h_flaky.id}\] RETRY: attempt 1 of 4 failed after \d+\.\d{{3}}s "
        r"\(ConnectionError: refused\); next attempt in \d+\.\ds",
        retry["message"],
    ), retry["message"]
    assert (done["state"], done["attempt"]) == ("SUCCESS", 2)
    (failed,) = by_task[h_boom.id]
    assert (failed["state"], failed["exc_type"], failed["level"]) == (
        "FAILURE",
        "ValueError",
        "ERROR",
    )
    assert 'raise ValueError("kaput")' in failed["message"]
    (dead,) = by_task[h_dead.id]
    assert (dead["state"], dead["exc_type"]) == ("DEAD", "UnknownTask")
    assert dead["task_name"] == "nobody.knows" and re.fullmatch(r"\d+-\d+", dead["entry_id"])


@pytest.fixture
def default_level() -> Iterator[None]:
    """The aiotasks logger at WARNING, the CLI's default level."""
    logger = logging.getLogger("aiotasks")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(previous)


@pytest.mark.usefixtures("default_level")
async def test_task_records_are_not_built_below_their_level(
    app: App, worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    original = Execution.log_fields

    def counting(self: Execution) -> dict[str, Any]:
        built.append(1)
        return original(self)

    monkeypatch.setattr(Execution, "log_fields", counting)

    @app.task(name="ok")
    async def ok() -> int:
        return 1

    await worker()
    handles = await ok.send_many([((), None)] * 20)
    assert [await h.result(timeout=10) for h in handles] == [1] * 20
    assert built == []


EMBEDDED = """
import asyncio, sys
from aiotasks import App

app = App(redis_url=sys.argv[1], namespace=sys.argv[2])

@app.task(max_retries=0)
async def boom() -> None:
    raise TypeError("embedded failure")

async def main() -> None:
    await boom.send()
    await app.worker(burst=True).run()
    await app.close()

asyncio.run(main())
"""


def test_a_worker_run_from_python_shows_a_failing_task_without_logging_configured(
    redis_url: str, namespace: str
) -> None:
    """No logging.basicConfig, no lifespan: the package's NullHandler would hide the
    failure, so run() itself adds the stderr fallback while it runs."""
    proc = subprocess.run(
        [sys.executable, "-c", EMBEDDED, redis_url, namespace],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TypeError: embedded failure" in proc.stderr, proc.stderr
    assert re.search(r"ERROR .*boom", proc.stderr), proc.stderr
