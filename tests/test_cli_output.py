"""What the CLI prints: tables at 80 columns and in pipes, prompts from pipes, hints, the
user's import traceback, --version, log levels and JSON logs. Real `python -m aiotasks`
processes against the test server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len

import aiotasks
from aiotasks import App, TaskFailed, TaskState
from aiotasks.cli.output import fit_widths
from aiotasks.logs import JsonFormatter

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
QUEUES = ["default", "mail", "reports-eu-west", "emails.transactional-high-priority"]
LONG_NAME = "myproject.billing.tasks.reconcile_invoices_with_the_payment_provider"


def aiotasks_cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    cwd: Path = ROOT,
    timeout: float = 30,
) -> Any:
    """Run `python -m aiotasks ARGS` with stdout a pipe; AIOTASKS_* unset unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIOTASKS_", "REDIS_URL"))}
    clean.pop("FORCE_COLOR", None)
    clean.pop("TTY_COMPATIBLE", None)
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), clean.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def conn(app: App) -> list[str]:
    return ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]


#: A terminal 80 columns wide, as rich sees one (stdout stays a pipe we can read).
TERMINAL_80 = {"TTY_COMPATIBLE": "1", "COLUMNS": "80"}


def squeeze(text: str) -> str:
    return " ".join(text.split())


def assert_plain(out: str) -> None:
    """Greppable: no colours, no box drawing, no ellipsis, no trailing spaces."""
    assert not ANSI.search(out), out
    assert not any(unicodedata.name(ch, "").startswith("BOX DRAWINGS") for ch in out), out
    assert "…" not in out
    assert all(line == line.rstrip() for line in out.splitlines()), out


def assert_fits_80(out: str) -> str:
    """The output with colours removed; every line at most 80 cells."""
    bare = ANSI.sub("", out)
    assert all(cell_len(line) <= 80 for line in bare.splitlines()), bare
    assert "…" not in bare
    return bare


async def dead_letter_setup(app: App, worker: Any) -> tuple[str, str]:
    """Tasks waiting on every queue of QUEUES and one dead letter; its (task id, reason)."""
    for queue in QUEUES:
        await app.send_task("nobody.runs.this", queue=queue)
    await worker(queues=["unknown-work"])
    dead = await app.send_task(LONG_NAME, queue="unknown-work")
    with pytest.raises(TaskFailed) as err:
        await dead.result(timeout=10)
    assert err.value.exc_type == "UnknownTask"
    (letter,) = await _dead_letters(app)
    return dead.id, letter


async def _dead_letters(app: App) -> list[str]:
    entries = await app.client.redis.xrange(app.client.keys.dead("unknown-work"))
    return [fields[b"reason"].decode() for _, fields in entries]


async def test_tables_at_80_columns_and_in_a_pipe(app: App, worker: Any) -> None:
    task_id, reason = await dead_letter_setup(app, worker)
    assert LONG_NAME in reason and len(reason) > 80  # it must wrap on a terminal
    commands = {
        "status": ["status"],
        "dead": ["dead-letters", "list", "unknown-work"],
        "inspect": ["inspect", task_id],
    }
    for what, command in commands.items():
        piped = aiotasks_cli(*command, *conn(app))
        terminal = aiotasks_cli(*command, *conn(app), env=TERMINAL_80)
        assert piped.returncode == terminal.returncode == 0, piped.stderr + terminal.stderr
        assert_plain(piped.stdout)
        bare = assert_fits_80(terminal.stdout)
        assert ANSI.search(terminal.stdout)  # it did draw for a terminal
        if what == "status":
            for queue in [*QUEUES, "unknown-work"]:
                assert queue in bare  # whole, not cut or folded
                (row,) = [line for line in piped.stdout.splitlines() if line.startswith(queue)]
                assert row.split()[0] == queue  # `grep queue` finds its row
            for header in ("Waiting", "Scheduled", "Consumers", "Dead", "Workers"):
                assert re.search(rf"\b{header}\b", bare), bare  # never split mid-word
        if what == "dead":
            (row,) = [line for line in piped.stdout.splitlines() if task_id in line]
            assert row.endswith(reason) and LONG_NAME in row
            assert squeeze(reason) in squeeze(bare)  # wrapped only between words
            assert LONG_NAME in bare and task_id in bare
        if what == "inspect":
            assert f"name         {LONG_NAME}" in piped.stdout
            assert re.search(r"state\s+FAILURE", bare) and LONG_NAME in bare


async def test_status_json_is_not_affected_by_a_terminal(app: App) -> None:
    await app.send_task("x", queue="q1")
    proc = aiotasks_cli("status", "--json", *conn(app), env=TERMINAL_80)
    assert json.loads(proc.stdout)["queues"][0]["name"] == "q1"


def test_fit_widths() -> None:
    assert fit_widths([5, 10], [5, 3], 20) == [5, 10]  # all fit: natural widths
    assert fit_widths([5, 30, 40], [5, 8, 12], 45) == [5, 20, 20]  # widest share a cap
    assert fit_widths([5, 30], [5, 30], 20) is None  # a word longer than the room left
    widths = fit_widths([15, 32, 63, 10, 120], [15, 32, 63, 5, 12], 192)
    assert widths is not None and sum(widths) <= 192 and widths[:4] == [15, 32, 63, 10]


async def test_status_of_an_empty_namespace_gives_a_hint(app: App) -> None:
    proc = aiotasks_cli("status", *conn(app))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"no queues in namespace {app.settings.namespace!r} at {app.settings.redis_url}; "
        "is this the right --namespace/--app?\n"
    )


# -- purge takes its answer from standard input ------------------------------------------


async def test_purge_reads_the_answer_from_a_pipe(app: App) -> None:
    handles = [await app.send_task("x", queue="piped") for _ in range(2)]
    no = aiotasks_cli("purge", "piped", *conn(app), stdin="n\n")
    assert no.returncode == 1 and "error: aborted: nothing was changed" in no.stderr, no.stderr
    assert "Delete 2 waiting and 0 scheduled task(s) of queue 'piped'? [y/N]:" in no.stderr
    assert [await h.state() for h in handles] == [TaskState.PENDING] * 2

    yes = aiotasks_cli("purge", "piped", *conn(app), stdin="y\n")
    assert yes.returncode == 0, yes.stderr
    assert yes.stdout == "purged 2 task(s) from queue 'piped'\n"
    assert [await h.state() for h in handles] == [TaskState.REVOKED] * 2


# -- the App from $AIOTASKS_APP ---------------------------------------------------------


async def test_aiotasks_app_is_the_default_app(app: App, redis_url: str) -> None:
    env = {
        "AIOTASKS_APP": "tests.apps.ops:app",
        "AIOTASKS_TEST_NAMESPACE": app.settings.namespace,
        "AIOTASKS_REDIS_URL": redis_url,
    }
    sent = aiotasks_cli("send", "ops.add", "--args", "[20, 22]", env=env)
    assert sent.returncode == 0, sent.stderr
    status = aiotasks_cli("status", "--json", env=env)
    assert json.loads(status.stdout)["namespace"] == app.settings.namespace
    ran = aiotasks_cli("run", "--burst", env=env)  # MODULE:APP from the environment too
    assert ran.returncode == 0, ran.stderr
    assert "app:         tests.apps.ops:app" in ran.stderr
    assert await app.handle(sent.stdout.strip()).result(timeout=5) == 42


# -- the user's import error --------------------------------------------------------------

BROKEN_MODULE = """\
from aiotasks import App

app = App()


def configure():
    return {"retries": 3} / 2


settings = configure()
"""


def test_an_import_error_shows_the_users_traceback(tmp_path: Path) -> None:
    (tmp_path / "brokenproject.py").write_text(BROKEN_MODULE)
    for command in (["status", "--app", "brokenproject:app"], ["run", "brokenproject:app"]):
        proc = aiotasks_cli(*command, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert f'File "{tmp_path / "brokenproject.py"}", line 10, in <module>' in proc.stderr
        assert f'File "{tmp_path / "brokenproject.py"}", line 7, in configure' in proc.stderr
        assert "importlib" not in proc.stderr  # the machinery's frames are left out
        assert lines[-2].startswith("TypeError: unsupported operand type(s) for /")
        assert lines[-1] == (
            "error: importing 'brokenproject' raised TypeError: unsupported operand "
            "type(s) for /: 'dict' and 'int'"
        )


def test_a_missing_module_is_one_line(tmp_path: Path) -> None:
    proc = aiotasks_cli("status", "--app", "nosuchproject.tasks:app", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: cannot import module 'nosuchproject.tasks': No module named 'nosuchproject'\n"
    )


# -- version and logs ---------------------------------------------------------------------


def test_version() -> None:
    proc = aiotasks_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"aiotasks {aiotasks.__version__}\n"


async def test_log_level_and_format_are_case_insensitive_and_json_is_json(
    app: App, redis_url: str
) -> None:
    handle = await app.send_task("ops.add", args=[1, 2])
    env = {"AIOTASKS_TEST_NAMESPACE": app.settings.namespace, "AIOTASKS_REDIS_URL": redis_url}
    proc = aiotasks_cli(
        "run", "tests.apps.ops:app", "--burst", "--log-level", "INFO", "--log-format", "JSON",
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    banner = records[0]
    assert banner["level"] == "INFO" and banner["event"] == "worker_started"
    assert banner["app"] == "tests.apps.ops:app"
    assert banner["namespace"] == app.settings.namespace
    assert banner["tasks"] == ["ops.add", "ops.boom", "ops.sleep"]
    assert banner["queues"] == ["default"] and banner["redis_url"] == redis_url
    assert banner["worker"] in banner["message"]
    assert any(handle.id in r["message"] for r in records[1:]), records  # the task's line
    assert await handle.result(timeout=1) == 3


def test_json_logs_for_a_failed_start_are_json_too() -> None:
    url = "redis://:s3cr3t@127.0.0.1:1/0"
    proc = aiotasks_cli(
        "run", "tests.apps.ops:app", "--log-format", "json", "--redis-url", url,
        "--connect-timeout", "1",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "s3cr3t" not in proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    retries, final = records[:-1], records[-1]
    assert retries and all(r["attempt"] == i for i, r in enumerate(retries, 1))
    assert all(r["redis_url"] == "redis://:***@127.0.0.1:1/0" for r in retries)
    assert final["level"] == "ERROR"
    assert final["message"].startswith("error: cannot reach Redis at redis://:***@127.0.0.1:1/0")


def test_json_formatter_emits_extra_fields() -> None:
    logger = logging.getLogger("aiotasks.test")
    try:
        raise ValueError("kaput")
    except ValueError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "%s[%s] FAILURE", ("add", "t1"),
            sys.exc_info(),
            extra={"task_id": "t1", "task_name": "add", "state": "FAILURE", "duration": 0.5},
        )  # fmt: skip
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "add[t1] FAILURE" and data["level"] == "ERROR"
    assert (data["task_id"], data["task_name"], data["state"], data["duration"]) == (
        "t1", "add", "FAILURE", 0.5,
    )  # fmt: skip
    assert "ValueError: kaput" in data["exc_info"]
    assert "args" not in data and "msg" not in data  # only the extras, not LogRecord's own
