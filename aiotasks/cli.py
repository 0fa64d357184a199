"""The `aiotasks` command: run workers (and, in ops.py, inspect and operate queues)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from enum import StrEnum
from typing import Annotated, Any

import typer

from .app import App
from .backoff import Backoff
from .config import redact_url as hide_password
from .errors import BrokerConnectionError
from .worker import Worker

cli = typer.Typer(
    name="aiotasks",
    help="An asyncio-native task runner on Redis Streams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("aiotasks.cli")


@cli.callback()
def _root() -> None:
    """An asyncio-native task runner on Redis Streams."""


class Loop(StrEnum):
    """Event loop implementations."""

    uvloop = "uvloop"
    asyncio = "asyncio"


class LogLevel(StrEnum):
    """Logging levels."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    """Log line formats."""

    text = "text"
    json = "json"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear error line and build the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def load_app(spec: str) -> App:
    """Import `module:attribute` (the current directory is importable) and check it is an App."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise fail(f"expected module:attribute (e.g. myproject.tasks:app), got {spec!r}", 2)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail(f"cannot import module {module_name!r}: {exc}", 2) from None
    except Exception as exc:
        raise fail(f"importing {module_name!r} raised {type(exc).__name__}: {exc}", 2) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise fail(f"module {module_name!r} has no attribute {attr!r}", 2) from None
    if not isinstance(obj, App):
        raise fail(f"{spec} is a {type(obj).__name__}, not an aiotasks.App", 2)
    return obj


def setup_logging(level: LogLevel, fmt: LogFormat = LogFormat.text) -> None:
    """Configure the root handler for the CLI (the library itself never does)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == LogFormat.json:
        from .logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.value.upper())


async def wait_for_redis(app: App, timeout: float) -> None:
    """Ping until Redis answers, one log line per failed try, for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(start=0.5, cap=2.0)
    url = hide_password(app.settings.redis_url)
    attempt = 1
    while True:
        try:
            await app.connect()
            return
        except BrokerConnectionError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerConnectionError(
                    f"cannot reach Redis at {url} after {timeout:g} s: {exc.__cause__ or exc}"
                ) from None
            delay = min(backoff.next(), left)
            log.warning(
                "cannot reach Redis at %s (attempt %d: %s); retrying in %.1f s",
                url,
                attempt,
                exc.__cause__ or exc,
                delay,
            )
            attempt += 1
            await asyncio.sleep(delay)


def banner(app: App, worker: Worker, spec: str) -> str:
    """The startup banner: app, queues, concurrency, Redis URL (password hidden), tasks."""
    tasks = sorted(n for n in app.tasks if not n.startswith("aiotasks."))
    lines = [
        f"aiotasks worker {worker.name}",
        f"  app:         {spec} (namespace {app.settings.namespace!r})",
        f"  redis:       {hide_password(app.settings.redis_url)}",
        f"  queues:      {', '.join(worker.queues)}",
        f"  concurrency: {worker.concurrency}",
        f"  tasks ({len(tasks)}):",
        *(f"    - {n}" for n in tasks),
    ]
    return "\n".join(lines)


async def serve(
    app: App, spec: str, worker_opts: dict[str, Any], connect_timeout: float, quiet: bool = False
) -> None:
    """Connect, run one worker until SIGTERM/SIGINT (a second signal exits at once)."""
    await wait_for_redis(app, connect_timeout)
    worker = app.worker(**worker_opts)
    if not quiet:
        typer.echo(banner(app, worker, spec), err=True)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second %s: exiting now; unfinished tasks will be redelivered", sig.name)
            os._exit(1)
        log.warning(
            "%s: stopping; running tasks get up to %s s to finish (again to force)",
            sig.name,
            worker.shutdown_timeout,
        )
        worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await worker.run()
    finally:
        await app.close()
    if worker.abandoned:
        # A task that swallows cancellation would keep asyncio's shutdown waiting forever.
        log.warning("exiting with %d abandoned task(s) still running", worker.abandoned)
        logging.shutdown()
        os._exit(0)


@cli.command()
def run(
    app_spec: Annotated[str, typer.Argument(metavar="MODULE:APP", help="The App to run.")],
    queues: Annotated[
        str | None, typer.Option(help="Queues, most important first: high,default.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Tasks running at once.")] = 100,
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes (a supervisor restarts any that die).")
    ] = 1,
    loop: Annotated[Loop, typer.Option(help="Event loop.")] = Loop.uvloop,
    burst: Annotated[bool, typer.Option(help="Exit once the queues are empty.")] = False,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (wins over the App's).")] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds running tasks get on SIGTERM.")
    ] = 30.0,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to keep retrying Redis at startup.")
    ] = 10.0,
    max_deliveries: Annotated[
        int, typer.Option(min=1, help="Deliveries before dead-lettering.")
    ] = 5,
    log_level: Annotated[
        LogLevel, typer.Option(help="Log level (info shows every task).")
    ] = LogLevel.warning,
    log_format: Annotated[
        LogFormat, typer.Option(help="text, or json for machines.")
    ] = LogFormat.text,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics server listens on.")
    ] = "0.0.0.0",
) -> None:
    """Run a worker for MODULE:APP."""
    setup_logging(log_level, log_format)
    app = load_app(app_spec)
    if redis_url:
        app.configure(redis_url=redis_url)
    if processes > 1:
        from .supervisor import supervise

        # The children re-run this command line without --processes (see supervisor.py).
        raise typer.Exit(supervise(processes, sys.argv))
    opts: dict[str, Any] = {
        "queues": [q.strip() for q in queues.split(",") if q.strip()] if queues else None,
        "concurrency": concurrency,
        "burst": burst,
        "shutdown_timeout": shutdown_timeout,
        "max_deliveries": max_deliveries,
    }
    if metrics_port is not None:
        try:
            from . import metrics
        except ImportError as exc:
            raise fail(f"--metrics-port needs prometheus-client ({exc})") from None
        try:
            metrics.install(app, metrics_port, metrics_host)
        except OSError as exc:
            raise fail(
                f"cannot serve metrics on {metrics_host} port {metrics_port}: {exc.strerror or exc}"
            ) from None
    try:
        _run_loop(serve(app, app_spec, opts, connect_timeout), loop)
    except BrokerConnectionError as exc:
        raise fail(str(exc)) from None


def _run_loop(coro: Any, loop: Loop) -> None:
    if loop == Loop.uvloop and sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using asyncio")
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main() -> None:
    """Entry point of the `aiotasks` command."""
    from . import ops  # noqa: F401  (registers status, inspect, revoke, purge, send, ...)

    cli()
