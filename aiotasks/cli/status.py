"""`aiotasks status`: queues, live workers and periodic tasks of a namespace."""

from __future__ import annotations

import asyncio
import signal
from contextlib import suppress
from typing import Annotated

import typer

from ..admin import Admin, Status
from ..config import redact_url
from ..errors import CONNECTION_ERRORS
from ..message import QUEUE_NAME_RULE, is_queue_name
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
from .output import Block, Line, Table, ago, console, echo_json, plain, render, show


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
    finite("--interval", interval)
    queues = list(queue or [])
    for q in queues:
        if not is_queue_name(q):
            raise fail(f"--queue {q!r} is not {QUEUE_NAME_RULE}", 2)
    app = open_app(app_spec, redis_url, namespace)
    if watch:
        run_admin(app, lambda admin: _watch(admin, queues, interval))
        return
    st = run_admin(app, lambda admin: admin.status(queues))
    if as_json:
        echo_json(st.as_dict())
    elif not (st.queues or st.workers or st.periodic):
        typer.echo(
            f"no queues in namespace {st.namespace!r} at {redact_url(app.settings.redis_url)}; "
            "is this the right --namespace/--app?"
        )
    else:
        show(status_blocks(st))


def status_blocks(st: Status) -> list[Block]:
    """Tables of queues, workers and periodic tasks."""
    blocks: list[Block] = [
        Table(
            f"Queues (namespace {st.namespace!r})",
            ["Queue", "Waiting", "In flight", "Scheduled", "Dead", "Workers", "Consumers", "State"],
            [
                [
                    q.name,
                    str(q.waiting),
                    str(q.in_flight),
                    "?" if q.scheduled is None else str(q.scheduled),
                    (str(q.dead_letters), "red" if q.dead_letters else ""),
                    str(q.workers),
                    str(q.consumers),
                    ("paused", "yellow") if q.paused else "",
                ]
                for q in st.queues
            ],
            right=frozenset(range(1, 7)),
        ),
        Line(f"scheduled in total: {st.scheduled_total}"),
        Table(
            f"Workers ({len(st.workers)} alive)",
            ["Worker", "Host", "PID", "Queues", "Running", "Done", "Failed", "Beat", "Up"],
            [
                [
                    w.name,
                    w.host,
                    str(w.pid),
                    ", ".join(w.queues),
                    f"{w.running}/{w.concurrency}",
                    str(w.done),
                    str(w.failed),
                    ago(w.last_beat),
                    ago(w.started_at).removesuffix(" ago"),
                ]
                for w in st.workers
            ],
            right=frozenset({2, 4, 5, 6}),
        ),
    ]
    if st.periodic:
        rows = []
        for p in st.periodic:
            at = p.next_run.isoformat(timespec="seconds") if p.next_run else "-"
            when = "paused" if p.paused else f"{at} ({ago(p.next_run)})" if p.next_run else at
            rows.append([p.name, when])
        blocks.append(Table("Periodic tasks", ["Name", "Next run"], rows))
    return blocks


async def _watch(admin: Admin, queues: list[str], interval: float) -> None:
    """Redraw in place on a terminal; elsewhere write a plain snapshot per refresh."""
    # Ctrl-C sets an event rather than cancelling: a cancel that races a Redis reply can
    # be lost on Python 3.11 (asyncio.wait_for inside redis-py), and the watch would go on.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with suppress(NotImplementedError):  # no loop signal handlers on Windows: Ctrl-C raises
        loop.add_signal_handler(signal.SIGINT, stop.set)
    con = console()
    if not con.is_terminal:
        while not stop.is_set():
            typer.echo(plain(await _snapshot(admin, queues)) + "\n")
            await _sleep(stop, interval)
        return
    from rich.live import Live

    with Live(render(await _snapshot(admin, queues), con.width), console=con) as live:
        while not await _sleep(stop, interval):
            live.update(render(await _snapshot(admin, queues), con.width))


async def _snapshot(admin: Admin, queues: list[str]) -> list[Block]:
    try:
        return status_blocks(await admin.status(queues))
    except CONNECTION_ERRORS as exc:  # keep watching: Redis may come back
        return [Line(f"Redis unreachable: {exc}; retrying", "red")]


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until stopped; True if stopped."""
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()
