"""`aiotasks inspect | revoke | retry | send`: one task at a time."""

from __future__ import annotations

import json
import sys
from contextlib import suppress
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

import typer

from ..admin import Admin, Arguments, TaskNotFound
from ..errors import ResultTimeout, SerializationError, TaskFailed, TaskRevoked
from ..handle import TaskHandle, TaskInfo, TaskState
from ..message import QUEUE_NAME_RULE, check_options, is_queue_name
from .common import (
    AppOption,
    JsonOption,
    NamespaceOption,
    RedisOption,
    finite,
    json_arg,
    not_empty,
    open_app,
    run_admin,
    unknown_task_note,
)
from .group import fail
from .output import Block, Cell, Fields, Line, ago, echo_json, show

TaskIdArg = Annotated[str, typer.Argument(help="The task id.", callback=not_empty)]

_STATE_STYLE = {
    TaskState.PENDING: "yellow",
    TaskState.SCHEDULED: "cyan",
    TaskState.STARTED: "blue",
    TaskState.SUCCESS: "green",
    TaskState.FAILURE: "red",
    TaskState.REVOKED: "magenta",
}


# -- inspect ------------------------------------------------------------------------------


def inspect(
    task_id: TaskIdArg,
    as_json: JsonOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Show everything stored about a task: state, arguments, result or error, timings."""
    app = open_app(app_spec, redis_url, namespace)

    async def read(admin: Admin) -> tuple[TaskInfo, Arguments | None]:
        return await admin.inspect(task_id), await admin.arguments(task_id)

    info, arguments = run_admin(app, read)
    if as_json:
        echo_json(info_dict(info, arguments))
    else:
        show(info_blocks(info, arguments))


def info_dict(info: TaskInfo, arguments: Arguments | None = None) -> dict[str, Any]:
    """A TaskInfo as JSON-ready values, with its arguments (null once they are gone)."""
    out: dict[str, Any] = {}
    for name in TaskInfo.__slots__:
        value = getattr(info, name)
        if name == "result":
            value = json_value(value)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    out["state"] = str(info.state)
    readable = arguments is not None and arguments.error is None
    out["args"] = json_value(arguments.args) if readable and arguments else None
    out["kwargs"] = json_value(arguments.kwargs) if readable and arguments else None
    return out


def info_blocks(info: TaskInfo, arguments: Arguments | None = None) -> list[Block]:
    """Everything stored about a task as key/value lines, then its traceback."""
    pairs: list[tuple[str, Cell]] = [
        ("id", info.id),
        ("name", info.name or "-"),
        ("state", (str(info.state), _STATE_STYLE.get(info.state, ""))),
        *_argument_pairs(arguments),
    ]
    for name in ("queue", "worker", "attempts"):
        pairs.append((name, str(getattr(info, name) or "-")))
    for name in ("enqueued_at", "started_at", "finished_at"):
        when: datetime | None = getattr(info, name)
        pairs.append((name, f"{when.isoformat()} ({ago(when)})" if when else "-"))
    if info.started_at and info.finished_at:
        runtime = (info.finished_at - info.started_at).total_seconds()
        pairs.append(("runtime", f"{runtime:.3f}s"))
    if info.progress is not None:
        pairs.append(("progress", json_text(info.progress)))
    if info.state == TaskState.SUCCESS:
        pairs.append(("result", json_text(info.result)))
    if info.exc_type:
        pairs.append(("error", f"{info.exc_type}: {info.exc_message}"))
    blocks: list[Block] = [Fields(pairs)]
    if info.traceback:
        blocks += [Line(""), Line(info.traceback.rstrip(), "dim")]
    return blocks


def _argument_pairs(arguments: Arguments | None) -> list[tuple[str, Cell]]:
    if arguments is None:
        gone = "- (deleted with its message once the task ran)"
        return [("args", gone), ("kwargs", gone)]
    if arguments.error is not None:
        unreadable = f"- (its {arguments.where} cannot be decoded: {arguments.error})"
        return [("args", unreadable), ("kwargs", unreadable)]
    return [("args", json_text(arguments.args)), ("kwargs", json_text(arguments.kwargs))]


def json_value(value: Any) -> Any:
    """`value` as JSON types: datetimes, UUIDs, sets, bytes... as JSON shows them."""
    return json.loads(json_text(value))


def json_text(value: Any) -> str:
    """`value` as one line of JSON; what JSON cannot hold at all becomes a JSON string."""
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError):  # e.g. a dict keyed by tuples, a circular value
        return json.dumps(repr(value), ensure_ascii=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime | date | time):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, bytes):
        return obj.decode(errors="backslashreplace")
    if isinstance(obj, UUID | Decimal | timedelta):
        return str(obj)
    return repr(obj)


# -- revoke -------------------------------------------------------------------------------


def revoke(
    task_id: TaskIdArg,
    terminate: Annotated[
        bool, typer.Option("--terminate", help="Also cancel it if it is running.")
    ] = False,
    ahead: Annotated[
        bool,
        typer.Option(
            "--ahead",
            help="Revoke an id not sent yet (a frozen signature's, a canvas step not "
            "reached): it will not run when sent. Without it, an unknown id is an error.",
        ),
    ] = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Make sure a task never runs (with --terminate, cancel it if it is running)."""
    app = open_app(app_spec, redis_url, namespace)

    async def go(admin: Admin) -> TaskState | None:
        try:
            return await admin.revoke(task_id, terminate)
        except TaskNotFound as exc:
            if not ahead:  # a typo must not leave a record: say how to mean it
                raise TaskNotFound(f"{exc} (an id not sent yet: --ahead revokes it)") from None
        await admin.app.handle(task_id).revoke(terminate=terminate)
        return None

    before = run_admin(app, go)
    if before is None:
        typer.echo(f"revoked task {task_id} ahead: it has not been sent; if it is, it will not run")
    elif before.is_final:
        typer.echo(f"task {task_id} already finished ({before}): nothing to revoke")
    elif before == TaskState.STARTED and terminate:
        typer.echo(f"revoked task {task_id} (was STARTED; its worker was told to cancel it)")
    elif before == TaskState.STARTED:
        typer.echo(
            f"task {task_id} is running: this run goes on, then the task ends REVOKED with "
            f"its result discarded and no retry; 'aiotasks revoke {task_id} --terminate' "
            "cancels it now"
        )
    else:
        typer.echo(f"revoked task {task_id} (was {before}: it will not run)")


# -- retry --------------------------------------------------------------------------------


def retry(
    task_id: TaskIdArg,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Send a failed or revoked task again, under its id, with its arguments."""
    app = open_app(app_spec, redis_url, namespace)
    how = run_admin(app, lambda admin: admin.retry(task_id))
    typer.echo(f"retried task {task_id}: {how}")


# -- send ---------------------------------------------------------------------------------


def send(
    name: Annotated[str, typer.Argument(help="The task name, e.g. myproject.tasks.add.")],
    args: Annotated[str | None, typer.Option(help="Positional arguments: a JSON array.")] = None,
    kwargs: Annotated[str | None, typer.Option(help="Keyword arguments: a JSON object.")] = None,
    queue: Annotated[str | None, typer.Option(help="Queue (default: the task's route).")] = None,
    countdown: Annotated[
        float | None, typer.Option(min=0, help="Seconds to wait before it runs.")
    ] = None,
    priority: Annotated[
        int | None, typer.Option(min=0, max=9, help="0..9, 9 most urgent (default 5).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = False,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="With --wait: seconds to wait (default: forever).")
    ] = None,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Send a task by name and print its id (with --wait, then its result as JSON)."""
    if not name.strip():
        raise fail("the task name is empty", 2)
    task_args = json_arg("--args", args, list)
    task_kwargs = json_arg("--kwargs", kwargs, dict)
    options = _send_options(queue, countdown, priority)
    _check_timeout(wait, timeout)
    app = open_app(app_spec, redis_url, namespace)
    unknown_task_note(app, app_spec, name)
    task = app.tasks.get(name)
    if task is not None:  # the App knows it: its arguments are checked here, as send() does
        try:
            task.check_args(task_args, task_kwargs)
        except TypeError as exc:
            raise fail(f"{exc} (see --args/--kwargs)", 2) from None

    async def go(admin: Admin) -> Any:
        try:
            handle = await admin.send(name, task_args, task_kwargs, queue, **options)
        except SerializationError as exc:
            raise fail(
                f"cannot send these arguments: {exc}{_encoding_hint([task_args, task_kwargs])}", 2
            ) from None
        typer.echo(handle.id)
        sys.stdout.flush()
        with suppress(Exception):  # a note: the task is sent, whatever this read meets
            await _no_reader_note(admin, handle)
        if not wait:
            return None
        try:
            return await handle.result(timeout=timeout)
        except ResultTimeout:
            raise fail(f"task {handle.id} did not finish within {timeout:g} s") from None
        except (TaskFailed, TaskRevoked) as exc:
            raise fail(str(exc)) from None

    result = run_admin(app, go)
    if wait:
        typer.echo(_result_text(result))


async def _no_reader_note(admin: Admin, handle: TaskHandle[Any]) -> None:
    """Warn (on stderr) when workers run but none reads the task's queue: a typo in
    --queue would leave it waiting unseen. No worker at all is no news: they may start
    later."""
    workers = await admin.workers()
    queue = (await handle.info()).queue
    if workers and queue and not any(queue in w.queues for w in workers):
        read = sorted({q for w in workers for q in w.queues})
        typer.echo(
            f"warning: no running worker reads queue {queue!r} (they read: "
            f"{', '.join(read)}); the task waits there until one does",
            err=True,
        )


def _check_timeout(wait: bool, timeout: float | None) -> None:
    finite("--timeout", timeout)
    if timeout is not None and not wait:
        raise fail("--timeout goes with --wait (how long to wait for the result)", 2)


def _send_options(
    queue: str | None, countdown: float | None, priority: int | None
) -> dict[str, Any]:
    """`send`'s options from the command line, each checked (exit 2 when wrong)."""
    if queue is not None and not queue.strip():
        raise fail("--queue is empty: give a queue name, or leave it out for the task's route", 2)
    if queue is not None and not is_queue_name(queue):
        raise fail(f"--queue {queue!r} is not {QUEUE_NAME_RULE}", 2)
    options: dict[str, Any] = {}
    if finite("--countdown", countdown):
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = priority
    try:
        check_options(options)
    except ValueError as exc:  # out of range: the message names the bounds
        raise fail(f"--{exc}", 2) from None
    return options


def _encoding_hint(value: Any) -> str:
    """Why msgpack may have refused: an integer beyond 64 bits."""
    if _has_big_int(value):
        return " (msgpack integers must fit in 64 bits: -2**63 .. 2**64-1)"
    return ""


def _has_big_int(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(_has_big_int(v) for v in value)
    if isinstance(value, dict):
        return any(_has_big_int(v) for v in value.values())
    return False


def _result_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
