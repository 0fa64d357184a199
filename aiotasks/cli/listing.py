"""`aiotasks tasks list`: recent tasks from the namespace's task index."""

from __future__ import annotations

from typing import Annotated

import typer

from ..admin import Admin
from ..index import TaskIndex
from ..state import TaskInfo, TaskState
from .common import AppOption, JsonOption, NamespaceOption, RedisOption, open_app, run_admin
from .group import fail
from .output import Table, ago, echo_json, show

tasks_group = typer.Typer(help="Tasks of the namespace, from its task index.", no_args_is_help=True)


def _state(value: str | None) -> TaskState | None:
    if value is None:
        return None
    try:
        return TaskState(value.upper())
    except ValueError:
        known = ", ".join(s.value for s in TaskState)
        raise fail(f"--state must be one of {known}, got {value!r}", 2) from None


def _row(info: TaskInfo) -> list[str]:
    when = info.finished_at or info.started_at or info.enqueued_at
    return [info.id, info.name or "?", info.state.value, info.queue or "-", ago(when)]


@tasks_group.command("list")
def list_tasks(
    state: Annotated[str | None, typer.Option(help="Only this state (e.g. FAILURE).")] = None,
    name: Annotated[
        str | None, typer.Option(help="Only this task name (a glob: 'mail.*').")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most tasks to show.")] = 50,
    as_json: JsonOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List recent tasks, unfinished first, then the most recently finished."""
    wanted = _state(state)
    app = open_app(app_spec, redis_url, namespace)

    async def read(admin: Admin) -> list[TaskInfo]:
        index = TaskIndex(admin.client)
        return await index.recent(state=wanted, name=name, queue=queue, limit=limit)

    infos = run_admin(app, read)
    if as_json:
        echo_json(
            [
                {
                    "id": i.id,
                    "name": i.name,
                    "state": i.state.value,
                    "queue": i.queue,
                    "enqueued_at": i.enqueued_at,
                    "started_at": i.started_at,
                    "finished_at": i.finished_at,
                    "exc_type": i.exc_type,
                }
                for i in infos
            ]
        )
    elif not infos:
        typer.echo("no tasks match")
    else:
        title = f"Tasks ({len(infos)})"
        show([Table(title, ["Id", "Task", "State", "Queue", "When"], [_row(i) for i in infos])])
