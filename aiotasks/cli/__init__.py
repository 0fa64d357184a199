"""The `aiotasks` command: run workers, inspect and operate queues.

Each command lives in a module of this package and is registered here, explicitly:

```
run.py       run MODULE:APP                   a worker, or a supervisor of several
status.py    status                           queues, workers, periodic tasks
tasks.py     inspect | revoke | retry | send  one task at a time
queues.py    purge | dead-letters ...         a queue at a time
listing.py   tasks list                       recent tasks from the task index
control.py   schedules ... | queues ...       schedules and queue pauses at run time
web.py       web                              the dashboard, served alone
common.py    --app/--redis-url/--namespace, loading the App, talking to Redis, asking
output.py    tables for a terminal, plain lines for a pipe
group.py     the root group: every failure becomes one `error:` line and an exit code
```
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from . import control, library, listing, queues, run, status, tasks, web
from .group import RootGroup

cli = typer.Typer(
    name="aiotasks",
    cls=RootGroup,
    help="An asyncio-native task runner on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"aiotasks {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """An asyncio-native task runner on Redis Streams."""


cli.command()(run.run)
cli.command()(status.status)
cli.command()(tasks.inspect)
cli.command()(tasks.revoke)
cli.command()(tasks.retry)
cli.command()(queues.purge)
cli.command()(tasks.send)
cli.add_typer(queues.dead, name="dead-letters")
cli.add_typer(listing.tasks_group, name="tasks")
cli.add_typer(control.schedules, name="schedules")
cli.add_typer(control.queues, name="queues")
cli.add_typer(library.scripts, name="scripts")
cli.command()(web.web)


def main() -> None:
    """Entry point of the `aiotasks` command."""
    cli()
