"""`aiotasks purge` and `aiotasks dead-letters list | requeue | drop`: a queue at a time."""

from __future__ import annotations

from typing import Annotated

import typer

from ..admin import Admin, DeadLetter, parse_entry_ids
from .common import (
    AppOption,
    JsonOption,
    NamespaceOption,
    RedisOption,
    YesOption,
    confirm,
    open_app,
    queue_name,
    run_admin,
)
from .group import fail
from .output import Table, ago, echo_json, show

# -- purge --------------------------------------------------------------------------------


def purge(
    queue: Annotated[str, typer.Argument(help="The queue to empty.", callback=queue_name)],
    yes: YesOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Delete a queue's waiting and scheduled tasks (running ones are left alone).

    Deleted tasks read as REVOKED, so nobody waits on them forever. Without --yes it asks
    first; the answer may come from a pipe (`echo y | aiotasks purge q`).
    """
    app = open_app(app_spec, redis_url, namespace)

    async def count(admin: Admin) -> tuple[int, int | None]:
        await admin.check_queue(queue)
        q = await admin.queue_status(queue)
        return q.waiting, q.scheduled

    waiting, scheduled = run_admin(app, count)
    if waiting == 0 and scheduled == 0:
        typer.echo(f"queue {queue!r} has no waiting or scheduled task: nothing to purge")
        return
    sched = "its" if scheduled is None else str(scheduled)
    confirm(f"Delete {waiting} waiting and {sched} scheduled task(s) of queue {queue!r}?", yes)
    n = run_admin(app, lambda admin: admin.purge(queue))
    typer.echo(f"purged {n} task(s) from queue {queue!r}")


# -- dead letters -------------------------------------------------------------------------

dead = typer.Typer(
    help="Dead letters: messages no worker could run (unknown task, undecodable, "
    "delivered too many times).",
    no_args_is_help=True,
)

QueueArg = Annotated[
    str, typer.Argument(help="The queue whose dead letters to use.", callback=queue_name)
]
IdsOption = Annotated[
    list[str] | None, typer.Option("--id", help="A dead-letter entry id (repeatable); default all.")
]


def dead_table(queue: str, letters: list[DeadLetter]) -> Table:
    """A table of dead letters."""
    return Table(
        f"Dead letters of queue {queue!r} ({len(letters)})",
        ["Entry", "Task id", "Task", "Dead since", "Reason"],
        [
            [d.entry_id, d.task_id or "-", d.task_name or "?", ago(d.dead_at), d.reason]
            for d in letters
        ],
    )


@dead.command("list")
def dead_list(
    queue: QueueArg,
    count: Annotated[int, typer.Option(min=1, help="Most entries to show (oldest first).")] = 100,
    as_json: JsonOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """List a queue's dead letters, oldest first."""
    app = open_app(app_spec, redis_url, namespace)
    letters = run_admin(app, lambda admin: admin.dead_letters(queue, count))
    if as_json:
        echo_json([d.as_dict() for d in letters])
    elif not letters:
        typer.echo(f"no dead letters in queue {queue!r}")
    else:
        show([dead_table(queue, letters)])


def _checked(ids: list[str] | None) -> list[str] | None:
    if not ids:
        return None
    try:
        return parse_entry_ids(ids)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _report(verb: str, queue: str, done: int, ids: list[str] | None, why: str = "") -> None:
    typer.echo(f"{verb} {done} dead letter(s) of queue {queue!r}")
    if ids is not None and done < len(ids):
        missed = len(ids) - done
        raise fail(f"{missed} of the {len(ids)} given id(s) are not dead letters here{why}")


@dead.command("requeue")
def dead_requeue(
    queue: QueueArg,
    ids: IdsOption = None,
    yes: YesOption = False,  # nothing to confirm: accepted, so `requeue|drop ... --yes` both work
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Put dead letters back on the stream they came from; their tasks read PENDING again."""
    entry_ids = _checked(ids)
    app = open_app(app_spec, redis_url, namespace)
    moved = run_admin(app, lambda admin: admin.requeue_dead(queue, entry_ids))
    # A letter with no message (a scheduled task whose record could not be read) stays.
    _report("requeued", queue, moved, entry_ids, ", or hold no message to run")


@dead.command("drop")
def dead_drop(
    queue: QueueArg,
    ids: IdsOption = None,
    yes: YesOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Delete dead letters for good (all of them asks for confirmation unless --yes)."""
    entry_ids = _checked(ids)
    app = open_app(app_spec, redis_url, namespace)
    if entry_ids is None:
        run_admin(app, lambda admin: admin.check_queue(queue))
        confirm(f"Delete every dead letter of queue {queue!r}?", yes)
    dropped = run_admin(app, lambda admin: admin.drop_dead(queue, entry_ids))
    _report("dropped", queue, dropped, entry_ids)
