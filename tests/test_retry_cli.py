"""`aiotasks retry TASK_ID`: a failed, dead-lettered or revoked task sent again, under its
id, with its arguments, against a real in-process worker; and one `error:` line when it
cannot be."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aiotasks import App, TaskFailed, TaskRevoked, TaskState, Worker, chain
from aiotasks.cli import cli

StartWorker = Callable[..., Awaitable[Worker]]
runner = CliRunner()


async def retry(app: App, task_id: str) -> Result:
    """Run `aiotasks retry` in a thread (it runs its own event loop) while our worker runs."""
    argv = ["retry", task_id, "--redis-url", app.settings.redis_url]
    argv += ["--namespace", app.settings.namespace]
    return await asyncio.to_thread(runner.invoke, cli, argv, catch_exceptions=False)


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.exit_code == 1, result.output
    return lines[0]


async def test_a_failed_task_runs_again_with_its_arguments(app: App, worker: StartWorker) -> None:
    calls: list[tuple[Any, ...]] = []

    @app.task(soft_timeout=30)
    async def flaky(a: int, b: list[str], *, c: dict[str, int]) -> str:
        calls.append((a, b, c))
        if len(calls) == 1:
            raise ConnectionError("the first run fails")
        return f"{a}-{b[0]}-{c['k']}"

    await worker()
    h = await flaky.options(priority=8).send(7, ["x"], c={"k": 3})
    with pytest.raises(TaskFailed):
        await h.result(timeout=10)

    result = await retry(app, h.id)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"retried task {h.id}: sent again to queue 'default' with its arguments"
    )
    assert await h.result(timeout=10) == "7-x-3"
    assert calls == [(7, ["x"], {"k": 3})] * 2
    info = await h.info()
    assert info.state == TaskState.SUCCESS and info.exc_type is None  # a clean record


async def test_a_dead_lettered_task_goes_back_from_its_dead_letter(
    app: App, worker: StartWorker
) -> None:
    await worker()
    h = await app.send_task("tests.retry.late", args=(2,), kwargs={"y": 5})
    with pytest.raises(TaskFailed) as err:
        await h.result(timeout=10)
    assert err.value.exc_type == "UnknownTask"

    @app.task(name="tests.retry.late")  # deployed since: the worker knows it now
    async def late(x: int, y: int) -> int:
        return x * y

    result = await retry(app, h.id)
    assert result.exit_code == 0, result.output
    assert "from its dead letter" in result.stdout
    assert await h.result(timeout=10) == 10
    assert await app.client.redis.xlen(app.client.keys.dead("default")) == 0


@pytest.mark.parametrize("when", ["scheduled", "queued"])
async def test_a_revoked_task_runs_when_retried(app: App, worker: StartWorker, when: str) -> None:
    @app.task
    async def echo(v: str) -> str:
        return v

    options: dict[str, Any] = {"countdown": 60} if when == "scheduled" else {"queue": "idle"}
    h = await echo.options(**options).send("hello")
    await h.revoke()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=5)

    await worker(queues=["default", "idle"])
    result = await retry(app, h.id)
    assert result.exit_code == 0, result.output
    assert await h.result(timeout=10) == "hello"  # at once: the countdown is not repeated


async def test_what_cannot_be_retried_says_why(app: App, worker: StartWorker) -> None:
    @app.task
    async def ok(x: int) -> int:
        return x

    @app.task
    async def boom(x: int) -> int:
        raise ValueError(x)

    await worker()
    done = await ok.send(1)
    await done.result(timeout=10)
    assert error_line(await retry(app, done.id)) == (
        f"error: task {done.id} is SUCCESS: only a FAILURE or REVOKED task can be retried"
    )
    assert "no task with id 'nope'" in error_line(await retry(app, "nope"))

    # The step after a failed one never ran: no arguments were ever kept for it.
    last = await chain(boom.s(1), ok.s()).send()
    with pytest.raises(TaskFailed):
        await app.handle(last.id).result(timeout=10)
    line = error_line(await retry(app, last.id))
    assert line.startswith(f"error: the arguments of task {last.id} (FAILURE) are no longer known")
