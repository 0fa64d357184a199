"""`aiotasks inspect | revoke | retry | send`: one task at a time."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from ..admin import Admin
from ..errors import ResultTimeout, SerializationError, TaskFailed, TaskRevoked
from ..handle import TaskInfo, TaskState
from .common import (
    AppOption,
    JsonOption,
    NamespaceOption,
    RedisOption,
    finite,
    open_app,
    run_admin,
)
from .group import fail
from .output import Block, Cell, Fields, Line, ago, echo_json, show

TaskIdArg = Annotated[str, typer.Argument(help="The task id.")]

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
    """Show everything stored about a task: state, result or error, timings, worker."""
    app = open_app(app_spec, redis_url, namespace)
    info = run_admin(app, lambda admin: admin.inspect(task_id))
    if as_json:
        echo_json(info_dict(info))
    else:
        show(info_blocks(info))


def info_dict(info: TaskInfo) -> dict[str, Any]:
    """A TaskInfo as JSON-ready values (a result JSON cannot hold becomes its repr)."""
    out: dict[str, Any] = {}
    for name in TaskInfo.__slots__:
        value = getattr(info, name)
        if name == "result":
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    out["state"] = str(info.state)
    return out


def info_blocks(info: TaskInfo) -> list[Block]:
    """Everything stored about a task as key/value lines, then its traceback."""
    pairs: list[tuple[str, Cell]] = [
        ("id", info.id),
        ("name", info.name or "-"),
        ("state", (str(info.state), _STATE_STYLE.get(info.state, ""))),
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
        pairs.append(("progress", repr(info.progress)))
    if info.state == TaskState.SUCCESS:
        pairs.append(("result", repr(info.result)))
    if info.exc_type:
        pairs.append(("error", f"{info.exc_type}: {info.exc_message}"))
    blocks: list[Block] = [Fields(pairs)]
    if info.traceback:
        blocks += [Line(""), Line(info.traceback.rstrip(), "dim")]
    return blocks


# -- revoke -------------------------------------------------------------------------------


def revoke(
    task_id: TaskIdArg,
    terminate: Annotated[
        bool, typer.Option("--terminate", help="Also cancel it if it is running.")
    ] = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Make sure a task never runs (with --terminate, cancel it if it is running)."""
    app = open_app(app_spec, redis_url, namespace)
    before = run_admin(app, lambda admin: admin.revoke(task_id, terminate))
    if before.is_final:
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
    task_args = _json_arg("--args", args, list)
    task_kwargs = _json_arg("--kwargs", kwargs, dict)
    options: dict[str, Any] = {}
    if finite("--countdown", countdown):
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = priority
    finite("--timeout", timeout)
    app = open_app(app_spec, redis_url, namespace)

    async def go(admin: Admin) -> Any:
        try:
            handle = await admin.send(name, task_args, task_kwargs, queue, **options)
        except SerializationError as exc:
            raise fail(
                f"cannot send these arguments: {exc}{_encoding_hint([task_args, task_kwargs])}", 2
            ) from None
        typer.echo(handle.id)
        sys.stdout.flush()
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


def _json_arg(option: str, raw: str | None, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON ({exc}): {raw!r}", 2) from None
    except RecursionError:
        raise fail(f"{option} is nested too deeply", 2) from None
    if not isinstance(value, kind):
        want = "a JSON array, e.g. '[1, 2]'" if kind is list else "a JSON object, e.g. '{\"x\": 1}'"
        raise fail(f"{option} must be {want}, got {raw!r}", 2)
    return value


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
