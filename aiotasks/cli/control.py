"""`aiotasks schedules list|add|pause|resume|remove` and `aiotasks queues pause|resume`."""

from __future__ import annotations

from typing import Annotated

import typer

from ..admin import Admin, QueueNotFound
from ..control import ScheduleInfo, check_queue_name
from ..schedule import Periodic
from ..task import Signature
from .common import (
    AppOption,
    JsonOption,
    NamespaceOption,
    RedisOption,
    json_arg,
    not_empty,
    open_app,
    run_admin,
    unknown_task_note,
)
from .group import fail
from .output import Table, echo_json, show

schedules = typer.Typer(
    help="Schedules stored in Redis: workers take changes up within a second.",
    no_args_is_help=True,
)
queues = typer.Typer(help="Pause and resume queues at run time.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="The schedule's name.")]
#: A schedule that exists: an empty name is a usage error (add says why of its own).
ExistingNameArg = Annotated[str, typer.Argument(help="The schedule's name.", callback=not_empty)]


def _when(info: ScheduleInfo) -> str:
    return f"cron {info.cron}" if info.cron else f"every {info.every:g} s"


@schedules.command("list")
def list_schedules(
    as_json: JsonOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List every schedule, declared in code or added at run time."""
    app = open_app(app_spec, redis_url, namespace)
    infos = run_admin(app, lambda admin: admin.app.schedules.list())
    if as_json:
        echo_json([i.as_dict() for i in infos])
    elif not infos:
        typer.echo("no schedules")
    else:
        rows = [
            [i.name, i.task, _when(i), "paused" if i.paused else "active", i.source] for i in infos
        ]
        show([Table("Schedules", ["Name", "Task", "When", "State", "From"], rows)])


@schedules.command("add")
def add_schedule(
    name: NameArg,
    task: Annotated[str, typer.Argument(help="The task name to send.")],
    cron: Annotated[str | None, typer.Option(help="A cron expression, in UTC.")] = None,
    every: Annotated[float | None, typer.Option(min=0.001, help="The period in seconds.")] = None,
    args: Annotated[str | None, typer.Option(help="Positional arguments, a JSON array.")] = None,
    kwargs: Annotated[str | None, typer.Option(help="Keyword arguments, a JSON object.")] = None,
    queue: Annotated[str | None, typer.Option(help="The queue to send to.")] = None,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Add (or replace) a schedule that sends TASK on --cron or --every."""
    if (cron is None) == (every is None):
        raise fail("give exactly one of --cron or --every", 2)
    task_args, task_kwargs = json_arg("--args", args, list), json_arg("--kwargs", kwargs, dict)
    try:  # checked before anything connects
        Periodic.make(task, cron=cron, every=every, name=name)
        if queue is not None:
            check_queue_name(queue)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    app = open_app(app_spec, redis_url, namespace)
    unknown_task_note(app, app_spec, task)
    known = app.tasks.get(task)
    if known is not None:  # as `send` does: refused now, not failed on every tick
        try:
            known.check_args(task_args, task_kwargs)
        except TypeError as exc:
            raise fail(f"{exc} (see --args/--kwargs)", 2) from None
    sig = Signature(task, tuple(task_args), task_kwargs, app=app)

    async def add(admin: Admin) -> ScheduleInfo:
        return await admin.app.schedules.add(name, sig, cron=cron, every=every, queue=queue)

    info = run_admin(app, add)
    typer.echo(f"schedule {info.name!r}: {info.task} {_when(info)}")


def _change(verb: str, name: str, app_spec: str | None, url: str | None, ns: str | None) -> None:
    app = open_app(app_spec, url, ns)

    async def change(admin: Admin) -> None:
        await getattr(admin.app.schedules, verb)(name)

    run_admin(app, change)
    typer.echo(f"schedule {name!r}: {verb}d" if verb != "remove" else f"schedule {name!r} removed")


def _schedule_command(verb: str, doc: str) -> None:
    def command(
        name: ExistingNameArg,
        app_spec: AppOption = None,
        redis_url: RedisOption = None,
        namespace: NamespaceOption = None,
    ) -> None:
        _change(verb, name, app_spec, redis_url, namespace)

    command.__doc__ = doc
    schedules.command(verb)(command)


_schedule_command("pause", "Stop firing a schedule until it is resumed.")
_schedule_command("resume", "Fire a paused schedule again, from its next tick.")
_schedule_command(
    "remove", "Delete a schedule (one declared in code comes back when a worker starts)."
)


QueueArg = Annotated[str, typer.Argument(help="The queue.")]


def _queue_command(verb: str, doc: str) -> None:
    def command(
        queue: QueueArg,
        app_spec: AppOption = None,
        redis_url: RedisOption = None,
        namespace: NamespaceOption = None,
    ) -> None:
        try:
            check_queue_name(queue)
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        app = open_app(app_spec, redis_url, namespace)

        async def change(admin: Admin) -> bool:
            try:  # before the change: a paused queue is a known one
                await admin.check_queue(queue)
                known = True
            except QueueNotFound:
                known = False
            await getattr(admin.app.queues, verb)(queue)
            return known

        known = run_admin(app, change)
        # Pausing a queue before its first task is allowed; a typo should not pass unseen.
        note = "" if known else " (no task was ever sent to it: is the name right?)"
        typer.echo(f"queue {queue!r} {verb}d{note}")

    command.__doc__ = doc
    queues.command(verb)(command)


_queue_command("pause", "Workers stop taking tasks from QUEUE at once; nothing is lost.")
_queue_command("resume", "Workers take tasks from QUEUE again.")
