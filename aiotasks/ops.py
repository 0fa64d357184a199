"""Operations commands of the `aiotasks` CLI: status, inspect, revoke, purge, send, dead letters.

Every command finds Redis and the namespace from `--app module:attr`, or from
`--redis-url` (default $AIOTASKS_REDIS_URL) and `--namespace` (default "aiotasks");
`--redis-url` and `--namespace` given with `--app` win over the App's own. Tables are
for people, `--json` is for scripts. Errors are one `error: ...` line on stderr: exit 1
for an unknown task or queue or an unreachable Redis, 2 for bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from redis.exceptions import ResponseError

from .admin import Admin, DeadLetter, QueueNotFound, Status, TaskNotFound, parse_entry_ids
from .app import App
from .cli import cli, fail, load_app
from .config import redact_url as hide_password
from .errors import CONNECTION_ERRORS, BrokerConnectionError, ResultTimeout, TaskFailed, TaskRevoked
from .handle import TaskInfo, TaskState

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# rich is imported inside the functions that draw: a worker (`aiotasks run`) registers
# these commands but never draws, and should not pay rich's memory.

T = TypeVar("T")

#: Seconds a command waits for Redis to answer before it gives up.
CONNECT_TIMEOUT = 5.0

AppOption = Annotated[
    str | None,
    typer.Option("--app", metavar="MODULE:APP", help="The App (gives Redis URL and namespace)."),
]
RedisOption = Annotated[
    str | None,
    typer.Option(help="Redis URL (wins over the App's; default $AIOTASKS_REDIS_URL)."),
]
NamespaceOption = Annotated[
    str | None, typer.Option(help="Key namespace (default: the App's, else 'aiotasks').")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]

_STATE_STYLE = {
    TaskState.PENDING: "yellow",
    TaskState.SCHEDULED: "cyan",
    TaskState.STARTED: "blue",
    TaskState.SUCCESS: "green",
    TaskState.FAILURE: "red",
    TaskState.REVOKED: "magenta",
}


# -- plumbing ----------------------------------------------------------------------------


def open_app(app_spec: str | None, redis_url: str | None, namespace: str | None) -> App:
    """The App to operate on: imported from `app_spec`, or a bare one for URL + namespace."""
    app = load_app(app_spec) if app_spec else App(namespace=namespace or "aiotasks")
    changes: dict[str, str] = {}
    if redis_url:
        changes["redis_url"] = redis_url
    if namespace and app_spec:
        changes["namespace"] = namespace
    if changes:
        app.configure(**changes)
    return app


def run_admin(app: App, fn: Callable[[Admin], Awaitable[T]]) -> T:
    """Connect, run `fn(Admin(app))`, close; turn known failures into one error line."""

    async def main() -> T:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await app.connect()
        except TimeoutError:
            url = hide_password(app.settings.redis_url)
            raise BrokerConnectionError(
                f"cannot reach Redis at {url}: no answer in {CONNECT_TIMEOUT:g} s"
            ) from None
        try:
            return await fn(Admin(app))
        finally:
            await app.close()

    try:
        return asyncio.run(main())
    except (TaskNotFound, QueueNotFound, BrokerConnectionError) as exc:
        raise fail(str(exc)) from None
    except CONNECTION_ERRORS as exc:
        raise fail(f"lost Redis at {hide_password(app.settings.redis_url)}: {exc}") from None
    except ResponseError as exc:
        raise fail(f"Redis refused the command: {exc}") from None


def console() -> Console:
    from rich.console import Console

    """A console on the current stdout (made per call: tests swap stdout)."""
    return Console(highlight=False)


def echo_json(value: Any) -> None:
    """Print one JSON document."""
    typer.echo(json.dumps(value, indent=2, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    return repr(obj)


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    secs = (datetime.now(UTC) - when).total_seconds()
    if secs < 0:
        return f"in {_span(-secs)}"
    return f"{_span(secs)} ago"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f}s"
    if secs < 5400:
        return f"{secs / 60:.0f}m"
    if secs < 172_800:
        return f"{secs / 3600:.1f}h"
    return f"{secs / 86400:.1f}d"


def _need_confirmation(question: str, yes: bool) -> None:
    """Ask unless --yes; refuse outright when nobody can answer (stdin not a terminal)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise fail("refusing to delete without confirmation: pass --yes (stdin is not a terminal)")
    if not typer.confirm(question, default=False):
        typer.echo("aborted", err=True)
        raise typer.Exit(1)


# -- status ------------------------------------------------------------------------------


def render_status(st: Status) -> RenderableType:
    """Tables of queues, workers and periodic tasks."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    queues = Table(title=f"Queues (namespace {st.namespace!r})", title_justify="left")
    for col in ("Queue", "Waiting", "In flight", "Scheduled", "Dead", "Workers", "Consumers"):
        queues.add_column(col, justify="left" if col == "Queue" else "right")
    for q in st.queues:
        queues.add_row(
            q.name,
            str(q.waiting),
            str(q.in_flight),
            "?" if q.scheduled is None else str(q.scheduled),
            Text(str(q.dead_letters), style="red" if q.dead_letters else ""),
            str(q.workers),
            str(q.consumers),
        )
    parts: list[RenderableType] = [queues, Text(f"scheduled in total: {st.scheduled_total}")]
    workers = Table(title=f"Workers ({len(st.workers)} alive)", title_justify="left")
    for col in ("Worker", "Host", "PID", "Queues", "Running", "Done", "Failed", "Beat", "Up"):
        # Names are for copying: never wrapped; the rest may fold on a narrow terminal.
        workers.add_column(col, no_wrap=col == "Worker", overflow="fold")
    for w in st.workers:
        workers.add_row(
            w.name,
            w.host,
            str(w.pid),
            ",".join(w.queues),
            f"{w.running}/{w.concurrency}",
            str(w.done),
            str(w.failed),
            _ago(w.last_beat),
            _ago(w.started_at).removesuffix(" ago"),
        )
    parts.append(workers)
    if st.periodic:
        periodic = Table(title="Periodic tasks", title_justify="left")
        periodic.add_column("Name")
        periodic.add_column("Next run")
        for p in st.periodic:
            at = p.next_run.isoformat(timespec="seconds") if p.next_run else "-"
            periodic.add_row(p.name, f"{at} ({_ago(p.next_run)})" if p.next_run else at)
        parts.append(periodic)
    return Group(*parts)


async def _watch(admin: Admin, queues: list[str], interval: float) -> None:
    from rich.live import Live
    from rich.text import Text

    # Ctrl-C sets an event rather than cancelling: a cancel that races a Redis reply can
    # be lost on Python 3.11 (asyncio.wait_for inside redis-py), and the watch would go on.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with suppress(NotImplementedError):  # no loop signal handlers on Windows: Ctrl-C raises
        loop.add_signal_handler(signal.SIGINT, stop.set)
    with Live(render_status(await admin.status(queues)), console=console()) as live:
        while not stop.is_set():
            with suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if stop.is_set():
                break
            try:
                live.update(render_status(await admin.status(queues)))
            except CONNECTION_ERRORS as exc:  # keep watching: Redis may come back
                live.update(Text(f"Redis unreachable: {exc}; retrying", style="red"))


@cli.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 2.0,
    queue: Annotated[
        list[str] | None, typer.Option("--queue", "-q", help="Also show this queue.")
    ] = None,
    as_json: JsonOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Show queues (waiting, in flight, scheduled, dead), live workers and periodic tasks."""
    if watch and as_json:
        raise fail("--watch and --json do not go together", 2)
    app = open_app(app_spec, redis_url, namespace)
    queues = list(queue or [])
    if watch:
        try:
            run_admin(app, lambda admin: _watch(admin, queues, interval))
        except KeyboardInterrupt:
            pass
        return
    st = run_admin(app, lambda admin: admin.status(queues))
    if as_json:
        echo_json(st.as_dict())
    else:
        console().print(render_status(st))


# -- inspect / revoke --------------------------------------------------------------------


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


def render_info(info: TaskInfo) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    """A two-column table of everything stored about a task, then its traceback."""
    grid = Table(show_header=False, box=None, padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("id", info.id)
    grid.add_row("name", info.name or "-")
    grid.add_row("state", Text(str(info.state), style=_STATE_STYLE.get(info.state, "")))
    for name in ("queue", "worker", "attempts"):
        grid.add_row(name, str(getattr(info, name) or "-"))
    for name in ("enqueued_at", "started_at", "finished_at"):
        when: datetime | None = getattr(info, name)
        grid.add_row(name, f"{when.isoformat()} ({_ago(when)})" if when else "-")
    if info.started_at and info.finished_at:
        grid.add_row("runtime", f"{(info.finished_at - info.started_at).total_seconds():.3f}s")
    if info.progress is not None:
        grid.add_row("progress", repr(info.progress))
    if info.state == TaskState.SUCCESS:
        grid.add_row("result", repr(info.result))
    if info.exc_type:
        grid.add_row("error", f"{info.exc_type}: {info.exc_message}")
    if info.traceback:
        return Group(grid, Text(""), Text(info.traceback.rstrip(), style="dim"))
    return grid


@cli.command()
def inspect(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
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
        console().print(render_info(info))


@cli.command()
def revoke(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
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
            f"revoked task {task_id} (was STARTED: it runs to the end; --terminate cancels it)"
        )
    else:
        typer.echo(f"revoked task {task_id} (was {before}: it will not run)")


# -- purge / send ------------------------------------------------------------------------


@cli.command()
def purge(
    queue: Annotated[str, typer.Argument(help="The queue to empty.")],
    yes: YesOption = False,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Delete a queue's waiting and scheduled tasks (running ones are left alone).

    Deleted tasks read as REVOKED, so nobody waits on them forever.
    """
    app = open_app(app_spec, redis_url, namespace)

    async def count(admin: Admin) -> tuple[int, int | None]:
        await admin.check_queue(queue)
        q = await admin.queue_status(queue)
        return q.waiting, q.scheduled

    waiting, scheduled = run_admin(app, count)
    sched = "its" if scheduled is None else str(scheduled)
    _need_confirmation(
        f"Delete {waiting} waiting and {sched} scheduled task(s) of queue {queue!r}?", yes
    )
    n = run_admin(app, lambda admin: admin.purge(queue))
    typer.echo(f"purged {n} task(s) from queue {queue!r}")


def _json_arg(option: str, raw: str | None, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON ({exc}): {raw!r}", 2) from None
    if not isinstance(value, kind):
        want = "a JSON array, e.g. '[1, 2]'" if kind is list else "a JSON object, e.g. '{\"x\": 1}'"
        raise fail(f"{option} must be {want}, got {raw!r}", 2)
    return value


def _result_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


@cli.command()
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
    task_args = _json_arg("--args", args, list)
    task_kwargs = _json_arg("--kwargs", kwargs, dict)
    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = priority
    app = open_app(app_spec, redis_url, namespace)

    async def go(admin: Admin) -> tuple[str, Any]:
        handle = await admin.send(name, task_args, task_kwargs, queue, **options)
        typer.echo(handle.id)
        sys.stdout.flush()
        return handle.id, (await handle.result(timeout=timeout) if wait else None)

    try:
        _, result = run_admin(app, go)
    except (TaskFailed, TaskRevoked, ResultTimeout) as exc:
        raise fail(str(exc)) from None
    if wait:
        typer.echo(_result_text(result))


# -- dead letters ------------------------------------------------------------------------

dead = typer.Typer(
    help="Dead letters: messages no worker could run (unknown task, undecodable, "
    "delivered too many times).",
    no_args_is_help=True,
)
cli.add_typer(dead, name="dead-letters")

QueueArg = Annotated[str, typer.Argument(help="The queue whose dead letters to use.")]
IdsOption = Annotated[
    list[str] | None, typer.Option("--id", help="A dead-letter entry id (repeatable); default all.")
]


def render_dead(queue: str, letters: list[DeadLetter]) -> RenderableType:
    from rich.table import Table

    """A table of dead letters."""
    table = Table(title=f"Dead letters of queue {queue!r} ({len(letters)})", title_justify="left")
    for col in ("Entry", "Task id", "Task", "Dead since", "Reason"):
        table.add_column(col, no_wrap=col in ("Entry", "Task id"), overflow="fold")
    for d in letters:
        table.add_row(d.entry_id, d.task_id or "-", d.task_name or "?", _ago(d.dead_at), d.reason)
    return table


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
        console().print(render_dead(queue, letters))


def _checked(ids: list[str] | None) -> list[str] | None:
    if not ids:
        return None
    try:
        return parse_entry_ids(ids)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _report(verb: str, queue: str, done: int, ids: list[str] | None) -> None:
    typer.echo(f"{verb} {done} dead letter(s) of queue {queue!r}")
    if ids is not None and done < len(ids):
        raise fail(f"{len(ids) - done} of the {len(ids)} given id(s) are not dead letters here")


@dead.command("requeue")
def dead_requeue(
    queue: QueueArg,
    ids: IdsOption = None,
    app_spec: AppOption = None,
    redis_url: RedisOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Put dead letters back on the stream they came from; their tasks read PENDING again."""
    entry_ids = _checked(ids)
    app = open_app(app_spec, redis_url, namespace)
    moved = run_admin(app, lambda admin: admin.requeue_dead(queue, entry_ids))
    _report("requeued", queue, moved, entry_ids)


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
        _need_confirmation(f"Delete every dead letter of queue {queue!r}?", yes)
    dropped = run_admin(app, lambda admin: admin.drop_dead(queue, entry_ids))
    _report("dropped", queue, dropped, entry_ids)
