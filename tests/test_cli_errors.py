"""Every CLI command, every bad input: one `error:` line, a non-zero exit, no traceback.

`test_every_subcommand_refuses_malformed_input` discovers the commands from the typer app
(so a new command is covered without editing this file) and feeds each one malformed
options and arguments in-process. The inputs an operator reported as raw tracebacks run
as real `python -m aiotasks` processes against the test server.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import typer.main
from typer.testing import CliRunner

from aiotasks import App, BrokerConnectionError, BrokerRefusedError, TaskState
from aiotasks.admin import Admin
from aiotasks.cli import cli
from aiotasks.cli.common import run_admin
from aiotasks.config import RetryPolicy

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "redis://127.0.0.1:1/0"
SECRET = "s3cr3t-pw"
BAD_URLS = [
    "http://127.0.0.1:6379/0",
    "redis://h:notaport/0",
    "redis://[::1/0",
    "redis://h:99999/0",
    "redis://h/zero",
    "unix://",
    f"redis://:{SECRET}@h:notaport/0?password={SECRET}",
    f"redis://:{SECRET}@h/0?bogus_opt=1",
]
BAD_APPS = [
    "nocolon",
    "tests.apps.no_such_module:app",
    "tests.apps.ops:no_such_attr",
    "./tests/apps/ops.py:app",
    ".ops:app",
]
#: A valid value for each positional argument, by parameter name.
ARGUMENTS = {
    "app_spec": "tests.apps.ops:app",
    "task_id": "abc",
    "queue": "default",
    "name": "ops.add",
    "task": "ops.add",
}
#: Environment variables that would change what a command reads: unset for the walk.
CLEAN_ENV: dict[str, str | None] = {
    "AIOTASKS_APP": None,
    "AIOTASKS_REDIS_URL": None,
    "REDIS_URL": None,
    "COLUMNS": "100",
}


# -- the walk -----------------------------------------------------------------------------


def leaf_commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[list[str], Any]]:
    """(command words, click command) for every runnable command under `group`."""
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from leaf_commands(command, (*path, name))
        else:
            yield [*path, name], command


def malformed(words: list[str], command: Any) -> Iterator[tuple[str, list[str], int]]:
    """(what is wrong, argv, expected exit code) for one command."""
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option"]
    valid = [ARGUMENTS[p.name] for p in arguments]
    base = [*words, *valid]
    if any(p.name == "redis_url" for p in options):
        base += ["--redis-url", UNREACHABLE]  # a case that slips through fails fast, exit 1
    if words == ["run"]:
        base += ["--connect-timeout", "0"]
    yield "an unknown option", [*base, "--no-such-option"], 2
    yield "an extra argument", [*base, "surplus"], 2
    if arguments:
        yield "no arguments", list(words), 2
    for option in options:
        yield from _bad_values(base, option)
    for argument in arguments:
        if argument.name == "app_spec":
            for spec in BAD_APPS:
                yield f"MODULE:APP {spec}", [*words, spec, *base[len(words) + 1 :]], 2


def _bad_values(base: list[str], option: Any) -> Iterator[tuple[str, list[str], int]]:
    flag = option.opts[0]
    if option.is_flag:
        return
    kind = type(option.type).__name__  # click's IntRange, FloatParamType, Choice, ...
    if kind.startswith(("Int", "Float")):
        yield from _bad_numbers(base, flag, option.type)
    if kind.endswith("Choice"):
        yield f"{flag} not a choice", [*base, flag, "no-such-choice"], 2
    if option.name == "redis_url":
        for url in BAD_URLS:
            yield f"{flag} {url}", [*base, flag, url], 2
    if option.name == "app_spec":
        for spec in BAD_APPS:
            yield f"{flag} {spec}", [*base, flag, spec], 2


def _bad_numbers(base: list[str], flag: str, kind: Any) -> Iterator[tuple[str, list[str], int]]:
    yield f"{flag} not a number", [*base, flag, "many"], 2
    if getattr(kind, "min", None) is not None:
        yield f"{flag} below its minimum", [*base, flag, str(kind.min - 1)], 2
    if getattr(kind, "max", None) is not None:
        yield f"{flag} above its maximum", [*base, flag, str(kind.max * 10 + 9)], 2
    if type(kind).__name__.startswith("Float"):
        yield f"{flag} nan", [*base, flag, "nan"], 2
        yield f"{flag} inf", [*base, flag, "inf"], 2


CASES = [
    pytest.param(argv, code, id=f"{' '.join(words)}: {what}")
    for words, command in leaf_commands(typer.main.get_command(cli))
    for what, argv, code in malformed(words, command)
]


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """`run` configures the root logger: put it back after each case."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_walk_covers_every_command_and_kind_of_option() -> None:
    ids = {c.id for c in CASES}
    for words in ("run", "status", "inspect", "revoke", "purge", "send", "dead-letters list"):
        assert f"{words}: an unknown option" in ids
    for expected in (
        "run: --concurrency not a number",
        "run: --metrics-port above its maximum",
        "run: --connect-timeout nan",
        "run: --log-level not a choice",
        "run: MODULE:APP nocolon",
        "send: --priority above its maximum",
        "send: --redis-url redis://h:notaport/0",
        "status: --interval below its minimum",
        "dead-letters list: --count below its minimum",
        "dead-letters drop: no arguments",
        "purge: --app tests.apps.ops:no_such_attr",
    ):
        assert expected in ids, expected


@pytest.mark.parametrize(("argv", "code"), CASES)
def test_every_subcommand_refuses_malformed_input(
    argv: list[str], code: int, keep_logging: None
) -> None:
    result = CliRunner().invoke(cli, argv, env=CLEAN_ENV, catch_exceptions=False)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert result.exit_code == code, output
    assert SECRET not in output, output


def test_a_bad_url_from_the_environment_is_one_line(keep_logging: None) -> None:
    env = {**CLEAN_ENV, "AIOTASKS_REDIS_URL": "ftp://files.example.com/0"}
    for argv in (["status"], ["inspect", "abc"], ["dead-letters", "list", "q"]):
        result = CliRunner().invoke(cli, argv, env=env, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            "error: invalid Redis URL 'ftp://files.example.com/0': unsupported scheme 'ftp://' "
            "(expected redis://host:port/db, rediss://host:port/db, unix:///path/to/socket, "
            "redis+cluster://host:port[,host:port...] or "
            "redis+sentinel://host:port[,host:port...]/service) (from $AIOTASKS_REDIS_URL)\n"
        )


# -- the reported inputs, as real processes -----------------------------------------------


def aiotasks(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Any:
    """Run `python -m aiotasks ARGS` to completion."""
    full = {k: v for k, v in os.environ.items() if k not in ("AIOTASKS_APP", "REDIS_URL")}
    full.pop("AIOTASKS_REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "aiotasks", *args],
        cwd=ROOT,
        env={**full, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error(proc: Any, code: int) -> str:
    """The one error line of a finished process (which exited `code`, with no traceback)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert "Traceback" not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]


def with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["status", "--redis-url", "http://h:6379/0"],
            {},
            "error: invalid Redis URL 'http://h:6379/0': unsupported scheme 'http://'",
        ),
        (
            ["status"],
            {"AIOTASKS_REDIS_URL": "http://h:6379/0"},
            "error: invalid Redis URL 'http://h:6379/0': unsupported scheme 'http://'",
        ),
        (
            ["run", "tests.apps.ops:app"],
            {"AIOTASKS_REDIS_URL": "http://h:6379/0"},
            "error: invalid Redis URL 'http://h:6379/0': unsupported scheme 'http://'",
        ),
        (
            ["inspect", "abc", "--redis-url", "redis://h:notaport/0"],
            {},
            "error: invalid Redis URL 'redis://h:notaport/0': the port is not a number: "
            "'notaport' (from --redis-url)",
        ),
        (
            ["send", "ops.add", "--redis-url", "redis://[::1/0"],
            {},
            "error: invalid Redis URL 'redis://[::1/0': the host is malformed",
        ),
        (
            ["run", "tests.apps.ops:app", "--metrics-port", "99999"],
            {},
            "error: invalid value for '--metrics-port': 99999 is not in the range 1<=x<=65535",
        ),
        (
            ["send", "ops.add", "--queue", ""],
            {},
            "error: --queue is empty",
        ),
        (
            ["run", "tests.apps.ops:app", "--redis-url", f"redis://:{SECRET}@h:x/0"],
            {},
            "error: invalid Redis URL 'redis://:***@h:x/0': the port is not a number: 'x'",
        ),
        (
            ["send", "ops.add", "--countdown", "1e12"],
            {},
            "error: --countdown must be a number of seconds from 0 to 315,360,000 (ten years)",
        ),
        (["queues", "pause", ""], {}, "error: '' is not a queue name"),
        (
            ["scripts", "load", "--redis-url", f"redis://:{SECRET}@h:x/0"],
            {},
            "error: invalid Redis URL 'redis://:***@h:x/0': the port is not a number: 'x'",
        ),
        (["queues", "resume", "a,b"], {}, "error: 'a,b' is not a queue name"),
        (["send", "ops.add", "--queue", "a,b"], {}, "error: --queue 'a,b' is not a queue name"),
        (
            ["schedules", "add", "s", "ops.add", "--every", "5", "--queue", " mail"],
            {},
            "error: ' mail' is not a queue name",
        ),
        (["queues", "pause", " "], {}, "error: ' ' is not a queue name"),
        (["run", "tests.apps.ops:app", "--queues", ",,"], {}, "error: --queues ',,' names no"),
        (
            ["run", "./tests/apps/ops.py:app"],
            {},
            "error: './tests/apps/ops.py' is a file path, not a module: give its dotted module "
            "name, as in tests.apps.ops:app",
        ),
        (
            ["status", "--app", ".ops:app"],
            {},
            "error: '.ops' is a relative module name: give the module's full dotted name, as "
            "in ops:app",  # it suggested '.ops:app', the input itself
        ),
        (
            ["run", "tests.apps.ops:app"],
            {"AIOTASKS_SHARDS": "abc"},  # it read as the module's error, with a traceback
            "error: $AIOTASKS_SHARDS must be a whole number from 1 to 64, got 'abc'",
        ),
        (
            ["status"],
            {"AIOTASKS_SHARDS": "0"},  # it read as "a bug in aiotasks?", exit 1
            "error: $AIOTASKS_SHARDS must be a whole number from 1 to 64, got '0'",
        ),
        (["status", "--queue", "a,b"], {}, "error: --queue 'a,b' is not a queue name"),
        (["send", "ops.add", "--timeout", "3"], {}, "error: --timeout goes with --wait"),
        (["status", "--queue", ""], {}, "error: --queue '' is not a queue name"),
        (
            ["run", "tests.apps.ops:app", "--queues", "a,,b"],
            {},
            "error: --queues 'a,,b' has an empty name",
        ),
        (["schedules", "add", "", "ops.add", "--every", "5"], {}, "error: the schedule name is"),
        (["schedules", "add", "s", "", "--every", "5"], {}, "error: the task name is empty"),
        (
            ["schedules", "add", "s", "ops.add", "--every", "1e308"],
            {},
            "error: every must be at least 0.001 and under 1e9 seconds, got 1e+308",
        ),
        (
            ["send", "tests.apps.basic.add", "--args", "[1]", "--app", "tests.apps.basic:app"],
            {},
            "error: task tests.apps.basic.add: missing a required argument: 'y'",
        ),
        (
            ["schedules", "add", "s", "tests.apps.basic.add", "--every", "5"]
            + ["--app", "tests.apps.basic:app"],
            {},
            "error: task tests.apps.basic.add: missing a required argument: 'x'",
        ),
        (["inspect", ""], {}, "error: invalid value for 'task_id': it is empty"),
        (["revoke", " "], {}, "error: invalid value for 'task_id': it is empty"),
        (["retry", ""], {}, "error: invalid value for 'task_id': it is empty"),
        (["purge", "", "--yes"], {}, "error: invalid value for 'queue': '' is not a queue"),
        (["purge", "a,b", "--yes"], {}, "error: invalid value for 'queue': 'a,b' is not a"),
        (["dead-letters", "list", ""], {}, "error: invalid value for 'queue': '' is not a"),
        (["schedules", "resume", ""], {}, "error: invalid value for 'name': it is empty"),
        (["web", "--host", ""], {}, "error: invalid value for '--host': it is empty"),
        # `--redis-url "$URL"` with URL unset read as absent: the environment's server.
        (["status", "--redis-url", ""], {}, "error: invalid value for '--redis-url': it is"),
        (["run", "tests.apps.ops:app", "--redis-url", " "], {}, "error: invalid value for"),
        (
            ["run", "tests.apps.ops:app", "--metrics-port", "9999", "--metrics-host", ""],
            {},
            "error: invalid value for '--metrics-host': it is empty",
        ),
        (
            ["status"],
            {"AIOTASKS_APP": "nosuch:x"},
            "error: cannot import module 'nosuch': No module named 'nosuch' (MODULE:APP from "
            "$AIOTASKS_APP)",
        ),
        (
            ["run", "/srv/my-app/tasks.py:app"],
            {},
            "error: '/srv/my-app/tasks.py' is a file path, not a module: give its dotted module "
            "name, as in tasks:app, run from /srv/my-app",
        ),
        # An unset "$NS" must not reach the default namespace (a purge would empty it).
        (["purge", "q", "--yes", "--namespace", ""], {}, "error: --namespace must be a"),
        (["send", "ops.add", "--namespace", "a}b"], {}, "error: --namespace must be a"),
    ],
)
def test_reported_bad_inputs_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    proc = aiotasks(*args, env=env)
    assert one_error(proc, 2).startswith(expected)
    assert SECRET not in proc.stdout + proc.stderr


def test_a_task_name_the_app_lacks_is_sent_with_a_warning(redis_url: str, namespace: str) -> None:
    """Not an error (another service's workers may run it), but a likely typo: said on
    stderr, with the closest name the --app has."""
    conn = ["--app", "tests.apps.basic:app", "--redis-url", redis_url, "--namespace", namespace]
    proc = aiotasks("send", "tests.apps.basic.ad", *conn)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(proc.stdout.split()) == 1  # the id, as for any send
    assert proc.stderr.startswith(
        "warning: tests.apps.basic:app has no task 'tests.apps.basic.ad' "
        "(did you mean 'tests.apps.basic.add'?)"
    ), proc.stderr
    known = aiotasks("send", "tests.apps.basic.add", "--args", "[1, 2]", *conn)
    assert known.returncode == 0 and known.stderr == "", known.stderr


@pytest.mark.parametrize("command", [["status"], ["run", "tests.apps.ops:app"]])
def test_a_database_out_of_range_is_one_line(redis_url: str, command: list[str]) -> None:
    url = with_db(redis_url, 999)
    proc = aiotasks(*command, "--redis-url", url)
    assert one_error(proc, 1) == (
        f"error: Redis at {url} refused the connection: DB index is out of range"
    )


async def test_an_integer_msgpack_cannot_hold(app: App) -> None:
    proc = aiotasks(
        "send", "ops.add", "--args", "[18446744073709551616, 1]",
        "--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace,
    )  # fmt: skip
    assert one_error(proc, 2) == (
        "error: cannot send these arguments: task ops.add: cannot encode with msgpack: "
        "cannot serialize object of type int (msgpack integers must fit in 64 bits: "
        "-2**63 .. 2**64-1)"
    )
    assert proc.stdout == ""
    assert await app.client.redis.exists(app.client.keys.queues) == 0  # nothing was sent


async def test_a_record_with_an_unknown_state(app: App) -> None:
    await app.client.redis.hset(app.client.keys.task("odd"), mapping={"state": "BOGUS"})
    conn = ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]
    for command in (["inspect", "odd"], ["inspect", "odd", "--json"], ["revoke", "odd"]):
        proc = aiotasks(*command, *conn)
        assert one_error(proc, 1) == (
            "error: the record of task 'odd' has an unknown state 'BOGUS' (known: PENDING, "
            "SCHEDULED, STARTED, SUCCESS, FAILURE, REVOKED): written by another program or "
            "aiotasks version?"
        )
    assert await app.client.redis.hget(app.client.keys.task("odd"), "state") == b"BOGUS"


async def test_a_result_timeout_says_so(app: App) -> None:
    conn = ["--redis-url", app.settings.redis_url, "--namespace", app.settings.namespace]
    proc = aiotasks("send", "nobody.runs.this", "--wait", "--timeout", "1", *conn)
    task_id = proc.stdout.strip()
    assert one_error(proc, 1) == f"error: task {task_id} did not finish within 1 s"
    assert await app.handle(task_id).state() == TaskState.PENDING


def test_a_wrong_password_is_refused_at_once(own_server: Any) -> None:
    with redis.Redis.from_url(own_server.url) as client:
        client.config_set("requirepass", "right-pw")
    url = own_server.url.replace("redis://", "redis://:wrong-pw@")
    shown = own_server.url.replace("redis://", "redis://:***@")
    for command in (["status"], ["run", "tests.apps.ops:app", "--connect-timeout", "20"]):
        started = time.monotonic()
        proc = aiotasks(*command, "--redis-url", url)
        assert one_error(proc, 1) == (
            f"error: Redis at {shown} refused the credentials: "
            "invalid username-password pair or user is disabled."
        )
        assert time.monotonic() - started < 10  # not retried for --connect-timeout
        assert "wrong-pw" not in proc.stdout + proc.stderr
    # No password at all: said so, not the server's words about HELLO.
    for command in (["status"], ["run", "tests.apps.ops:app", "--connect-timeout", "20"]):
        proc = aiotasks(*command, "--redis-url", own_server.url)
        assert one_error(proc, 1) == (
            f"error: Redis at {own_server.url} requires a password, and the URL gives none "
            "(put ':PASSWORD@' or 'USER:PASSWORD@' before the host)"
        )


def test_a_watch_whose_reader_goes_away_exits_without_an_error(redis_url: str) -> None:
    """`aiotasks status --watch | head -2`: the closed pipe is not a lost Redis."""
    env = {k: v for k, v in os.environ.items() if k not in ("AIOTASKS_APP", "REDIS_URL")}
    env["AIOTASKS_REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiotasks", "status", "--watch", "--interval", "0.1"]
        + ["--namespace", "watch-pipe"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its lines
    proc.wait(20)
    stderr = proc.stderr.read().decode()
    assert "error:" not in stderr and "Traceback" not in stderr, stderr


def test_a_broken_connections_leftover_error_is_not_printed(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio's streams keep a broken connection's error in a future of their own; when
    the collector frees it before its stream, asyncio logs it as a traceback after the
    command's one error line (seen with a TLS server refusing a client without a
    certificate). A command keeps that quiet, and only that."""
    app = App(redis_url=redis_url, namespace=namespace)
    broken = ConnectionResetError(104, "Connection reset by peer")
    timeout = TimeoutError("an OSError, but no broken connection")
    in_task = ConnectionResetError(104, "raised by a task")

    async def leave_errors(admin: Admin) -> None:
        loop = asyncio.get_running_loop()
        for exc in (broken, timeout):
            loop.create_future().set_exception(exc)  # never retrieved: freed at once
        task = loop.create_task(_raise(in_task))
        await asyncio.sleep(0)
        assert task.done()
        del task  # a task's error is the code's own: still reported

    gc.collect()  # what earlier tests left is reported before, not below
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run_admin(app, leave_errors)
    reported = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [e for e in (broken, timeout, in_task) if any(e is r for r in reported)] == [
        timeout,
        in_task,
    ]


async def _raise(exc: BaseException) -> None:
    raise exc


def test_a_cluster_url_for_a_server_that_is_no_cluster_is_one_clear_error(
    redis_url: str, namespace: str
) -> None:
    """Not "unexpected RedisClusterException ... (a bug in aiotasks?)": a refusal that says
    what to use instead, from the CLI and from the Python API."""
    parts = urlsplit(redis_url)
    url = f"redis+cluster://{parts.hostname}:{parts.port}"
    hint = "the URL says Redis Cluster, but the server is not one: use redis://host:port/db"
    proc = aiotasks("status", "--redis-url", url, "--namespace", namespace)
    assert hint in one_error(proc, 1)
    # A cluster no node of which answers is unreachable, not refused: waited out.
    proc = aiotasks("status", "--redis-url", "redis+cluster://127.0.0.1:1")
    assert one_error(proc, 1).startswith("error: cannot reach Redis at redis+cluster://127.0.0.1:1")

    async def send() -> None:
        app = App(redis_url=url, namespace=namespace)

        @app.task
        async def t() -> None:
            pass

        try:
            with pytest.raises(BrokerRefusedError, match="not one: use redis://"):
                await app.connect()
            with pytest.raises(BrokerRefusedError, match="not one: use redis://"):
                await t.send()
        finally:
            await app.close()

    asyncio.run(send())


def test_a_sentinel_that_cannot_be_asked_is_named_by_its_address() -> None:
    """redis-py names each Sentinel it could not ask by its client's whole repr (every
    connection setting, kilobytes per Sentinel): the error line says host:port."""
    url = f"redis+sentinel://:{SECRET}@127.0.0.1:1,127.0.0.1:2/mymaster"
    line = one_error(aiotasks("status", "--redis-url", url), 1)
    assert "No master found for 'mymaster'" in line
    assert "Sentinel 127.0.0.1:1 - " in line and "Sentinel 127.0.0.1:2 - " in line
    assert "ConnectionPool" not in line and len(line) < 500, line


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.SlotNotCoveredError("slot 42 is not covered"),
        redis.exceptions.RedisClusterUnreachableError("Redis Cluster cannot be connected"),
    ],
)
async def test_a_cluster_in_failover_is_waited_out_not_refused(error: Exception) -> None:
    """What a Cluster says while a failover or its start is under way is retried by the
    send retry policy, then a BrokerConnectionError; only "cluster mode is not enabled"
    is a refusal."""
    app = App(redis_url="redis+cluster://127.0.0.1:7000")
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        raise error

    policy = RetryPolicy(max_retries=2, interval_step=0.01, interval_max=0.01)
    with pytest.raises(BrokerConnectionError, match="after 3 tries"):
        await app.client.with_retry(policy, call)
    assert calls == 3
    refused = redis.exceptions.RedisClusterException("Cluster mode is not enabled on this node")

    async def single() -> None:
        raise refused

    with pytest.raises(BrokerRefusedError, match="use redis://host:port/db"):
        await app.client.with_retry(policy, single)


def test_aiotasks_shards_is_checked_where_an_app_reads_it(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """A bad $AIOTASKS_SHARDS is the environment's error (not the module's, nor the
    $AIOTASKS_APP that named it), and an App given shards= never reads it: its commands
    work as its own module does (a check before the import refused them)."""
    bad = {"AIOTASKS_SHARDS": "abc"}
    proc = aiotasks("run", env={**bad, "AIOTASKS_APP": "tests.apps.ops:app"})
    assert one_error(proc, 2) == (
        "error: $AIOTASKS_SHARDS must be a whole number from 1 to 64, got 'abc'"
    )
    (tmp_path / "own_shards.py").write_text("from aiotasks import App\n\napp = App(shards=1)\n")
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    proc = aiotasks(
        "status", "--app", "own_shards:app", *conn, env={**bad, "PYTHONPATH": str(tmp_path)}
    )
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stdout + proc.stderr
