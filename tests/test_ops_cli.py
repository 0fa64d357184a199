"""The operations CLI: status, inspect, revoke, purge, send and dead-letters, end to end.

Most commands run through typer's CliRunner in a thread (each command runs its own event
loop) while the test's loop runs a real in-process worker; the rest run as real
`python -m aiotasks` processes (the entry point, --app, a terminal for confirmations).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aiotasks import App, TaskFailed, TaskRevoked, TaskState
from aiotasks.cli import cli

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


async def invoke(*args: str) -> Result:
    """Run one CLI command in a thread (it calls asyncio.run itself)."""
    return await asyncio.to_thread(
        runner.invoke, cli, list(args), env={"COLUMNS": "200"}, catch_exceptions=False
    )


def conn(app: App) -> list[str]:
    return ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    return lines[0]


def unanswered(result: Result, question: str) -> None:
    """The question was asked on stderr, nobody answered (empty stdin): one error line."""
    prompt, error = result.stderr.splitlines()
    assert prompt == f"{question} [y/N]: ", result.stderr
    assert error == (
        "error: no answer to the confirmation (standard input ended): pass --yes to skip it"
    )
    assert result.exit_code == 1


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


async def wait_state(app: App, task_id: str, state: TaskState, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await app.handle(task_id).state() != state:
            await asyncio.sleep(0.02)


# -- status --------------------------------------------------------------------------------


async def test_status_json_and_table(app: App, worker: Any) -> None:
    w = await worker(queues=["busy"])
    for i in range(3):
        await app.send_task("nobody.runs.this", args=[i], queue="q1")
    await app.send_task("nobody.runs.this", queue="q1", countdown=60)

    res = await invoke("status", "--json", *conn(app))
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st["namespace"] == app.settings.namespace
    q1 = {q["name"]: q for q in st["queues"]}["q1"]
    assert q1 | {"name": "q1"} == {
        "name": "q1",
        "length": 3,
        "waiting": 3,
        "in_flight": 0,
        "scheduled": 1,
        "dead_letters": 0,
        "consumers": 0,
        "workers": 0,
        "paused": False,
    }
    assert st["scheduled_total"] == 1
    (me,) = [x for x in st["workers"] if x["name"] == w.name]
    assert me["queues"] == ["busy"] and me["pid"] == os.getpid() and me["last_beat"]
    # A queue a live worker serves is shown though nothing was ever sent to it.
    assert "busy" in {q["name"] for q in st["queues"]}

    # So is a queue paused before its first task.
    await app.queues.pause("mail")
    res = await invoke("status", "--json", *conn(app))
    mail = {q["name"]: q for q in json.loads(res.stdout)["queues"]}["mail"]
    assert (mail["paused"], mail["length"], mail["workers"]) == (True, 0, 0)
    res = await invoke("purge", "mail", *conn(app))  # shown, so known to purge too
    assert res.exit_code == 0, res.output
    assert "nothing to purge" in res.stdout

    # --queue shows a queue nothing was ever sent to; its worker counts.
    res = await invoke("status", "--json", "--queue", "busy", *conn(app))
    busy = {q["name"]: q for q in json.loads(res.stdout)["queues"]}["busy"]
    # Whether a worker that has read nothing yet counts as a consumer differs between
    # servers (Redis 7.0 creates it on its first read, Valkey 9 on its first entry).
    assert busy["workers"] == 1 and busy["consumers"] in (0, 1)

    res = await invoke("status", *conn(app))
    assert res.exit_code == 0
    assert "q1" in res.stdout and w.name in res.stdout and "Workers (1 alive)" in res.stdout


async def test_status_counts_in_flight_and_dead_letters(app: App, worker: Any) -> None:
    gate = asyncio.Event()

    @app.task(name="gated")
    async def gated() -> str:
        await gate.wait()
        return "ok"

    await worker(concurrency=1)
    running = await app.send_task("gated")
    await wait_state(app, running.id, TaskState.STARTED)
    await app.send_task("gated")
    dead = await app.send_task("unknown.task")  # runs after the slot frees: set the gate
    res = await invoke("status", "--json", *conn(app))
    default = {q["name"]: q for q in json.loads(res.stdout)["queues"]}["default"]
    assert (default["in_flight"], default["waiting"]) == (1, 2)
    assert default["consumers"] == 1 and default["workers"] == 1
    gate.set()
    with pytest.raises(TaskFailed):
        await dead.result(timeout=10)
    res = await invoke("status", "--json", *conn(app))
    default = {q["name"]: q for q in json.loads(res.stdout)["queues"]}["default"]
    assert (default["in_flight"], default["waiting"], default["dead_letters"]) == (0, 0, 1)


async def test_status_watch_refreshes_until_ctrl_c(app: App) -> None:
    await app.send_task("x", queue="watched")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiotasks", "status", "--watch", "--interval", "0.2", *conn(app)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await asyncio.sleep(1.5)  # a few refreshes
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "watched" in out and "Traceback" not in err


async def test_status_bad_arguments(app: App) -> None:
    res = await invoke("status", "--watch", "--json", *conn(app))
    assert res.exit_code == 2
    assert error_line(res) == "error: --watch and --json do not go together"


async def test_unreachable_redis_is_one_error_line() -> None:
    for args in (["status"], ["inspect", "abc"], ["send", "x"], ["purge", "q", "--yes"]):
        res = await invoke(*args, "--redis-url", "redis://127.0.0.1:1/0")
        assert res.exit_code == 1, (args, res.output)
        assert error_line(res).startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")


# -- inspect / revoke ----------------------------------------------------------------------


async def test_inspect(app: App, worker: Any) -> None:
    @app.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("kaput")

    await worker()
    h = await add.send(2, 3)
    assert await h.result(timeout=10) == 5
    res = await invoke("inspect", h.id, "--json", *conn(app))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["id"] == h.id and info["name"] == "add" and info["state"] == "SUCCESS"
    assert info["result"] == 5 and info["attempts"] == 1 and info["queue"] == "default"
    assert info["finished_at"] >= info["started_at"] >= info["enqueued_at"]

    res = await invoke("inspect", h.id, *conn(app))
    assert res.exit_code == 0
    assert "SUCCESS" in res.stdout and "result" in res.stdout and "runtime" in res.stdout

    f = await boom.send()
    with pytest.raises(TaskFailed):
        await f.result(timeout=10)
    res = await invoke("inspect", f.id, *conn(app))
    assert "FAILURE" in res.stdout and "ValueError: kaput" in res.stdout
    assert "Traceback" in res.stdout and 'raise ValueError("kaput")' in res.stdout


def pairs(stdout: str) -> dict[str, str]:
    """`key  value` lines of inspect's plain output."""
    return dict(line.split(None, 1) for line in stdout.splitlines() if "  " in line)


async def test_inspect_shows_arguments_and_results_as_json(app: App, worker: Any) -> None:
    @app.task(name="echo")
    async def echo(*args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "when": datetime(2030, 1, 2, tzinfo=UTC), "tags": {"x"}}

    @app.task(name="boom")
    async def boom(x: int, y: int = 0) -> None:
        raise ValueError(x + y)

    scheduled = await echo.options(countdown=600).send("é", 2, flag=True)
    queued = await echo.options(queue="nobody").send([1, 2], key=None)
    dead = await app.send_task("nobody.knows", args=[3], kwargs={"k": "v"})
    revoked = await echo.options(countdown=600).send(4)
    await revoked.revoke()
    await worker()
    done = await echo.send("hi")
    failed = await boom.send(7, y=9)
    assert (await done.result(timeout=10))["args"] == ["hi"]
    for h in (dead, failed):
        with pytest.raises(TaskFailed):
            await h.result(timeout=10)

    expected = {
        scheduled.id: ('["é", 2]', '{"flag": true}'),
        queued.id: ("[[1, 2]]", '{"key": null}'),
        dead.id: ("[3]", '{"k": "v"}'),  # read back from its dead letter
        failed.id: ("[7]", '{"y": 9}'),  # the payload a failure keeps
        revoked.id: ("[4]", "{}"),  # and a revoke
    }
    for task_id, (args, kwargs) in expected.items():
        res = await invoke("inspect", task_id, *conn(app))
        assert res.exit_code == 0, res.output
        shown = pairs(res.stdout)
        assert (shown["args"], shown["kwargs"]) == (args, kwargs), res.stdout
        res = await invoke("inspect", task_id, "--json", *conn(app))
        info = json.loads(res.stdout)
        assert (info["args"], info["kwargs"]) == (json.loads(args), json.loads(kwargs))

    res = await invoke("inspect", done.id, *conn(app))
    shown = pairs(res.stdout)
    assert shown["result"] == (
        '{"args": ["hi"], "when": "2030-01-02T00:00:00+00:00", "tags": ["x"]}'
    )  # JSON, not Python's repr
    assert shown["args"].startswith("- (deleted with its message")  # no copy is kept
    info = json.loads((await invoke("inspect", done.id, "--json", *conn(app))).stdout)
    assert info["result"]["when"] == "2030-01-02T00:00:00+00:00" and info["args"] is None


async def test_inspect_unknown_task(app: App) -> None:
    for args in (["inspect", "nope"], ["inspect", "nope", "--json"], ["revoke", "nope"]):
        res = await invoke(*args, *conn(app))
        assert res.exit_code == 1
        hint = " (an id not sent yet: --ahead revokes it)" if args[0] == "revoke" else ""
        assert error_line(res) == (
            f"error: no task with id 'nope' in namespace '{app.settings.namespace}'{hint}"
        )
        assert res.stdout == ""
    # Refusing an unknown id did not create a record of it.
    assert await app.client.redis.exists(app.client.keys.task("nope")) == 0


async def test_revoke_ahead_an_id_not_sent_yet(app: App) -> None:
    """README: an id not sent yet can be revoked (a frozen signature's, a chain's last
    step); from the CLI with --ahead. When it is sent, it does not run."""
    res = await invoke("revoke", "later-1", "--ahead", *conn(app))
    assert res.exit_code == 0, res.output
    assert "revoked task later-1 ahead" in res.stdout
    handle = await app.send_task("never.runs", task_id="later-1")
    assert await handle.state() is TaskState.REVOKED
    # --ahead on a task that exists acts as a plain revoke.
    queued = await app.send_task("never.runs")
    res = await invoke("revoke", queued.id, "--ahead", *conn(app))
    assert res.exit_code == 0 and "was PENDING" in res.stdout


async def test_revoke_queued_then_again(app: App) -> None:
    h = await app.send_task("never.runs")
    res = await invoke("revoke", h.id, *conn(app))
    assert res.exit_code == 0
    assert res.stdout.strip() == f"revoked task {h.id} (was PENDING: it will not run)"
    assert await h.state() == TaskState.REVOKED
    res = await invoke("revoke", h.id, *conn(app))
    assert res.exit_code == 0
    assert "already finished (REVOKED)" in res.stdout


async def test_revoke_terminate_cancels_a_running_task(app: App, worker: Any) -> None:
    @app.task(name="forever")
    async def forever() -> None:
        await asyncio.sleep(3600)

    await worker()
    h = await forever.send()
    await wait_state(app, h.id, TaskState.STARTED)
    res = await invoke("revoke", h.id, "--terminate", *conn(app))
    assert res.exit_code == 0
    assert "was STARTED; its worker was told to cancel it" in res.stdout
    t0 = time.monotonic()
    with pytest.raises(TaskRevoked):
        await h.result(timeout=10)
    assert time.monotonic() - t0 < 5


# -- purge -----------------------------------------------------------------------------


async def test_purge_keeps_running_tasks_and_revokes_the_rest(app: App, worker: Any) -> None:
    gate = asyncio.Event()

    @app.task(name="gated", queue="work")
    async def gated(i: int) -> int:
        await gate.wait()
        return i

    await worker(queues=["work"], concurrency=1)
    running = await gated.send(0)
    await wait_state(app, running.id, TaskState.STARTED)
    waiting = [await gated.send(i) for i in range(1, 4)]
    later = await gated.options(countdown=60).send(9)
    elsewhere = await app.send_task("other", queue="other-queue", countdown=60)

    res = await invoke("purge", "work", "--yes", *conn(app))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "purged 4 task(s) from queue 'work'"
    for h in [*waiting, later]:
        with pytest.raises(TaskRevoked):
            await h.result(timeout=2)
    assert await app.handle(elsewhere.id).state() == TaskState.SCHEDULED
    gate.set()
    assert await running.result(timeout=10) == 0  # the running one was left alone
    res = await invoke("status", "--json", *conn(app))
    work = {q["name"]: q for q in json.loads(res.stdout)["queues"]}["work"]
    assert (work["length"], work["scheduled"]) == (0, 0)
    # The consumer group survives: new work still flows.
    assert await (await gated.send(7)).result(timeout=10) == 7


async def test_purge_refuses_without_confirmation_and_unknown_queue(app: App) -> None:
    h = await app.send_task("x", queue="keep")
    res = await invoke("purge", "keep", *conn(app))  # CliRunner's stdin is empty
    unanswered(res, "Delete 1 waiting and 0 scheduled task(s) of queue 'keep'?")
    assert await h.state() == TaskState.PENDING

    # Emptied, it has nothing to ask about.
    assert (await invoke("purge", "keep", "--yes", *conn(app))).exit_code == 0
    res = await invoke("purge", "keep", *conn(app))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "queue 'keep' has no waiting or scheduled task: nothing to purge"

    res = await invoke("purge", "no-such-queue", "--yes", *conn(app))
    assert res.exit_code == 1
    assert error_line(res) == (
        f"error: no queue named 'no-such-queue' in namespace '{app.settings.namespace}'"
    )


def _in_terminal(args: list[str], answer: str, timeout: float = 20) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, answer its prompt, return (exit code, output)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    answered = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if not answered and b"[y/N]" in out:
                os.write(leader, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=5), out.decode(errors="replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_purge_asks_in_a_terminal(app: App) -> None:
    hs = [await app.send_task("x", queue="asked") for _ in range(2)]
    code, out = await asyncio.to_thread(_in_terminal, ["purge", "asked", *conn(app)], "n")
    assert code == 1 and "Delete 2 waiting and 0 scheduled task(s) of queue 'asked'?" in out
    assert "aborted" in out
    assert [await h.state() for h in hs] == [TaskState.PENDING] * 2
    code, out = await asyncio.to_thread(_in_terminal, ["purge", "asked", *conn(app)], "y")
    assert code == 0 and "purged 2 task(s) from queue 'asked'" in out
    assert [await h.state() for h in hs] == [TaskState.REVOKED] * 2


# -- send ----------------------------------------------------------------------------------


async def test_send_and_wait(app: App, worker: Any) -> None:
    @app.task(name="add")
    async def add(x: int, y: int = 0) -> int:
        return x + y

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("kaput")

    await worker()
    res = await invoke(
        "send", "add", "--args", "[2]", "--kwargs", '{"y": 3}', "--wait", "--timeout", "10",
        *conn(app),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    task_id, result = res.stdout.splitlines()
    assert result == "5"
    assert await app.handle(task_id).result(timeout=1) == 5

    res = await invoke("send", "add", "--args", "[1, 1]", *conn(app))
    assert res.exit_code == 0
    (task_id,) = res.stdout.splitlines()
    assert await app.handle(task_id).result(timeout=10) == 2

    res = await invoke("send", "boom", "--wait", "--timeout", "10", *conn(app))
    assert res.exit_code == 1
    assert "failed: ValueError: kaput" in error_line(res)


async def test_send_to_a_queue_no_running_worker_reads_says_so(app: App, worker: Any) -> None:
    """A typo in --queue would leave the task waiting unseen: with workers running and
    none reading its queue, send says so on stderr (the task is sent all the same)."""
    await worker(queues=["default", "emails"])
    res = await invoke("send", "x", "--queue", "emial", *conn(app))
    assert res.exit_code == 0, res.output
    task_id = res.stdout.strip()
    assert (await app.handle(task_id).info()).queue == "emial"
    assert error_line(res) == (
        "warning: no running worker reads queue 'emial' (they read: default, emails); "
        "the task waits there until one does"
    )
    res = await invoke("send", "x", "--queue", "emails", *conn(app))
    assert res.exit_code == 0 and res.stderr == "", res.stderr


async def test_send_options(app: App) -> None:
    res = await invoke(
        "send", "later", "--queue", "q2", "--countdown", "30", "--priority", "9", *conn(app)
    )
    assert res.exit_code == 0, res.output
    info = await app.handle(res.stdout.strip()).info()
    assert (info.state, info.queue, info.name) == (TaskState.SCHEDULED, "q2", "later")

    res = await invoke("send", "x", "--wait", "--timeout", "0.3", *conn(app))
    assert res.exit_code == 1 and "did not finish within 0.3 s" in error_line(res)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--args", "[1,"], "error: --args is not valid JSON"),
        (["--args", '{"x": 1}'], "error: --args must be a JSON array"),
        (["--kwargs", "[1]"], "error: --kwargs must be a JSON object"),
        (["--kwargs", "nope"], "error: --kwargs is not valid JSON"),
    ],
)
async def test_send_malformed_json(app: App, args: list[str], message: str) -> None:
    res = await invoke("send", "x", *args, *conn(app))
    assert res.exit_code == 2
    assert error_line(res).startswith(message)
    assert await app.client.redis.exists(app.client.keys.queues) == 0  # nothing sent


async def test_app_option_and_entry_point(redis_url: str, namespace: str) -> None:
    env = {"AIOTASKS_TEST_NAMESPACE": namespace, "AIOTASKS_REDIS_URL": redis_url}
    sent = await asyncio.to_thread(
        run_cli, "send", "ops.add", "--args", "[1, 2]", "--app", "tests.apps.ops:app", env=env
    )
    assert sent.returncode == 0, sent.stderr
    st = await asyncio.to_thread(
        run_cli, "status", "--json", "--app", "tests.apps.ops:app", env=env
    )
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert data["namespace"] == namespace
    assert [(q["name"], q["length"]) for q in data["queues"]] == [("default", 1)]

    bad = await asyncio.to_thread(run_cli, "status", "--app", "tests.apps.nope:app", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot import module")
    assert "Traceback" not in bad.stderr


# -- dead letters --------------------------------------------------------------------------


async def test_dead_letters_round_trip(app: App, worker: Any) -> None:
    await worker()
    handles = [await app.send_task("not.yet", args=[i]) for i in range(3)]
    for h in handles:
        with pytest.raises(TaskFailed) as err:
            await h.result(timeout=10)
        assert err.value.exc_type == "UnknownTask"

    res = await invoke("dead-letters", "list", "default", "--json", *conn(app))
    assert res.exit_code == 0, res.output
    letters = json.loads(res.stdout)
    assert [d["task_id"] for d in letters] == [h.id for h in handles]
    assert all(d["task_name"] == "not.yet" for d in letters)
    assert all(d["reason"].startswith("UnknownTask: no task named 'not.yet'") for d in letters)
    assert all(d["stream"] == app.client.keys.stream("default") for d in letters)
    res = await invoke("dead-letters", "list", "default", *conn(app))
    assert "not.yet" in res.stdout and letters[0]["entry_id"] in res.stdout

    # Now a worker knows the task: requeue the first, drop the second.
    @app.task(name="not.yet")
    async def not_yet(i: int) -> int:
        return i * 10

    first, second, third = (d["entry_id"] for d in letters)
    res = await invoke("dead-letters", "requeue", "default", "--id", first, *conn(app))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "requeued 1 dead letter(s) of queue 'default'"
    assert await handles[0].result(timeout=10) == 0
    assert (await handles[0].info()).state == TaskState.SUCCESS

    res = await invoke("dead-letters", "drop", "default", "--id", second, *conn(app))
    assert res.exit_code == 0 and res.stdout.startswith("dropped 1 dead letter(s)")
    res = await invoke("dead-letters", "list", "default", "--json", *conn(app))
    assert [d["entry_id"] for d in json.loads(res.stdout)] == [third]

    # Requeue everything that is left (no --id).
    res = await invoke("dead-letters", "requeue", "default", "--yes", *conn(app))
    assert res.stdout.strip() == "requeued 1 dead letter(s) of queue 'default'"
    assert await handles[2].result(timeout=10) == 20
    res = await invoke("dead-letters", "list", "default", *conn(app))
    assert res.stdout.strip() == "no dead letters in queue 'default'"


async def test_dead_letters_drop_all_and_bad_arguments(app: App, worker: Any) -> None:
    await worker()
    for _ in range(2):
        with pytest.raises(TaskFailed):
            await (await app.send_task("never.known")).result(timeout=10)

    res = await invoke("dead-letters", "drop", "default", *conn(app))
    unanswered(res, "Delete every dead letter of queue 'default'?")
    res = await invoke("dead-letters", "requeue", "default", "--id", "1-0", *conn(app))
    assert res.exit_code == 1
    assert res.stdout.strip() == "requeued 0 dead letter(s) of queue 'default'"
    assert error_line(res) == (
        "error: 1 of the 1 given id(s) are not dead letters here, or hold no message to run"
    )
    res = await invoke("dead-letters", "drop", "default", "--id", "not-an-id", *conn(app))
    assert res.exit_code == 2 and "malformed entry id(s): not-an-id" in error_line(res)
    for sub in (["list"], ["requeue"], ["drop", "--yes"]):
        res = await invoke("dead-letters", *sub, "no-such-queue", *conn(app))
        assert res.exit_code == 1, (sub, res.output)
        assert error_line(res).startswith("error: no queue named 'no-such-queue'")

    res = await invoke("dead-letters", "drop", "default", "--yes", *conn(app))
    assert res.exit_code == 0
    assert res.stdout.strip() == "dropped 2 dead letter(s) of queue 'default'"
    assert await app.client.redis.xlen(app.client.keys.dead("default")) == 0


async def test_queues_pause_says_when_no_task_was_ever_sent_to_the_queue(app: App) -> None:
    res = await invoke("queues", "pause", "mial", *conn(app))  # a typo of "mail"
    assert res.exit_code == 0
    assert (
        res.stdout.strip()
        == "queue 'mial' paused (no task was ever sent to it: is the name right?)"
    )
    assert await app.queues.paused() == {"mial"}  # pausing ahead of the first task is allowed
    await app.send_task("never.runs", queue="mail")
    res = await invoke("queues", "pause", "mail", *conn(app))
    assert res.stdout.strip() == "queue 'mail' paused"
